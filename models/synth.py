"""Synthetic expert families at the sizes users bring: the exact config.json and tensor names of
real hub models (llama-3.2-1b, qwen2.5-1.5b, mistral-7b, llama-3.1-8b, tinyllama-1.1b), bf16,
sharded safetensors with the hub's index, a byte-level tokenizer, and expert deltas shaped like
fine-tunes. Nothing is downloaded and nothing is trained: the weights are random, so these
families measure speed, memory and plumbing at size, not quality.

Per 2-D tensor W [out, in] and expert e, delta = ratio * ||W|| * (a low-rank part (rank 16) that
half comes from the expert's pair (experts 2j and 2j+1 share directions: clustering has rows to
find) + a sparse part (1% of entries) + dense noise), with ||delta|| / ||W|| drawn per tensor in
[0.5%, 5%]. 1-D tensors (norms, biases) get noise at the same ratio. Every tensor is seeded by
(seed, name, expert), so any one can be made alone (`expert_tensor`), and files are written
tensor by tensor: memory holds a few copies of the largest tensor, never a model.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from chmc.errors import ChmcError
from chmc.formats.outputs import staged_output
from chmc.formats.safetensors import ShardedSafetensorsWriter, TensorSpec
from chmc.progress import Stages

RANK = 16  # of each expert's low-rank part
SPARSE = 0.01  # fraction of entries in the sparse part
RATIO = (0.005, 0.05)  # ||delta|| / ||W|| per tensor
PARTS = {"low_rank": 0.6, "sparse": 0.2, "noise": 0.2}  # shares of ||delta||^2
SHARD_BYTES = 2 * 1024**3  # the hub's 1B-8B checkpoints come in 2-5 GB shards

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_COMMON = {"hidden_act": "silu", "initializer_range": 0.02, "torch_dtype": "bfloat16",
           "use_cache": True, "attention_dropout": 0.0}
# config.json as on the hub (meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-1.5B, mistralai/Mistral-7B-v0.1,
# meta-llama/Llama-3.1-8B, TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T)
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE, "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001},
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
        "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28,
        "bos_token_id": 151643, "eos_token_id": 151643},
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000,
        "eos_token_id": 128001},
    "tinyllama-1.1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2},
}


def shape_config(shape: str, layers: int | None = None) -> dict[str, Any]:
    """The hub config.json of `shape`, with `layers` decoder layers if given (reduced depth)."""
    if shape not in SHAPES:
        raise ChmcError(f"--shape {shape!r}: not one of {', '.join(SHAPES)}")
    config = copy.deepcopy({**_COMMON, **SHAPES[shape]})
    if layers is not None:
        if layers < 1:
            raise ChmcError(f"--layers {layers}: expected at least 1")
        config["num_hidden_layers"] = layers
        if "max_window_layers" in config:
            config["max_window_layers"] = layers
    return config


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes as transformers' own class has them (a tied lm_head is not
    stored, as on the hub), in its state_dict order."""
    import transformers

    # a copy: transformers' config classes write into the nested rope dict they are given
    cfg = transformers.AutoConfig.for_model(**copy.deepcopy(config))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


