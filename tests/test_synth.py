"""The synthetic shapes are the hub models: their parameter counts are the published ones, and
chmc's own description of each architecture accepts their config.json."""

from __future__ import annotations

import math

import pytest

from chmc.errors import ChmcError
from chmc.models.registry import describe
from chmc.models.synth import SHAPES, shape_config, tensor_shapes

# parameters as the model cards and safetensors index totals give them (tied heads counted once)
PUBLISHED = {"llama-3.2-1b": 1_235_814_400, "qwen2.5-1.5b": 1_543_714_304,
             "mistral-7b": 7_241_732_096, "llama-3.1-8b": 8_030_261_248,
             "tinyllama-1.1b": 1_100_048_384}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shape_has_the_published_size_and_chmc_reads_it(shape: str) -> None:
    config = shape_config(shape)
    shapes = tensor_shapes(config)
    assert sum(math.prod(s) for s in shapes.values()) == PUBLISHED[shape]
    assert ("lm_head.weight" in shapes) == (not config["tie_word_embeddings"])
    spec, cfg = describe(config)
    assert (cfg.layers, cfg.kv_heads) == (config["num_hidden_layers"],
                                          config["num_key_value_heads"])


def test_reduced_depth_and_unknown_shapes() -> None:
    assert shape_config("llama-3.1-8b", layers=2)["num_hidden_layers"] == 2
    with pytest.raises(ChmcError, match="--shape 'llama-9b': not one of"):
        shape_config("llama-9b")
    with pytest.raises(ChmcError, match="--layers 0"):
        shape_config("llama-3.2-1b", layers=0)
