"""Stage: artifact (or plain HF checkpoint) -> ONNX decoder folder with `expert_id` as an input.

Export folder layout (the runtime and the Triton model repository rely on it):
  model.onnx, model.onnx.data   graph + initializers (external data, page aligned)
  chmc.json                     the artifact manifest plus an `export` section (form, dtype, io...)
  config.json, generation_config.json, tokenizer files   copied from the source folder
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from chmc.compiler.onnx_graph import DTYPES, LINEAR_FORMS, Weights, write_model
from chmc.compiler.outputs import check_output_path, staged_output
from chmc.errors import ChmcError
from chmc.models.spec import architecture_of, decoder_config, get_spec

EXPORT_FORMAT = "chmc-onnx"


def _generation_ids(folder: Path, cfg: Any) -> tuple[list[int], int | None]:
    """EOS ids and pad id: generation_config.json wins over config.json, as in transformers."""
    eos, pad = list(cfg.eos_token_ids), cfg.pad_token_id
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        gen = json.loads(gen_file.read_text())
        if gen.get("eos_token_id") is not None:
            e = gen["eos_token_id"]
            eos = [int(x) for x in (e if isinstance(e, list) else [e])]
        pad = gen.get("pad_token_id", pad)
    return eos, pad


def export(src: str | Path, out: str | Path, *, linear: str = "gather", dtype: str = "float32",
           force: bool = False) -> Path:
    """Export an artifact (expert_id input) or a plain checkpoint (dense) to an ONNX folder."""
    import onnx
    from chmc.compiler.checkpoints import SIDE_FILES

    src = Path(src)
    if linear not in LINEAR_FORMS:
        raise ChmcError(f"--linear {linear!r} is not one of {list(LINEAR_FORMS)}")
    if dtype not in DTYPES:
        raise ChmcError(f"--dtype {dtype!r} is not one of {list(DTYPES)}")
    check_output_path(out, force)
    w = Weights(src)
    spec = get_spec(architecture_of(w.config))
    cfg = decoder_config(w.config)
    with staged_output(out, force) as tmp:
        io = write_model(w, spec, cfg, tmp, linear=linear, dtype=dtype)
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        eos, pad = _generation_ids(src, cfg)
        manifest: dict[str, Any] = dict(w.manifest or {"format": EXPORT_FORMAT, "experts": []})
        manifest["export"] = {
            "format": EXPORT_FORMAT, "source": str(src.resolve()),
            "linear": linear if w.merged else "dense", "dtype": dtype,
            "architecture": cfg.architecture, "num_layers": cfg.layers,
            "num_kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab,
            "eos_token_ids": eos, "pad_token_id": pad, "router": "router" in manifest, **io,
        }
        (tmp / "chmc.json").write_text(json.dumps(manifest, indent=1))
        try:
            onnx.checker.check_model(str(tmp / "model.onnx"), full_check=True)
        except onnx.checker.ValidationError as e:
            raise RuntimeError(f"exported graph fails onnx.checker: {e}") from e
    return Path(out)