def _generator(seed: int, *key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, (seed, *key))).encode()))


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """fp32: matrices N(0, 0.02) (the models' init), vectors 1 + N(0, 0.05) (norms)."""
    g = _generator(seed, "base", name)
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def expert_delta(name: str, base: torch.Tensor, expert: int, seed: int) -> torch.Tensor:
    """fp32 delta of `expert` for tensor `name`, ||delta|| / ||base|| in RATIO (see the module)."""
    g = _generator(seed, "expert", name, expert)
    ratio = RATIO[0] + (RATIO[1] - RATIO[0]) * torch.rand((), generator=g).item()
    scale = ratio * float(torch.linalg.vector_norm(base))
    noise = torch.randn(base.shape, generator=g)
    if base.ndim == 1:
        return noise.mul_(scale / float(torch.linalg.vector_norm(noise)))
    out, inp = base.shape
    shared, own = _generator(seed, "pair", name, expert // 2), g
    low = sum(torch.randn(out, RANK, generator=src) @ torch.randn(RANK, inp, generator=src)
              for src in (shared, own))
    assert isinstance(low, torch.Tensor)
    count = max(1, int(SPARSE * base.numel()))
    sparse = torch.zeros(base.numel())
    sparse[torch.randint(0, base.numel(), (count,), generator=g)] = torch.randn(count, generator=g)
    delta = noise.mul_((PARTS["noise"] ** 0.5) / float(torch.linalg.vector_norm(noise)))
    for part, share in ((low, PARTS["low_rank"]), (sparse.view(out, inp), PARTS["sparse"])):
        delta.add_(part, alpha=share**0.5 / float(torch.linalg.vector_norm(part)))
    return delta.mul_(scale / float(torch.linalg.vector_norm(delta)))


def model_tensors(config: dict[str, Any], expert: int | None, seed: int,
                  dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's (expert None) or an expert's tensors, one at a time, in `dtype`."""
    for name, shape in tensor_shapes(config).items():
        w = base_tensor(name, shape, seed)
        if expert is not None:
            w.add_(expert_delta(name, w, expert, seed))
        yield name, w.to(dtype)


def save_byte_tokenizer(folder: Path, config: dict[str, Any]) -> None:
    """A byte-level BPE tokenizer (256 byte tokens, no merges) with the model's BOS/EOS at their
    real ids, as tokenizer.json plus the side files AutoTokenizer reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    bos, eos = config["bos_token_id"], config["eos_token_id"]
    names = {bos: "<|begin_of_text|>", eos: "<|end_of_text|>"}  # one when bos == eos (Qwen)
    vocab = {c: i for i, c in enumerate(byte_chars)} | {t: i for i, t in names.items()}
    tok = Tokenizer(models.BPE(vocab, []))  # the specials in the vocab keep their ids
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(names.values()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=names[bos], eos_token=names[eos],
                                   pad_token=names[eos], padding_side="left")
    fast.save_pretrained(str(folder))


def _byte_of(char: str) -> int:
    """GPT-2's byte <-> printable character map, inverted: printable bytes stand for themselves,
    the others were shifted to 256 + n in order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    code = ord(char)
    if code in printable:
        return code
    return [b for b in range(256) if b not in printable][code - 256]


def write_model(folder: Path, config: dict[str, Any], expert: int | None, seed: int,
                advance: Any = None, shard_bytes: int = SHARD_BYTES) -> None:
    """One model folder: config.json, tokenizer, model-0000i-of-0000n.safetensors shards and
    model.safetensors.index.json (one shard: model.safetensors, as the hub names it)."""
    folder.mkdir(parents=True)
    shapes = tensor_shapes(config)
    specs = [TensorSpec(n, s, "bfloat16") for n, s in shapes.items()]
    writer = ShardedSafetensorsWriter(folder, specs, shard_bytes, prefix="model")
    for name, tensor in model_tensors(config, expert, seed):
        writer.write(name, tensor)
        if advance is not None:
            advance(name)
    writer.close()
    if len(writer.shard_names) == 1:
        (folder / writer.shard_names[0]).rename(folder / "model.safetensors")
    else:
        index = {"metadata": {"total_size": writer.total_bytes}, "weight_map": writer.weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}))
    save_byte_tokenizer(folder, config)


def synth_family(shape: str, experts: int, out: str | Path, *, layers: int | None = None,
                 seed: int = 0, force: bool = False, progress: bool = True,
                 shard_bytes: int = SHARD_BYTES) -> Path:
    """Write base/ and experts/expert_<i>/ under `out` (staged: all or nothing), and family.json
    with what made them."""
    if experts < 1:
        raise ChmcError(f"--experts {experts}: expected at least 1")
    config = shape_config(shape, layers)
    stages = Stages(progress)
    n_tensors = len(tensor_shapes(config))
    with staged_output(out, force) as tmp:
        with stages.bar(f"writing {shape}", n_tensors * (experts + 1)) as advance:
            write_model(tmp / "base", config, None, seed, advance, shard_bytes)
            for e in range(experts):
                write_model(tmp / "experts" / f"expert_{e}", config, e, seed, advance,
                            shard_bytes)
        info = {"kind": "synthetic", "shape": shape, "layers": config["num_hidden_layers"],
                "experts": [f"expert_{e}" for e in range(experts)], "seed": seed,
                "ratio": list(RATIO), "rank": RANK, "sparse": SPARSE, "parts": PARTS}
        (tmp / "family.json").write_text(json.dumps(info, indent=1))
    return Path(out)
