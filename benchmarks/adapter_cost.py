"""What an adapter-only family costs in a chmc artifact, against serving the adapters as they are.

A Llama-shaped fp32 base (hidden 512, intermediate 1408, 4 layers, vocab 8000: 0.02B parameters)
and 4 LoRA adapters of it, written by peft: rank 16 on every linear layer of the decoder (the
usual QLoRA recipe), and rank 8 on q_proj and v_proj only (peft's default targets). For each,
the parameters each way of serving stores:

- the ensemble: N merged copies of the base;
- a multi-LoRA server (vLLM, S-LoRA, LoRAX): the base once plus every adapter's A and B;
- chmc at K=1, K=2, under --budget 0.3 (K per tensor), and lossless: the budget of the base
  once plus N-1 more copies of the matrices some adapter changes (those get K=N, the others
  K=1; the budget step finds that split by itself) and of the norms (stored per expert); each
  read from the artifact's manifest (its accounting section), with the worst expert's relative
  error at that size.

Prints one JSON object (also written to benchmarks/results/adapter_cost.json).

  python3 benchmarks/adapter_cost.py
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

SHAPE: dict[str, Any] = {"hidden": 512, "intermediate": 1408, "layers": 4, "heads": 8,
                         "kv_heads": 8, "vocab": 8000}
N = 4
RECIPES: dict[str, dict[str, Any]] = {
    "r16, all linear layers": {"r": 16, "lora_alpha": 32, "target_modules": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "r8, q_proj and v_proj": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
}
BUILDS: dict[str, dict[str, Any]] = {"K=1": {"groups": 1}, "K=2": {"groups": 2},
                                     "budget 0.3": {"groups": N, "budget": 0.3}}


def adapters(base: Path, root: Path, settings: dict[str, Any]) -> dict[str, Path]:
    """N adapters with random factors (init_lora_weights=False: B is not zero), saved by peft."""
    import peft
    import torch
    import transformers

    out = {}
    for i in range(N):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        tuned = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **settings))
        out[f"adapter_{i}"] = root / f"adapter_{i}"
        tuned.save_pretrained(str(out[f"adapter_{i}"]))
    return out


def adapter_parameters(folder: Path) -> int:
    from chmc.formats.safetensors import read_header

    return sum(info.numel for info in read_header(folder / "adapter_model.safetensors").values())


def lossless_budget(base: Path, experts: dict[str, Path]) -> float:
    """(P + (N-1) x the parameters of the matrices some adapter changes and of the vectors,
    which an artifact stores per expert) / (N x P), rounded up."""
    from chmc.formats.adapter import Adapter
    from chmc.formats.checkpoint import Checkpoint

    ckpt = Checkpoint(base)
    changed = {t for path in experts.values() for t in Adapter(path, ckpt).changed}
    total = sum(info.numel for info in ckpt.tensors.values())
    touched = sum(info.numel for t, info in ckpt.tensors.items()
                  if t in changed or len(info.shape) != 2)
    return math.ceil((total + (N - 1) * touched) / (N * total) * 1e4) / 1e4


def main() -> None:
    from chmc import build
    from chmc.formats.artifact import read_manifest
    from chmc.models.tiny.random_family import make_random_family

    results: dict[str, Any] = {"shape": SHAPE, "experts": N, "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, _ = make_random_family(root / "family", n_experts=0, arch="llama", **SHAPE)
        for recipe, settings in RECIPES.items():
            folder = root / recipe.replace(" ", "_").replace(",", "")
            experts = adapters(base, folder, settings)
            per_adapter = adapter_parameters(next(iter(experts.values())))
            row: dict[str, Any] = {"adapter_parameters": per_adapter}
            lossless = lossless_budget(base, experts)
            builds = {**BUILDS, "lossless": {"groups": N, "budget": lossless}}
            row["lossless budget"] = lossless
            for label, options in builds.items():
                artifact = build(base, experts, folder / label.replace(" ", "_"),
                                 progress=False, **options)
                manifest = read_manifest(artifact)
                accounting = manifest.accounting
                row["base"], row["ensemble"] = accounting.base, accounting.ensemble
                row[f"chmc {label}"] = accounting.artifact
                row[f"chmc {label} worst rel_error"] = max(e.rel_error for e in manifest.experts)
            row["multi-LoRA"] = row["base"] + N * per_adapter
            for key in [k for k in row if k.startswith(("chmc", "multi")) and "error" not in k]:
                row[f"{key} / ensemble"] = round(row[key] / row["ensemble"], 4)
            results["recipes"][recipe] = row
    text = json.dumps(results, indent=1)
    print(text)
    out = Path(__file__).parent / "results" / "adapter_cost.json"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
