"""Gemma 2 and Gemma 3 (text): RMSNorm as x * (1 + w) in float32, embeddings times sqrt(hidden),
a norm after each block as well as before it, GeGLU (tanh GELU), scores scaled by
query_pre_attn_scalar, logit soft-capping of scores and outputs where the config asks for it, and
sliding-window layers alternating with global ones (Gemma 3: each with its own RoPE base, and
per-head q/k norms)."""

from __future__ import annotations

from dataclasses import replace

from chmc.models.spec import LAYER, ArchSpec

GEMMA2 = ArchSpec(
    architectures=("Gemma2ForCausalLM",),
    attn_out_norm=f"{LAYER}.post_attention_layernorm.weight",
    mlp_norm=f"{LAYER}.pre_feedforward_layernorm.weight",
    mlp_out_norm=f"{LAYER}.post_feedforward_layernorm.weight",
    norm_style="gemma", embed_scale=True, activations=("gelu_pytorch_tanh", "gelu_tanh"),
    activation_keys=("hidden_activation", "hidden_act"), attn_scalar_key="query_pre_attn_scalar")
GEMMA3 = replace(GEMMA2, architectures=("Gemma3ForCausalLM",),
                 q_norm=f"{LAYER}.self_attn.q_norm.weight",
                 k_norm=f"{LAYER}.self_attn.k_norm.weight")
SPECS = (GEMMA2, GEMMA3)
