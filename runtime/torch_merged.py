"""One merged model on PyTorch that serves every expert, chosen per batch row.

The artifact's banks and index tables are used as stored: every channel-merged Linear is
ChannelGatherMatMul (the Triton kernels on CUDA, the PyTorch reference op on CPU), the per-expert
vectors (norms, biases) are gathered by expert_id. The forward pass is chmc.models.decoder's, the
same the ONNX graph is built from, over a static KV cache, so on CUDA the decode step is captured
once in a CUDA graph and replayed: one launch per token for the whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from chmc.errors import ChmcError
from chmc.formats.artifact import Artifact
from chmc.formats.checkpoint import read_config
from chmc.formats.weights import ModelWeights
from chmc.models import decoder
from chmc.models.registry import describe
from chmc.models.spec import ArchSpec
from chmc.plugins.channel_gather_matmul.torch_op import implementation, torch_op

CACHE_BLOCK = 64  # KV-cache capacity grows in these steps; each capacity captures one graph
Route = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (ids, input_ids, mask)


class MergedDecoder:
    """The decoder of an artifact with its tensors on `device`: forward() over a static cache."""

    def __init__(self, config: dict[str, Any], banks: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 vectors: dict[str, torch.Tensor], experts: int, device: str = "cpu",
                 dtype: str = "float32", fuse: bool = True, compile: str | None = None):
        """`banks`: name -> (bank [K, out, in], index [N, out]); `vectors`: name -> [N, D]; both
        moved to `device` in `dtype` (indices as int32). `fuse`: concatenate the projections
        that read one input (fuse_projections). `compile`: a torch.compile backend ("inductor")
        for the decode step, which then fuses the elementwise work between the gather-matmuls
        (norms, RoPE, casts, the mask) into a few kernels; None: the step runs op by op."""
        self.spec, self.cfg = describe(config)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        # a compiled step needs the op as one opaque node (torch_op); without it, skip that layer
        self.op = torch_op() if compile else implementation(self.device)
        self.banks = {name: (self._put(bank), index.to(torch.int32).contiguous().to(device))
                      for name, (bank, index) in banks.items()}
        self.vectors = {name: self._put(v) for name, v in vectors.items()}
        if fuse:
            self.spec = fuse_projections(self.spec, self.cfg.layers, self.banks, self.vectors)
        self.experts = experts
        # array constants (RoPE frequencies) made on the device once: a copy from the host
        # cannot be captured in a CUDA graph
        self.constants: dict[tuple[float, ...], torch.Tensor] = {}
        self.replays = 0  # decode steps served from a CUDA graph, all generations together
        # traced whole; a batch or cache capacity that changes makes that dim symbolic (one
        # recompile), while the weights' shapes stay constants
        self.compiled = (torch.compile(self.forward, backend=compile, fullgraph=True)
                         if compile else None)
        self.warm = False  # an eager step has made the constants and tuned the kernels
        # decode attention reading only the filled slots (runtime.decode_attention; triton is on
        # CUDA machines only); None: SDPA over the capacity
        self.decode_attention: Any = None
        if self.device.type == "cuda":
            from chmc.runtime.decode_attention import decode_attention_op

            self.decode_attention = decode_attention_op()

    @classmethod
    def from_artifact(cls, artifact: Artifact, device: str = "cpu",
                      dtype: str | None = None, fuse: bool = True,
                      compile: str | None = None) -> MergedDecoder:
        w = ModelWeights(artifact)
        names = artifact.tensor_names
        dtype = dtype or artifact.manifest.dtype or "float32"

        def put(t: torch.Tensor) -> torch.Tensor:  # one tensor at a time in host memory
            return t.to(device=device, dtype=getattr(torch, dtype))

        banks = {}
        for n in (n for n in names if len(w.shape(n)) == 2):
            bank, index = w.bank(n)
            banks[n] = (put(bank), index.to(device))
        vectors = {n: put(w.stacked(n)) for n in names if len(w.shape(n)) == 1}
        return cls(read_config(artifact.path), banks, vectors, len(w.experts), device, dtype,
                   fuse, compile)

    def _put(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def new_cache(self, batch: int, capacity: int) -> list[torch.Tensor]:
        """Per layer, keys and values [2, B, kv_heads, capacity, head_dim]."""
        c = self.cfg
        return [torch.zeros(2, batch, c.kv_heads, capacity, c.head_dim, dtype=self.dtype,
                            device=self.device) for _ in range(c.layers)]

    @torch.no_grad()  # not inference_mode: its tensors cannot be traced by torch.compile
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                mask: torch.Tensor, expert_id: torch.Tensor, cache: list[torch.Tensor],
                causal: bool = False) -> torch.Tensor:
        """Last-position logits [B, V] (float32) for ids/positions [B, S] written at cache slots
        [S]; mask [B, cap] marks the slots (prompt padding excluded) every query may attend to.
        `causal`: the caller knows the slots are 0..S-1 with no padding and no window shorter
        than S, so attention is plain causal over them (a flash kernel, no mask)."""
        ops = TorchOps(self, expert_id, slots, mask, cache, causal)
        return decoder.logits(ops, self.spec, self.cfg, ids, positions)[:, 0].float()

    def decode(self, **inputs: Any) -> torch.Tensor:
        """forward() of a decode step, compiled where asked once an eager step has run: a traced
        step finds the constants that step made (their host copy cannot be in a CUDA graph)."""
        if self.compiled is None or not self.warm:
            self.warm = True
            return self.forward(**inputs)
        return self.compiled(**inputs)


# Projections that read the same input: (the spec's block, the fused name, its parts in order).
FUSIONS = (("attention", "qkv", ("q", "k", "v")), ("mlp", "gate_up", ("gate", "up")))


def fuse_projections(spec: ArchSpec, layers: int,
                     banks: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     vectors: dict[str, torch.Tensor]) -> ArchSpec:
    """Concatenate q/k/v and gate/up into one bank per layer, in place in `banks` and `vectors`,
    so a step launches one kernel for each group instead of three and two; the decoder splits
    the output as it does for Phi-3's fused Linears, and the spec returned names the fused
    tensors. Done only where every layer's parts have the same K (a budget build may give them
    different K: they stay apart) and all or none of them have a bias."""
    for block, fused, parts in FUSIONS:
        names = getattr(spec, block)
        if fused in names or not all(p in names for p in parts):
            continue
        per_layer = [[names[p].format(i=i) for p in parts] for i in range(layers)]

        def fusable(prefixes: list[str]) -> bool:
            if not all(f"{p}.weight" in banks for p in prefixes):
                return False
            biased = {f"{p}.bias" in vectors for p in prefixes}
            return len({banks[f"{p}.weight"][0].shape[0] for p in prefixes}) == 1 \
                and len(biased) == 1
        if not all(map(fusable, per_layer)):
            continue
        template = names[parts[0]].rsplit(".", 1)[0] + f".{fused}_proj"  # ...self_attn.qkv_proj
        for i, prefixes in enumerate(per_layer):
            pairs = [banks.pop(f"{p}.weight") for p in prefixes]
            banks[f"{template.format(i=i)}.weight"] = (
                torch.cat([b for b, _ in pairs], dim=1), torch.cat([x for _, x in pairs], dim=1))
            if f"{prefixes[0]}.bias" in vectors:
                vectors[f"{template.format(i=i)}.bias"] = torch.cat(
                    [vectors.pop(f"{p}.bias") for p in prefixes], dim=1)
        merged = {fused: template, **{k: v for k, v in names.items() if k not in parts}}
        spec = (replace(spec, attention=merged) if block == "attention"
                else replace(spec, mlp=merged))
    return spec


class TorchOps:
    """chmc.models.decoder.Ops over torch tensors, for one step of a MergedDecoder."""

    def __init__(self, d: MergedDecoder, expert_id: torch.Tensor, slots: torch.Tensor,
                 mask: torch.Tensor, cache: list[torch.Tensor], causal: bool = False):
        self.d, self.expert_id, self.slots, self.mask, self.kv = d, expert_id, slots, mask, cache
        self.causal = causal

    # -- weights: banks and index tables as stored, the expert per batch row -------------------
    def has(self, name: str) -> bool:
        return name in self.d.banks or name in self.d.vectors

    def project(self, x: torch.Tensor, weight: str) -> torch.Tensor:
        bank, index = self.d.banks[weight]
        return self.d.op(x.contiguous(), bank, index, self.expert_id)  # [B, S, out]

    def vector(self, name: str, rank: int = 3) -> torch.Tensor:
        v = self.d.vectors[name][self.expert_id]  # [B, D]
        return v.view(v.shape[0], *([1] * (rank - 2)), v.shape[1])

    def embed(self, ids: torch.Tensor, weight: str) -> torch.Tensor:
        bank, index = self.d.banks[weight]
        group = index[self.expert_id[:, None], ids].long()  # [B, S]: each token row's bank
        return bank[group, ids]  # [B, S, D]

    # -- the static cache: slots P..T-1 of a capacity-sized cache, masks over the capacity -----
    def masks(self, windows: set[int | None]) -> dict[int | None, torch.Tensor]:
        kv = torch.arange(self.mask.shape[1], device=self.mask.device)  # [cap]
        q = self.slots[:, None]  # [S, 1]
        pad = self.mask.bool()[:, None, None, None, :]
        own = kv == q  # a padding query attends to its own slot: no row is fully masked
        out = {}
        for window in windows:
            allowed = kv <= q
            if window is not None:
                allowed = allowed & (kv > q - window)
            out[window] = (pad & allowed) | own
        return out

    def cache(self, layer: int, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.kv[layer]
        cache[0].index_copy_(2, self.slots, k)  # [B, G, cap, hd] at slots P..T-1
        cache[1].index_copy_(2, self.slots, v)
        return cache[0], cache[1]

    def logit_positions(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, -1:]  # the next token's only

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
               window: int | None, scale: float) -> torch.Tensor:
        """A decode step on CUDA: runtime.decode_attention, which reads only the filled slots.
        Otherwise torch's scaled_dot_product_attention (flash or memory-efficient kernels on
        CUDA): causal over the first S slots where the caller said so, else the R query heads of
        a key/value head as one block of R * S queries under the mask (keys are not repeated)."""
        b, g, r, s, hd = q.shape
        if s == 1 and self.d.decode_attention is not None:
            out = self.d.decode_attention(q.reshape(b, g, r, hd), k, v, self.mask, self.slots,
                                          scale, window or 0)
            return out.reshape(b, g, r, s, hd)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if self.causal:
            out = sdpa(q.reshape(b, g * r, s, hd), k[:, :, :s], v[:, :, :s], is_causal=True,
                       scale=scale, enable_gqa=True)
        else:
            mask = allowed.expand(b, 1, r, s, allowed.shape[-1]).reshape(b, 1, r * s, -1)
            out = sdpa(q.reshape(b, g, r * s, hd), k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, g, r, s, hd)

    # -- arithmetic and layout -----------------------------------------------------------------
    def const(self, value: float | tuple[float, ...]) -> Any:
        if not isinstance(value, tuple):
            return value  # a Python scalar: torch keeps the tensor's dtype
        if value not in self.d.constants:  # made by an eager step, found by a traced one
            self.d.constants[value] = torch.tensor(value, dtype=torch.float32,
                                                   device=self.d.device)
        return self.d.constants[value]

    def add(self, a: Any, b: Any) -> torch.Tensor:
        return a + b

    def sub(self, a: Any, b: Any) -> torch.Tensor:
        return a - b

    def mul(self, a: Any, b: Any) -> torch.Tensor:
        return a * b

    def div(self, a: Any, b: Any) -> torch.Tensor:
        return a / b

    def neg(self, x: torch.Tensor) -> torch.Tensor:
        return -x

    def sqrt(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def tanh(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    def cos(self, x: torch.Tensor) -> torch.Tensor:
        return x.cos()

    def sin(self, x: torch.Tensor) -> torch.Tensor:
        return x.sin()

    def where(self, cond: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
        return torch.where(cond, a, b)

    def greater(self, a: Any, b: Any) -> torch.Tensor:
        return torch.gt(a, b)

    def max(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return x.amax(axis, keepdim=True)

    def mean(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return x.mean(axis, keepdim=True)

    def softmax(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.softmax(x, dim=axis)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)

    def upcast(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def downcast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.d.dtype)

    def int_to_float(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def reshape(self, x: torch.Tensor, shape: list[int]) -> torch.Tensor:
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])

    def transpose(self, x: torch.Tensor, perm: list[int]) -> torch.Tensor:
        return x.permute(perm)

    def unsqueeze(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return x.unsqueeze(axis)

    def concat(self, xs: list[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(xs, dim=axis)

    def split(self, x: torch.Tensor, sizes: list[int], axis: int) -> list[torch.Tensor]:
        return list(torch.split(x, sizes, dim=axis))


class MergedState:
    """One generation: a static KV cache for the batch and, on CUDA, the captured decode graph."""

    def __init__(self, decoder: MergedDecoder, expert_ids: np.ndarray, route: Route):
        """`route(expert_ids, input_ids, attention_mask)` resolves ROUTED rows at the first step."""
        self.d, self.route = decoder, route
        self.expert_ids = np.asarray(expert_ids, dtype=np.int64)  # [B]; -1: routed at step 1
        self.cache: list[torch.Tensor] = []
        self.capacity = 0
        self.total = 0  # cache slots in use (the attention mask's width at the last step)
        self.graph: Any = None

    def _grow(self, total: int) -> None:
        """Capacity for `total` slots; a new capacity drops the captured graph (its shapes)."""
        if total <= self.capacity:
            return
        capacity = -(-max(total, 2 * self.capacity) // CACHE_BLOCK) * CACHE_BLOCK
        cache = self.d.new_cache(len(self.expert_ids), capacity)
        for new, old in zip(cache, self.cache):
            new[..., : self.capacity, :] = old
        self.cache, self.capacity, self.graph = cache, capacity, None

    def _regroup(self, parts: list[tuple[MergedState, torch.Tensor]], width: int) -> None:
        """A new cache of `width` slots from (state, its rows) parts, each part's last used
        slots right-aligned; a new batch drops the captured graph (its shapes)."""
        capacity = -(-width // CACHE_BLOCK) * CACHE_BLOCK
        rows = sum(len(r) for _, r in parts)
        cache = self.d.new_cache(rows, capacity)
        start = 0
        for state, r in parts:
            used = min(state.total, width)
            for new, old in zip(cache, state.cache):
                new[:, start:start + len(r), :, width - used:width] = \
                    old[:, r, :, state.total - used:state.total]
            start += len(r)
        self.cache, self.capacity, self.total, self.graph = cache, capacity, width, None

    def keep(self, rows: np.ndarray, width: int) -> None:
        """Only `rows` stay, with the last `width` cache slots (the scheduler's batch)."""
        self._regroup([(self, torch.as_tensor(rows, device=self.d.device))], width)
        self.expert_ids = self.expert_ids[rows]

    def join(self, other: MergedState, width: int) -> None:
        """Append `other`'s rows; both caches left-padded to `width` slots."""
        dev = self.d.device
        self._regroup([(self, torch.arange(len(self.expert_ids), device=dev)),
                       (other, torch.arange(len(other.expert_ids), device=dev))], width)
        self.expert_ids = np.concatenate([self.expert_ids, other.expert_ids])

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        """Last-position logits [B, V] float32; a replayed step's are a view of a host buffer
        that the state's next step overwrites (callers sample from them at once)."""
        d = self.d
        if self.capacity == 0:
            self.expert_ids = self.route(self.expert_ids, input_ids, attention_mask)
        batch, seq = input_ids.shape
        total = self.total = attention_mask.shape[1]
        self._grow(total)
        mask = np.zeros((batch, self.capacity), dtype=np.int64)
        mask[:, :total] = attention_mask
        host = {"ids": input_ids, "positions": position_ids, "mask": mask,
                "slots": np.arange(total - seq, total), "expert_id": self.expert_ids}
        if d.device.type != "cuda" or seq != 1:
            args = {k: _tensor(v, d.device) for k, v in host.items()}
            if seq == 1:
                return d.decode(**args, cache=self.cache).cpu().numpy()
            causal = total == seq and bool(attention_mask.all()) and all(
                w is None or w >= seq for w in d.cfg.windows)
            return d.forward(**args, cache=self.cache, causal=causal).cpu().numpy()
        if self.graph is None:
            self._capture(host)
        for k, v in host.items():
            self.static[k].copy_(_tensor(v))
        self.graph.replay()
        d.replays += 1
        self.host_logits.copy_(self.logits)  # valid until this state's next step
        return self.host_logits.numpy()

    def _capture(self, host: dict[str, np.ndarray]) -> None:
        """Warm up (Triton autotuning, allocations, and where asked the compile), then capture
        the decode step. The warm-up writes this step's keys and values; the replay rewrites the
        same ones."""
        d = self.d
        self.static = {k: _tensor(v, d.device) for k, v in host.items()}
        for _ in range(2):  # eager, then (where asked) compiled: never compile while capturing
            d.decode(**self.static, cache=self.cache)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = d.decode(**self.static, cache=self.cache)
        # page-locked: a pageable copy of the [B, V] logits stages through a bounce buffer
        self.host_logits = torch.empty(self.logits.shape, dtype=self.logits.dtype,
                                       pin_memory=True)


def _tensor(a: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if device is None else t.to(device)


def require_artifact(folder: Any) -> Artifact:
    if not isinstance(folder, Artifact):
        raise ChmcError(f"{folder.path}: merged=True serves a chmc artifact; this is a plain "
                        "checkpoint")
    return folder
