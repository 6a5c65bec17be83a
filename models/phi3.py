"""Phi-3, Phi-3.5 and Phi-4: fused projections (qkv_proj, gate_up_proj; channel merging works on
their rows, the split happens after the matmul), partial rotary and longrope where the config
asks for them."""

from __future__ import annotations

from chmc.models.spec import LAYER, ArchSpec

PHI3 = ArchSpec(architectures=("Phi3ForCausalLM",),
                attention={"qkv": f"{LAYER}.self_attn.qkv_proj", "o": f"{LAYER}.self_attn.o_proj"},
                mlp={"gate_up": f"{LAYER}.mlp.gate_up_proj", "down": f"{LAYER}.mlp.down_proj"})
SPECS = (PHI3,)
