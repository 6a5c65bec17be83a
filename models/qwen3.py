"""Qwen3: Llama's decoder with a per-head RMSNorm of queries and keys before RoPE, an explicit
head_dim, tied embeddings in the small sizes."""

from __future__ import annotations

from chmc.models.spec import LAYER, ArchSpec

QWEN3 = ArchSpec(architectures=("Qwen3ForCausalLM",), q_norm=f"{LAYER}.self_attn.q_norm.weight",
                 k_norm=f"{LAYER}.self_attn.k_norm.weight")
SPECS = (QWEN3,)
