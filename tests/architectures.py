"""The architecture cases the tests run: a family of models/tiny/random_family and the config
overrides that switch on what a real model of that kind does."""

from __future__ import annotations

from typing import Any

# short and long factors of a longrope config whose switch (8 positions) falls inside the steps
LONGROPE = {"original_max_position_embeddings": 8,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.3],
                             "long_factor": [2.0, 3.0, 5.0]}}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2 (llama3 rope, tied)": ("llama", {
        "tie_word_embeddings": True, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        "rope_theta": 500000.0}),
    "llama (linear rope)": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama (dynamic rope)": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}),
    "qwen2.5 (yarn)": ("qwen2", {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 64}}),
    "mistral-nemo (head_dim 16)": ("mistral", {"head_dim": 16, "sliding_window": 5}),
    "qwen3": ("qwen3", {}),
    "qwen3 (tied)": ("qwen3", {"tie_word_embeddings": True}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {}),
    "phi3": ("phi3", {}),
    "phi-4-mini (longrope, partial rotary)": ("phi3", {"partial_rotary_factor": 0.75, **LONGROPE}),
}
