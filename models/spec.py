"""Declarative decoder specs: which tensor names a family uses and which config fields it reads.

The ONNX builder (chmc.compiler.onnx_graph) knows one decoder shape - embeddings, pre-norm GQA
attention with default RoPE, gated MLP, final norm, lm_head - and asks a spec only for names and
numbers, so adding a family that fits this shape is one registry entry (see chmc.models.llama).
Torch-free: the runtime reads the same config fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chmc.errors import ChmcError, NotSupportedError


@dataclass(frozen=True)
class ArchSpec:
    """Tensor names of one decoder family; `{i}` is the layer number."""

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
    """The numbers the graph needs, read and checked from config.json."""

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
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    for name in spec.architectures:
        _REGISTRY[name] = spec
    return spec


def architecture_of(config: dict[str, Any]) -> str:
    """config.json's architecture class, or the registered one for its model_type."""
    import chmc.models.llama  # noqa: F401  registers the built-in families

    if config.get("architectures"):
        return str(config["architectures"][0])
    model_type = config.get("model_type", "unknown")
    for name, spec in _REGISTRY.items():
        if spec.model_type == model_type:
            return name
    return str(model_type)


def get_spec(architecture: str) -> ArchSpec:
    import chmc.models.llama  # noqa: F401  registers the built-in families

    spec = _REGISTRY.get(architecture)
    if spec is None:
        raise NotSupportedError(
            f"not supported: {architecture} (ONNX export handles {sorted(_REGISTRY)})")
    return spec


def _rope_theta(config: dict[str, Any]) -> float:
    """Default RoPE only: transformers 5 keeps it in rope_parameters, 4.x in rope_theta/rope_scaling."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise NotSupportedError(f"not supported: rope type '{kind}' in config.json (default RoPE only)")
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


def decoder_config(config: dict[str, Any]) -> DecoderConfig:
    """Validate config.json against the spec's decoder shape; a bad or missing field is a ChmcError."""
    arch = architecture_of(config)
    spec = get_spec(arch)

    def need(key: str) -> Any:
        if key not in config or config[key] is None:
            raise ChmcError(f"config.json: field '{key}' is missing (needed by {arch})")
        return config[key]

    act = config.get("hidden_act", "silu")
    if act not in spec.activations:
        raise NotSupportedError(f"not supported: hidden_act '{act}' in config.json ({arch})")
    hidden, heads, layers = int(need("hidden_size")), int(need("num_attention_heads")), int(
        need("num_hidden_layers"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ChmcError(f"config.json: num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv_heads}")
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return DecoderConfig(
        architecture=arch, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate=int(need("intermediate_size")), vocab=int(need("vocab_size")),
        eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(config),
        windows=_windows(config, layers),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids,
        pad_token_id=config.get("pad_token_id"),
    )
