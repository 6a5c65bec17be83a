"""Bad input to `chmc build` / `extract`: one `chmc: error:` line naming the culprit, exit status
1, and nothing at all left next to the output (no artifact, no staging folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

PROJ = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def bad_inputs(random_family, tmp_path_factory):
    """Broken copies of expert_0, one defect each."""
    from safetensors.torch import load_file, save_file

    base, experts = random_family
    root = tmp_path_factory.mktemp("bad_inputs")
    good = experts["expert_0"]

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, root / name))

    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("hello")
    config = json.loads((good / "config.json").read_text())
    other = copy("other_arch")
    (other / "config.json").write_text(
        json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    tensors = load_file(str(good / "model.safetensors"))
    reshaped = copy("other_shape")
    save_file({**tensors, PROJ: tensors[PROJ][:-1].contiguous()},
              str(reshaped / "model.safetensors"), metadata={"format": "pt"})
    missing = copy("missing_tensor")
    save_file({k: v for k, v in tensors.items() if k != PROJ}, str(missing / "model.safetensors"),
              metadata={"format": "pt"})
    truncated = copy("truncated")
    data = (good / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    corrupt = copy("corrupt")
    (corrupt / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    return base, experts, root


def run_failing(chmc_cli, tmp_path: Path, args: list, expect: list[str]) -> str:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    assert list(work.iterdir()) == []
    r = chmc_cli(*args, cwd=work)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chmc: error: "), r.stderr
    for word in expect:
        assert word in lines[0], lines[0]
    assert list(work.iterdir()) == []  # no output, no staging folder
    return lines[0]


CASES = {
    # name: (how to build the argument list from (base, experts, root), words the error names)
    "missing_base": (lambda b, e, r: ["--base", r / "nope", *e(0, 1)], ["nope", "no such file"]),
    "missing_expert": (lambda b, e, r: ["--base", b, *e(0), f"x={r / 'gone'}"], ["gone"]),
    "not_a_model": (lambda b, e, r: ["--base", b, *e(0), f"x={r / 'not_a_model'}"],
                    ["not_a_model", "config.json"]),
    "other_arch": (lambda b, e, r: ["--base", b, *e(0), f"odd={r / 'other_arch'}"],
                   ["expert 'odd'", "MistralForCausalLM", "LlamaForCausalLM"]),
    "other_shape": (lambda b, e, r: ["--base", b, *e(0), f"odd={r / 'other_shape'}"],
                    ["expert 'odd'", PROJ, "[63, 32]", "[64, 32]"]),
    "missing_tensor": (lambda b, e, r: ["--base", b, *e(0), f"odd={r / 'missing_tensor'}"],
                       ["expert 'odd'", PROJ]),
    "truncated": (lambda b, e, r: ["--base", b, *e(0), f"odd={r / 'truncated'}"],
                  ["truncated", "model.safetensors"]),
    "corrupt": (lambda b, e, r: ["--base", b, *e(0), f"odd={r / 'corrupt'}"],
                ["corrupt", "model.safetensors"]),
    "duplicate_names": (lambda b, e, r: ["--base", b, *e(0, 1),
                                         e(2)[0].replace("expert_2", "expert_0")],
                        ["duplicate expert name 'expert_0'"]),
    "one_expert": (lambda b, e, r: ["--base", b, *e(0)], ["at least two experts"]),
    "k_zero": (lambda b, e, r: ["--base", b, *e(0, 1), "--groups", "0"], ["--groups", "got 0"]),
    "k_above_n": (lambda b, e, r: ["--base", b, *e(0, 1, 2), "--groups", "4"], ["(3)", "got 4"]),
    "unknown_method": (lambda b, e, r: ["--base", b, *e(0, 1), "--method", "slerp"], ["slerp"]),
    "bad_density": (lambda b, e, r: ["--base", b, *e(0, 1), "--method", "ties", "--density", "1.5"],
                    ["density", "1.5"]),
    "bad_weight_name": (lambda b, e, r: ["--base", b, *e(0, 1), "--weight", "nobody=2"],
                        ["nobody"]),
    "bad_dtype": (lambda b, e, r: ["--base", b, *e(0, 1), "--dtype", "int8"], ["int8"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_build_rejects(bad_inputs, chmc_cli, tmp_path, case):
    base, experts, root = bad_inputs
    names = list(experts)

    def e(*ids: int) -> list[str]:
        return [f"{names[i]}={experts[names[i]]}" for i in ids]

    make_args, expect = CASES[case]
    args = make_args(base, e, root)
    if "--groups" not in args:
        args += ["--groups", "1"]
    run_failing(chmc_cli, tmp_path, ["build", *args, "--out", "out"], expect)


def test_bad_yaml_config(bad_inputs, chmc_cli, tmp_path):
    base, experts, _ = bad_inputs
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"base_model: {base}\nslices:\n  - sources: []\nmerge_method: ties\n")
    run_failing(chmc_cli, tmp_path, ["build", "--config", cfg, "--groups", "1", "--out", "out"],
                ["merge.yml", "slices"])
    cfg.write_text(f"base_model: {base}\nmodels:\n  - model: {experts['expert_0']}\n"
                   f"  - model: {experts['expert_1']}\n    parameters: {{weight: [0.5, 1.0]}}\n")
    run_failing(chmc_cli, tmp_path, ["build", "--config", cfg, "--groups", "1", "--out", "out"],
                ["models[1].parameters.weight"])


def test_existing_output_is_kept(bad_inputs, chmc_cli, tmp_path):
    base, experts, _ = bad_inputs
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    names = list(experts)
    r = chmc_cli("build", "--base", base, "--experts", *(f"{n}={experts[n]}" for n in names[:2]),
                 "--groups", "1", "--out", "out", cwd=out.parent)
    assert r.returncode == 1 and r.stderr.startswith("chmc: error: ")
    assert "exists" in r.stderr and "--force" in r.stderr and len(r.stderr.splitlines()) == 1
    assert [p.name for p in out.parent.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_extract_rejects_unknown_expert_and_non_artifact(random_family, chmc_cli, tmp_path):
    from chmc import build

    base, experts = random_family
    art = build(base, experts, tmp_path / "art", groups=1, progress=False)
    run_failing(chmc_cli, tmp_path, ["extract", art, "--expert", "nobody", "--out", "x"],
                ["unknown expert 'nobody'"])
    run_failing(chmc_cli, tmp_path, ["extract", base, "--expert", "0", "--out", "x"],
                ["not a chmc artifact"])
    run_failing(chmc_cli, tmp_path, ["inspect", tmp_path / "nothing"], ["nothing"])
