"""Random-delta expert families: real Hugging Face folders, no training, for shape and plumbing
tests.

The base is a randomly initialised decoder; each expert is the base plus its own random delta, so
experts differ row by row the way fine-tunes do, and every tensor kind (projections, biases, norms,
embeddings, tied or untied lm_head) is present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

# per family: what makes a tiny config exercise its features (windows shorter than the test
# prompts, Gemma's scalar and soft-caps, token ids inside the tiny vocab)
FEATURES: dict[str, dict[str, Any]] = {
    "qwen3": {"head_dim": 16},  # != hidden / heads, like Qwen3 and Mistral-Nemo
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 12, "sliding_window": 4,
               "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    "gemma3": {"head_dim": 16, "query_pre_attn_scalar": 12, "sliding_window": 4,
               "layer_types": ["sliding_attention", "full_attention"],
               "rope_parameters": {  # local and global bases; the global one scaled, as in 4B+
                   "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                   "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}},
    "phi3": {"sliding_window": 6},
}
IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_config(arch: str = "llama", *, hidden: int = 32, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 64, vocab: int = 64,
                tie_word_embeddings: bool = False, **overrides: Any) -> Any:
    """A small transformers config of the given family (one of ARCHITECTURES); `overrides`
    replace the family's FEATURES and any other config field."""
    import transformers

    config_cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma2": transformers.Gemma2Config,
        "gemma3": transformers.Gemma3TextConfig,
        "phi3": transformers.Phi3Config,
    }[arch]
    fields = {**(IDS if arch in FEATURES else {}), **FEATURES.get(arch, {}), **overrides}
    return config_cls(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        **fields,
    )


def make_random_family(
    out: str | Path,
    n_experts: int = 4,
    *,
    arch: str = "llama",
    dtype: str = "float32",
    seed: int = 0,
    delta_scale: float = 0.02,
    **config_kwargs: Any,
) -> tuple[Path, dict[str, Path]]:
    """Write base/ and expert_<i>/ folders under `out`; return (base path, {name: path})."""
    import torch
    import transformers

    out = Path(out)
    torch.manual_seed(seed)
    config = tiny_config(arch, **config_kwargs)
    base = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).eval()
    with torch.no_grad():  # norms start at 1.0; perturb them so per-expert storage is exercised
        for p in base.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    base.save_pretrained(out / "base")
    experts: dict[str, Path] = {}
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(n_experts):
        expert = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * delta_scale
                p.add_(noise.to(p.dtype))
        path = out / f"expert_{i}"
        expert.save_pretrained(path)
        experts[f"expert_{i}"] = path
    return out / "base", experts
