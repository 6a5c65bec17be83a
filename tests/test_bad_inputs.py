"""Bad input, generated (Hypothesis) and remembered (regressions): every case is refused with a
non-zero exit and one line naming the file, line or field, with no traceback, no file left
behind, and an earlier output given with --force still intact.

The generated cases run the real code in process (`chmc.cli.main` with its own argv, the real
readers); the regressions run the real `chmc` command in a subprocess. `rejected(kind, value)`
counts each distinct refused input; the run's summary lists them by kind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from chmc.errors import ChmcError

FIELDS_OF_MERGE_YML = ("base_model", "models", "merge_method", "parameters", "dtype", "out_dtype",
                       "groups", "clustering", "seed")


def one_line(message: str) -> bool:
    return message.count("\n") == 0 and "Traceback" not in message


def listing(folder: Path) -> dict[str, str]:
    """Every file below `folder` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def working_in(folder: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def run_main(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """`chmc ARGS` in this process: (exit status, stdout, stderr). An exception other than the
    exit escapes to the test: that is a traceback a user would see."""
    from chmc.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["chmc", *args]
    try:
        with working_in(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code: Any = 0
            except SystemExit as e:
                code = e.code
    finally:
        sys.argv = argv
    return int(code or 0), out.getvalue(), err.getvalue()


def assert_refused(code: int, err: str) -> str:
    assert code != 0, err
    line = err.strip()
    assert one_line(line) and line.startswith("chmc: error: "), err
    return line


# --- merge.yml ---------------------------------------------------------------------------------

def bad_values(field: str) -> st.SearchStrategy[Any]:
    """Values of the wrong type or out of range for one merge.yml field."""
    text = st.text(min_size=1, max_size=12)
    junk = st.one_of(st.lists(st.integers(), min_size=1, max_size=3),
                     st.dictionaries(st.text(max_size=4), st.integers(), min_size=1, max_size=2))
    per_field = {
        "groups": st.one_of(text, st.booleans(), st.floats(allow_nan=False), junk,
                            st.integers(max_value=0)),
        "seed": st.one_of(text, st.booleans(), st.floats(allow_nan=False), junk),
        "clustering": st.one_of(text.filter(lambda t: t not in ("cosine", "error",
                                                                 "output-error")),
                                st.integers(), junk),
        "dtype": st.one_of(text.filter(lambda t: "float" not in t), st.integers(), junk),
        "out_dtype": st.one_of(text.filter(lambda t: "float" not in t), st.integers(), junk),
        "base_model": st.one_of(st.integers(), st.booleans(), junk),
        "merge_method": st.one_of(text.filter(lambda t: t not in ("mean", "linear", "ties",
                                                                   "task_arithmetic", "dare_ties",
                                                                   "dare_linear", "regmean")),
                                  st.integers(), junk),
        "models": st.one_of(text, st.integers(), st.lists(st.integers(), min_size=1, max_size=2),
                            st.just([{"path": "x"}]), st.just([{"model": "x", "weight": 1}])),
        "parameters": st.one_of(
            st.fixed_dictionaries({"density": st.one_of(st.floats(min_value=1.01, max_value=9),
                                                        st.floats(max_value=0), text, junk)}),
            st.fixed_dictionaries({"weight": st.lists(st.floats(0, 1), min_size=2, max_size=3)}),
            st.fixed_dictionaries({"nonsense": st.integers()})),
    }
    return per_field[field]


@st.composite
def bad_merge_configs(draw: Any, base: str, experts: list[str]) -> tuple[dict[str, Any], str]:
    """A valid merge.yml with one defect: a field of the wrong type or range, or an unknown key.
    Returns the document and the field the error must name."""
    doc: dict[str, Any] = {"base_model": base, "models": [{"model": e} for e in experts],
                           "merge_method": "ties", "parameters": {"density": 0.5}, "groups": 1}
    if draw(st.booleans()):
        key = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
                   .filter(lambda k: k not in FIELDS_OF_MERGE_YML + ("tokenizer_source",
                                                                     "chat_template")))
        doc[key] = draw(st.integers())
        return doc, key
    field = draw(st.sampled_from(FIELDS_OF_MERGE_YML))
    doc[field] = draw(bad_values(field))
    return doc, field


@pytest.fixture(scope="module")
def family(random_family: tuple[Path, dict[str, Path]]) -> tuple[str, list[str]]:
    base, experts = random_family
    return str(base), [str(p) for p in list(experts.values())[:2]]


@settings(max_examples=150)
@given(data=st.data())
def test_generated_merge_configs_name_file_line_and_field(family, tmp_path_factory, rejected,
                                                          data) -> None:
    from chmc.compiler.mergekit_config import load_merge_config

    doc, field = data.draw(bad_merge_configs(*family))
    file = tmp_path_factory.mktemp("yml") / "merge.yml"
    file.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ChmcError) as e:
        load_merge_config(file)
    message = str(e.value)
    assert one_line(message) and message.startswith(f"{file}:"), message
    line = int(message.split(":")[1])  # the line of the field in the file
    assert field in file.read_text().splitlines()[line - 1] or field in message, message
    rejected("merge.yml field", doc)


BROKEN_YAML = ["key: [1, 2", "  - : :", "\tbad: 1", "{", "'unterminated", "a: b: c", "- x\ny: 1"]


@settings(max_examples=60)
@given(snippet=st.sampled_from(BROKEN_YAML), at=st.integers(min_value=0, max_value=12))
def test_generated_yaml_syntax_errors_name_the_line(family, tmp_path_factory, rejected, snippet,
                                                    at) -> None:
    from chmc.compiler.mergekit_config import load_merge_config

    lines = yaml.safe_dump({"base_model": family[0], "models": [{"model": e} for e in family[1]],
                            "groups": 1}).splitlines()
    lines.insert(min(at, len(lines)), snippet)
    text = "\n".join(lines) + "\n"
    try:
        yaml.safe_load(text)
    except yaml.YAMLError:
        pass
    else:
        assume(False)  # this placement happens to be valid YAML
    file = tmp_path_factory.mktemp("yml") / "merge.yml"
    file.write_text(text)
    with pytest.raises(ChmcError) as e:
        load_merge_config(file)
    message = str(e.value)
    assert one_line(message) and message.startswith(f"{file}:") and "invalid YAML" in message
    assert 1 <= int(message.split(":")[1]) <= len(lines) + 1, message
    rejected("merge.yml syntax", text)


# --- the command line --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(random_family: tuple[Path, dict[str, Path]],
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder holding an earlier artifact `out` (which --force would replace)."""
    from chmc import build

    base, experts = random_family
    work = tmp_path_factory.mktemp("work")
    build(base, dict(list(experts.items())[:2]), work / "out", groups=1, progress=False)
    (work / "notes.txt").write_text("a file of the user's")
    return work


BAD_OPTIONS: dict[str, st.SearchStrategy[str]] = {
    "--groups": st.one_of(st.sampled_from(["two", "-1", "0", "3", "1.5", "", "true"]),
                          st.integers(max_value=0).map(str)),
    "--density": st.one_of(st.sampled_from(["1.5", "0", "-2", "abc", "nan"]),
                           st.floats(min_value=1.0001, max_value=1e6).map(str)),
    "--lambda": st.sampled_from(["abc", "", "1,5"]),
    "--seed": st.sampled_from(["abc", "1.5", "", "0x"]),
    "--dtype": st.text(alphabet="abcdefint0123456789", min_size=1, max_size=8)
               .filter(lambda t: t not in ("float32", "float16", "float64", "bfloat16")),
    "--method": st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
                .filter(lambda t: t not in ("mean", "linear", "ties", "task_arithmetic",
                                            "dare_ties", "dare_linear", "regmean")),
    "--clustering": st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10)
                    .filter(lambda t: t not in ("cosine", "error", "output-error")),
    "--budget": st.sampled_from(["0", "-0.5", "1.5", "abc", "0.01"]),
    "--target": st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
                .filter(lambda t: t not in ("artifact", "onnx", "trt")),
    "--weight": st.sampled_from(["nobody=1", "x", "expert_0=abc", "=1", "expert_0="]),
    "--out": st.sampled_from([".", "..", "/", "~", "notes.txt", "missing/out", "{base}",
                              "{base}/..", ""]),
    "--calibration": st.sampled_from(["expert_0=missing.jsonl", "nobody=notes.txt",
                                      "expert_0=notes.txt", "x"]),
    "--config": st.sampled_from(["missing.yml", "notes.txt", "."]),
    "--router-data": st.sampled_from(["nobody=notes.txt", "expert_0=missing.jsonl", "x"]),
}


@settings(max_examples=120)
@given(option=st.sampled_from(sorted(BAD_OPTIONS)), data=st.data())
def test_generated_build_options_fail_before_any_work(random_family, workdir, rejected, option,
                                                      data) -> None:
    base, experts = random_family
    value = data.draw(BAD_OPTIONS[option])
    value = value.replace("{base}", str(base)).replace("~", str(Path.home()))
    args = {"--base": str(base), "--groups": "1", "--out": "out", "--method": "ties",
            option: value}
    if option == "--budget":
        args.pop("--groups")  # a budget picks K; a valid one (0.01 is below K=1) would run
    argv = ["build", *(f"{k}={v}" for k, v in args.items()),
            "--experts", *(f"{n}={p}" for n, p in list(experts.items())[:2]), "--force"]
    before = listing(workdir)
    code, _, err = run_main(argv, workdir)
    line = assert_refused(code, err)
    assert listing(workdir) == before, f"{argv} changed the working folder ({line})"
    rejected(f"build {option}", value)


# --- safetensors files -------------------------------------------------------------------------

def header_file(header: Any, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


ENTRY = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "U8"]),
                       st.text(max_size=4), st.integers()),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.text(max_size=3),
                       st.just([2, "x"])),
    "data_offsets": st.one_of(st.lists(st.integers(-8, 200), min_size=0, max_size=3),
                              st.text(max_size=3)),
})


@st.composite
def bad_safetensors(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["short", "length", "not json", "not a dict", "entry", "utf8"]))
    if kind == "short":
        return draw(st.binary(max_size=7))
    if kind == "length":  # a header length beyond the file
        return header_file({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                           b"\0" * 4, draw(st.integers(min_value=200, max_value=2**63)))
    if kind == "not json":
        return header_file(draw(st.text(min_size=1, max_size=20)).encode() + b"{", b"")
    if kind == "not a dict":
        return header_file(draw(st.one_of(st.lists(st.integers()), st.integers(), st.text())),
                           b"")
    if kind == "utf8":
        return header_file(b'{"x": "\xff\xfe"}', b"")
    entry = draw(ENTRY)
    header = {"w": entry}
    data = b"\0" * draw(st.integers(0, 64))
    try:  # keep only entries the format forbids
        shape = [int(s) for s in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
        sizes = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1}
        numel = 1
        for s in shape:
            numel *= s
        valid = (entry["dtype"] in sizes and min(shape, default=0) >= 0 and begin >= 0
                 and end - begin == numel * sizes[entry["dtype"]] and end <= len(data))
    except (TypeError, ValueError):
        valid = False
    assume(not valid)
    return header_file(header, data)


@settings(max_examples=150)
@given(content=bad_safetensors())
def test_generated_safetensors_headers_name_the_file(tmp_path_factory, rejected, content) -> None:
    from chmc.formats.safetensors import read_header

    file = tmp_path_factory.mktemp("st") / "model.safetensors"
    file.write_bytes(content)
    with pytest.raises(ChmcError) as e:
        read_header(file)
    assert one_line(str(e.value)) and str(e.value).startswith(f"{file}:"), str(e.value)
    rejected("safetensors header", content)


# --- JSONL inputs (task files, router data, calibration prompts) -------------------------------

BAD_LINES = st.one_of(
    st.binary(min_size=1, max_size=8).filter(lambda b: b"\n" not in b).map(lambda b: b + b"\xff"),
    st.sampled_from([b"[1, 2]", b"42", b'"text"', b"{", b"null", b"{prompt: 1}"]),
    st.fixed_dictionaries({"prompt": st.one_of(st.integers(), st.lists(st.text(max_size=2)))})
      .map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"answer": st.text(max_size=5)}).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"input_ids": st.one_of(st.lists(st.text(max_size=2), min_size=1),
                                                  st.lists(st.integers(max_value=-1),
                                                           min_size=1),
                                                  st.just([10**6]))})
      .map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=150)
@given(good=st.integers(0, 3), bad=BAD_LINES, reader=st.sampled_from(["task", "calibration"]))
def test_generated_jsonl_lines_name_file_and_line(random_family, tmp_path_factory, rejected, good,
                                                  bad, reader) -> None:
    from chmc.compiler.calibration import read_sequences
    from chmc.runtime.evaluate import read_examples

    rows = [json.dumps({"prompt": f"p{i}", "answer": "a", "input_ids": [1, 2]}).encode()
            for i in range(good)]
    file = tmp_path_factory.mktemp("jsonl") / "rows.jsonl"
    file.write_bytes(b"\n".join([*rows, bad]) + b"\n")
    base = random_family[0]
    if reader == "task":
        try:
            read_examples(file)
        except ChmcError as e:
            message = str(e)
        else:
            assume(False)  # a valid task row (a prompt and answer of strings)
    else:
        try:
            read_sequences(file, base)
        except ChmcError as e:
            message = str(e)
        else:
            assume(False)  # a valid calibration row
    assert one_line(message) and message.startswith(f"{file}:{good + 1}:"), message
    rejected(f"{reader} JSONL line", bad)


# --- artifact manifests ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact_json(workdir: Path) -> dict[str, Any]:
    return json.loads((workdir / "out" / "chmc.json").read_text())


def mutate(manifest: dict[str, Any], draw: Any) -> tuple[dict[str, Any], str]:
    """One defect in a copy of a valid manifest, and the key it touches."""
    doc = json.loads(json.dumps(manifest))
    paths: list[tuple[list[Any], str]] = [([], k) for k in doc]
    paths += [(["accounting"], k) for k in doc["accounting"]]
    paths += [(["experts", 0], k) for k in doc["experts"][0]]
    first = next(iter(doc["tensors"]))
    paths += [(["tensors", first], k) for k in doc["tensors"][first]]
    where, key = draw(st.sampled_from(paths))
    node: Any = doc
    for part in where:
        node = node[part]
    action = draw(st.sampled_from(["delete", "retype", "extra"]))
    if action == "delete":
        assume(key not in ("budget", "calibration", "router", "groups", "stats", "dtype"))
        del node[key]
    elif action == "retype":
        node[key] = draw(st.sampled_from([["x"], {"y": 1}, "text", -1.5, True]))
        assume(not (isinstance(manifest.get(key), str) and isinstance(node[key], str)))
    else:
        key = draw(st.text(alphabet="xyz_", min_size=1, max_size=6).filter(lambda k: k not in node))
        node[key] = 1
    return doc, key


@settings(max_examples=100)
@given(data=st.data())
def test_generated_artifact_manifests_are_refused_by_inspect(workdir, artifact_json,
                                                             tmp_path_factory, rejected,
                                                             data) -> None:
    doc, key = mutate(artifact_json, data.draw)
    folder = tmp_path_factory.mktemp("art") / "art"
    folder.mkdir()
    for shard in (workdir / "out").glob("*.safetensors"):
        (folder / shard.name).symlink_to(shard)
    (folder / "chmc.json").write_text(json.dumps(doc))
    before = listing(folder.parent)
    code, _, err = run_main(["inspect", str(folder)], folder.parent)
    try:
        line = assert_refused(code, err)
    except AssertionError:
        if code == 0:  # a change the format allows (a value of the right type after all)
            assume(False)
        raise
    assert "chmc.json" in line or ".safetensors" in line, line
    assert listing(folder.parent) == before
    rejected("artifact manifest", doc)


# --- regressions: each problem the issue listed, through the real command ----------------------

def run_failing(chmc_cli: Any, cwd: Path, *args: Any) -> str:
    before = listing(cwd)
    result = chmc_cli(*args, cwd=cwd)
    line = assert_refused(result.returncode, result.stderr)
    assert listing(cwd) == before, f"{args} left files behind"
    return line


@pytest.mark.parametrize("out", [".", ".."])
def test_out_is_never_the_working_folder_or_its_parent(random_family, chmc_cli, tmp_path,
                                                       out) -> None:
    base, experts = random_family
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    pairs = [f"{n}={p}" for n, p in list(experts.items())[:2]]
    line = run_failing(chmc_cli, work, "build", "--base", base, "--experts", *pairs, "--groups",
                       "1", "--out", out, "--force")
    assert "working folder or one of its parents" in line
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["work"]  # no hidden leftovers


def test_force_replaces_only_what_chmc_wrote(random_family, chmc_cli, tmp_path) -> None:
    base, experts = random_family
    pairs = [f"{n}={p}" for n, p in list(experts.items())[:2]]
    build = ["build", "--base", base, "--experts", *pairs, "--groups", "1", "--force"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    line = run_failing(chmc_cli, tmp_path, *build, "--out", "mine")
    assert "replaces only a folder chmc wrote" in line and "thesis.tex" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert chmc_cli(*build, "--out", "empty", cwd=tmp_path).returncode == 0  # an empty one: yes
    first = (empty / "chmc.json").read_bytes()
    done = chmc_cli(*build[:-1], "--groups", "2", "--force", "--out", "empty", cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # chmc's own output: replaced
    assert (empty / "chmc.json").read_bytes() != first


@pytest.mark.parametrize(("text", "words"), [
    ("groups: two", [":3:", "field 'groups'"]),
    ("groups: true", [":3:", "field 'groups'"]),
    ("clustering: [a]", [":3:", "field 'clustering'"]),
    ("seed: abc", [":3:", "field 'seed'"]),
    ("groups: [1,", [":3:", "invalid YAML"]),
])
def test_merge_yml_mistakes_name_line_and_field(random_family, chmc_cli, tmp_path, text,
                                                words) -> None:
    base, experts = random_family
    (tmp_path / "merge.yml").write_text(
        f"base_model: {base}\nmodels: [{{model: {experts['expert_0']}}}, "
        f"{{model: {experts['expert_1']}}}]\n{text}\n")
    line = run_failing(chmc_cli, tmp_path, "build", "--config", "merge.yml", "--out", "o")
    assert all(w in line for w in ["merge.yml", *words]), line


@pytest.mark.parametrize("option", ["--plot", "--json"])
def test_eval_outputs_are_checked_before_the_evaluation(random_family, chmc_cli, tmp_path,
                                                        option) -> None:
    base, _ = random_family
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    line = run_failing(chmc_cli, tmp_path, "eval", base, "t.jsonl", option,
                       "/nonexistent/dir/r.out")
    assert "/nonexistent/dir" in line and option in line


def test_an_expert_of_another_base_is_named(random_family, chmc_cli, tmp_path) -> None:
    """Same shapes, different base: a warning naming it and the numbers; --strict refuses."""
    from chmc.models.tiny.random_family import make_random_family

    base, experts = random_family
    stranger, _ = make_random_family(tmp_path / "other", 1, seed=7)
    args = ["build", "--base", base, "--experts", f"expert_0={experts['expert_0']}",
            f"odd={stranger}", "--groups", "1"]
    done = chmc_cli(*args, "--out", "a", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warnings = [w for w in done.stderr.splitlines() if w.startswith("chmc: warning: ")]
    assert len(warnings) == 1 and "expert 'odd'" in warnings[0] and "cosine" in warnings[0]
    line = run_failing(chmc_cli, tmp_path, *args, "--out", "b", "--strict")
    assert "expert 'odd'" in line and "fine-tune of the base" in line


def test_inspect_checks_the_files_against_the_manifest(workdir, chmc_cli, tmp_path) -> None:
    art = tmp_path / "art"
    shutil.copytree(workdir / "out", art)
    shard = next(art.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    line = run_failing(chmc_cli, tmp_path, "inspect", "art")
    assert shard.name in line and "truncated" in line


def test_check_takes_its_tolerances_from_the_dtype(onnx_family, chmc_cli, tmp_path) -> None:
    from chmc.compiler.export import export


    folder = export(onnx_family["k2"], tmp_path / "fp16", dtype="float16")
    done = chmc_cli("check", folder, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "float16 graph: atol 0.1, rtol 0.05 (the defaults for it)" in done.stdout.splitlines()


@pytest.mark.parametrize(("role", "args"), [
    ("base", ["--base", "nope"]),
    ("expert 'x'", ["x=nope"]),
])
def test_a_missing_path_says_what_it_was(random_family, chmc_cli, tmp_path, role, args) -> None:
    base, experts = random_family
    given = ["--base", str(base), *args] if role != "base" else args
    line = run_failing(chmc_cli, tmp_path, "build", *given, "--experts",
                       f"expert_0={experts['expert_0']}", f"expert_1={experts['expert_1']}",
                       "--groups", "1", "--out", "o")
    assert f"nope: {role}: no such file or directory" in line, line


def test_flags_read_as_flags_in_help(chmc_cli, tmp_path) -> None:
    done = chmc_cli("build", "--help", cwd=tmp_path)
    force = next(line for line in done.stdout.splitlines() if "--force" in line)
    assert "<bool>" not in force and "BOOLEAN" not in force, force


def test_the_config_types_name_what_the_build_accepts() -> None:
    """merge.yml's Literal types and the registries they mirror stay the same lists."""
    from typing import get_args

    from chmc.compiler.grouping import CLUSTERINGS
    from chmc.compiler.mergekit_config import Clustering, FloatDtype
    from chmc.formats.safetensors import FLOAT_DTYPES

    assert set(get_args(Clustering)) == set(CLUSTERINGS)
    assert set(get_args(FloatDtype)) == set(FLOAT_DTYPES)
