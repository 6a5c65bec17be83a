"""Declarative decoder descriptions: which tensor names a family uses, which features its forward
pass has, and the numbers config.json gives it. Torch-free: the runtime reads them too.

`ArchSpec` is per family (one small file each: chmc.models.llama, ...); `DecoderConfig` is per
checkpoint, read and checked from its config.json. chmc.models.decoder runs the forward pass from
both, once for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chmc.errors import ChmcError, NotSupportedError


@dataclass(frozen=True)
class ArchSpec:
    """Tensor names of one decoder family (`{i}` is the layer number) and its features."""

    architectures: tuple[str, ...]
    model_type: str = ""  # config.json's model_type, for folders saved without `architectures`
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    input_norm: str = "model.layers.{i}.input_layernorm.weight"
    post_attention_norm: str = "model.layers.{i}.post_attention_layernorm.weight"
    attention: dict[str, str] = field(default_factory=lambda: {
        p: f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkvo"})
    mlp: dict[str, str] = field(default_factory=lambda: {
        p: f"model.layers.{{i}}.mlp.{p}_proj" for p in ("gate", "up", "down")})
    activations: tuple[str, ...] = ("silu",)


@dataclass(frozen=True)
class DecoderConfig:
    """The numbers the forward pass needs, read and checked from config.json."""

    architecture: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    rope_theta: float
    windows: tuple[int | None, ...]  # per layer: sliding window length, or None for full attention
    tie_word_embeddings: bool
    activation: str

    @property
    def heads_per_kv(self) -> int:
        """Query heads sharing one key/value head (GQA)."""
        return self.heads // self.kv_heads


def _rope_theta(config: dict[str, Any]) -> float:
    """Default RoPE only: transformers 5 keeps it in rope_parameters, 4.x in
    rope_theta/rope_scaling."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise NotSupportedError(f"not supported: rope type '{kind}' in config.json "
                                "(default RoPE only)")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotSupportedError("not supported: partial_rotary_factor != 1 in config.json")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _windows(config: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    if "use_sliding_window" in config or "layer_types" in config:  # Qwen2 style: per-layer types
        types = config.get("layer_types") or ["full_attention"] * layers
        if not config.get("use_sliding_window", False) and "layer_types" not in config:
            return (None,) * layers
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * layers if window else (None,) * layers


def decoder_config(config: dict[str, Any], spec: ArchSpec, arch: str) -> DecoderConfig:
    """Validate config.json against the spec; a bad or missing field is a ChmcError naming it."""

    def need(key: str) -> Any:
        if key not in config or config[key] is None:
            raise ChmcError(f"config.json: field '{key}' is missing (needed by {arch})")
        return config[key]

    act = config.get("hidden_act", "silu")
    if act not in spec.activations:
        raise NotSupportedError(f"not supported: hidden_act '{act}' in config.json ({arch})")
    hidden, heads, layers = (int(need(k)) for k in ("hidden_size", "num_attention_heads",
                                                    "num_hidden_layers"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ChmcError(f"config.json: num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv_heads}")
    return DecoderConfig(
        architecture=arch, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate=int(need("intermediate_size")), vocab=int(need("vocab_size")),
        eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(config),
        windows=_windows(config, layers),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), activation=act,
    )
