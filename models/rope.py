"""Rotary position embeddings: the inverse frequencies of every layer, as transformers computes
them for the config's rope type (transformers is the numerical oracle; its RoPE functions are
called, not re-derived).

Supported rope types: default, linear, llama3, yarn, longrope (a row's short factors switch to
the long ones once its length passes original_max_position_embeddings; the generation loop then
recomputes the cache, as transformers' generate does, so that every position uses them), and
dynamic where it is static: up to max_position_embeddings dynamic NTK
scaling is the identity; past it transformers rescales with state kept across calls, which a
graph cannot reproduce, so chmc keeps the unscaled frequencies there. Gemma 3's local and global
bases are per layer type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from chmc.errors import NotSupportedError

SUPPORTED = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class RopeTable:
    """One layer's RoPE: cos/sin scaled by `scaling` over the first `dims` of each head."""

    inv_freq: tuple[float, ...]  # [dims / 2], float32 values
    scaling: float  # attention factor (yarn, longrope), 1 otherwise
    dims: int  # rotated dims per head (partial_rotary_factor < 1 leaves the rest as they are)
    long_inv_freq: tuple[float, ...] | None = None  # longrope: used from `switch_at` positions
    switch_at: int | None = None


def _floats(t: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(t.detach().cpu(), dtype=np.float32))


def _raw_params(config: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """config.json's RoPE parameter sets as written (one, or one per layer type), each with its
    rope type."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    nested = params and all(isinstance(v, dict) for v in params.values())  # per layer type
    return [(p, p.get("rope_type", p.get("type", "default")))
            for p in (params.values() if nested else [params])]


def longrope_switch(config: dict[str, Any]) -> int | None:
    """For a longrope config, the length past which a sequence uses the long factors at every
    position (original_max_position_embeddings); None for any other rope type. Torch-free: the
    generation loop reads it."""
    longrope = [p for p, kind in _raw_params(config) if kind == "longrope"]
    if not longrope:
        return None
    value = config.get("original_max_position_embeddings") or longrope[0].get(
        "original_max_position_embeddings")
    return int(value) if value else None


def _check_types(config: dict[str, Any]) -> None:
    """Refuse an unsupported rope type from the raw config, before transformers warns about it."""
    for _, kind in _raw_params(config):
        if kind not in SUPPORTED:
            raise NotSupportedError(f"not supported: rope type '{kind}' in config.json (chmc "
                                    f"handles {', '.join(SUPPORTED)})")


def rope_tables(config: dict[str, Any], layers: int, head_dim: int) -> tuple[RopeTable, ...]:
    """Each layer's RopeTable from config.json."""
    _check_types(config)
    import transformers  # the oracle's RoPE functions; torch with it, on the export side only
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fields = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(config.get("model_type", "llama"), **fields)
    params = getattr(cfg, "rope_parameters", None) or {}
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    per_type = bool(layer_types) and set(layer_types) <= set(params)  # Gemma 3: one per type

    def table(layer_type: str | None) -> RopeTable:
        p = params[layer_type] if layer_type else params
        kind = p.get("rope_type", "default")
        dims = int(head_dim * p.get("partial_rotary_factor", 1.0))
        extra = {"layer_type": layer_type} if layer_type else {}
        if kind == "default":
            theta = float(p.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
            exponents = np.arange(0, dims, 2, dtype=np.int64).astype(np.float32) / dims
            inv = tuple(float(v) for v in (1.0 / theta ** exponents).astype(np.float32))
            return RopeTable(inv, 1.0, dims)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", **extra)
        if kind != "longrope":
            return RopeTable(_floats(inv_freq), float(scaling), dims)
        switch = int(p["original_max_position_embeddings"])
        long, _ = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=switch + 1, **extra)
        return RopeTable(_floats(inv_freq), float(scaling), dims, _floats(long), switch)

    if per_type:
        by_type = {t: table(t) for t in sorted(set(layer_types))}
        return tuple(by_type[layer_types[i]] for i in range(layers))
    return (table(None),) * layers
