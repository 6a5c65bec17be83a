"""Declarative decoder descriptions: which tensor names a family uses, which features its forward
pass has, and the numbers config.json gives it. Torch-free at import: the runtime reads them too.

`ArchSpec` is per family (one small file each: chmc.models.llama, qwen3, gemma, phi3);
`DecoderConfig` is per checkpoint, read and checked from its config.json. chmc.models.decoder
runs the forward pass from both, once for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from chmc.errors import ChmcError, NotSupportedError
from chmc.models.rope import RopeTable, rope_tables

LAYER = "model.layers.{i}"


@dataclass(frozen=True)
class ArchSpec:
    """Tensor names of one decoder family (`{i}` is the layer number) and its features."""

    architectures: tuple[str, ...]
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    # the norms around a layer's two blocks; None where the family has none
    attn_norm: str = f"{LAYER}.input_layernorm.weight"
    attn_out_norm: str | None = None
    mlp_norm: str = f"{LAYER}.post_attention_layernorm.weight"
    mlp_out_norm: str | None = None
    q_norm: str | None = None  # per-head RMSNorm of queries and keys, before RoPE
    k_norm: str | None = None
    # projections: q, k, v, o; or one fused qkv (split after the matmul) and o
    attention: dict[str, str] = field(default_factory=lambda: {
        p: f"{LAYER}.self_attn.{p}_proj" for p in "qkvo"})
    # gated MLP: gate, up, down; or one fused gate_up (gate first) and down
    mlp: dict[str, str] = field(default_factory=lambda: {
        p: f"{LAYER}.mlp.{p}_proj" for p in ("gate", "up", "down")})
    norm_style: Literal["llama", "gemma"] = "llama"  # gemma: x * (1 + w), multiplied in float32
    embed_scale: bool = False  # embeddings times sqrt(hidden) (Gemma)
    activations: tuple[str, ...] = ("silu",)
    activation_keys: tuple[str, ...] = ("hidden_act",)  # config.json's key, first found wins
    attn_scalar_key: str | None = None  # scores scaled by config[key] ** -0.5 (Gemma)


ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


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
    windows: tuple[int | None, ...]  # per layer: sliding window length, or None for full attention
    rope: tuple[RopeTable, ...]  # per layer
    tie_word_embeddings: bool
    activation: str  # silu | gelu_tanh
    attn_scale: float  # multiplies q . k
    attn_softcap: float | None  # scores -> cap * tanh(scores / cap)
    final_softcap: float | None  # logits likewise

    @property
    def heads_per_kv(self) -> int:
        """Query heads sharing one key/value head (GQA)."""
        return self.heads // self.kv_heads


def _windows(config: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    if "use_sliding_window" in config or "layer_types" in config:  # per-layer types
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

    act = next((config[k] for k in spec.activation_keys if config.get(k)), spec.activations[0])
    if act not in spec.activations or act not in ACTIVATIONS:
        raise NotSupportedError(f"not supported: activation '{act}' in config.json ({arch})")
    if config.get("use_bidirectional_attention"):
        raise NotSupportedError(f"not supported: use_bidirectional_attention in config.json "
                                f"({arch}: chmc serves causal decoders)")
    hidden, heads, layers = (int(need(k)) for k in ("hidden_size", "num_attention_heads",
                                                    "num_hidden_layers"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ChmcError(f"config.json: num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv_heads}")
    head_dim = int(config.get("head_dim") or hidden // heads)
    scalar = float(config[spec.attn_scalar_key]) if spec.attn_scalar_key else float(head_dim)
    return DecoderConfig(
        architecture=arch, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=int(need("intermediate_size")),
        vocab=int(need("vocab_size")), eps=float(config.get("rms_norm_eps", 1e-6)),
        windows=_windows(config, layers), rope=rope_tables(config, layers, head_dim),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        activation=ACTIVATIONS[act], attn_scale=scalar ** -0.5,
        attn_softcap=config.get("attn_logit_softcapping"),
        final_softcap=config.get("final_logit_softcapping"),
    )
