"""Llama and the families that share its decoder shape (Mistral: sliding window; Qwen2: q/k/v
biases). Biases are picked up from the checkpoint when present, so one spec covers all three."""

from __future__ import annotations

from chmc.models.spec import ArchSpec

LLAMA = ArchSpec(architectures=("LlamaForCausalLM",), model_type="llama")
MISTRAL = ArchSpec(architectures=("MistralForCausalLM",), model_type="mistral")
QWEN2 = ArchSpec(architectures=("Qwen2ForCausalLM",), model_type="qwen2")
SPECS = (LLAMA, MISTRAL, QWEN2)
