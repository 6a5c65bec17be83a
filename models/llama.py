"""Llama and the families that share its decoder shape (Mistral: sliding window; Qwen2: q/k/v
biases). Biases are picked up from the checkpoint when present, so one spec covers all three."""

from __future__ import annotations

from chmc.models.spec import ArchSpec

LLAMA = ArchSpec(architectures=("LlamaForCausalLM",))
MISTRAL = ArchSpec(architectures=("MistralForCausalLM",))
QWEN2 = ArchSpec(architectures=("Qwen2ForCausalLM",))
SPECS = (LLAMA, MISTRAL, QWEN2)
