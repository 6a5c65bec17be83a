"""One merged model on PyTorch that serves every expert, chosen per batch row.

The artifact's banks and index tables are used as stored: every channel-merged Linear is
ChannelGatherMatMul (the Triton kernels on CUDA, the PyTorch reference op on CPU), the per-expert
vectors (norms, biases) are gathered by expert_id. The decoder is the ONNX graph's (same spec, same
numerics: chmc.compiler.onnx_graph) over a static KV cache, so on CUDA the decode step is captured
once in a CUDA graph and replayed: one launch per token for the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from chmc.compiler.onnx_graph import Weights
from chmc.errors import ChmcError
from chmc.models.spec import decoder_config, get_spec

CACHE_BLOCK = 64  # KV-cache capacity grows in these steps; each capacity captures one graph


def gather_matmul_op(device: torch.device) -> Any:
    """The ChannelGatherMatMul implementation for a device: Triton on CUDA, reference on CPU."""
    if device.type == "cuda":
        from chmc.plugins.channel_gather_matmul.kernels import channel_gather_matmul

        return channel_gather_matmul
    from chmc.plugins.channel_gather_matmul.reference import channel_gather_matmul_torch

    return channel_gather_matmul_torch


class MergedDecoder:
    """The decoder of an artifact with its tensors on `device`: forward() over a static cache."""

    def __init__(self, path: Path, device: str = "cpu", dtype: str | None = None):
        w = Weights(path)
        if not w.merged:
            raise ChmcError(f"{path}: not a chmc artifact (the merged torch path serves artifacts)")
        self.cfg = decoder_config(w.config)
        self.spec = get_spec(self.cfg.architecture)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype or w.manifest["dtype"])  # type: ignore[index]
        self.op = gather_matmul_op(self.device)
        self.banks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name: (bank, index int32)
        self.vectors: dict[str, torch.Tensor] = {}  # name: [N, D]
        for name in w.manifest["tensors"]:  # type: ignore[index]
            if len(w.shape(name)) == 2:
                bank, index = w.bank(name)
                self.banks[name] = (self._put(bank), index.to(torch.int32).contiguous().to(device))
            elif len(w.shape(name)) == 1:
                self.vectors[name] = self._put(w.read(f"{name}.experts"))
        self.experts = len(w.experts)
        hd = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64)
                                                  .float() / hd))
        self.inv_freq = inv_freq.to(self.device)  # float32, like the graph and transformers
        self.replays = 0  # decode steps served from a CUDA graph, all generations together

    def _put(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def new_cache(self, batch: int, capacity: int) -> list[torch.Tensor]:
        """Per layer, keys and values [2, B, kv_heads, capacity, head_dim]."""
        c = self.cfg
        return [torch.zeros(2, batch, c.kv_heads, capacity, c.head_dim, dtype=self.dtype,
                            device=self.device) for _ in range(c.layers)]

    # -- pieces --------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, prefix: str, expert_id: torch.Tensor) -> torch.Tensor:
        bank, index = self.banks[f"{prefix}.weight"]
        y = self.op(x.contiguous(), bank, index, expert_id)  # [B, S, out]
        bias = self.vectors.get(f"{prefix}.bias")
        return y if bias is None else y + bias[expert_id][:, None]

    def rms_norm(self, x: torch.Tensor, name: str, expert_id: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.cfg.eps)
        return h.to(self.dtype) * self.vectors[name][expert_id][:, None]

    def embed(self, ids: torch.Tensor, expert_id: torch.Tensor) -> torch.Tensor:
        bank, index = self.banks[self.spec.embed]
        group = index[expert_id[:, None], ids].long()  # [B, S]: each token row's bank
        return bank[group, ids]  # [B, S, D]

    def lm_head(self, h: torch.Tensor, expert_id: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if self.cfg.tie_word_embeddings or spec.lm_head not in self.banks:
            bank, index = self.banks[spec.embed]
            return self.op(h.contiguous(), bank, index, expert_id)
        return self.linear(h, spec.lm_head.removesuffix(".weight"), expert_id)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def attention(self, x: torch.Tensor, i: int, cos: torch.Tensor, sin: torch.Tensor,
                  allowed: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                  expert_id: torch.Tensor) -> torch.Tensor:
        c, names = self.cfg, {p: t.format(i=i) for p, t in self.spec.attention.items()}
        b, s, _ = x.shape
        q = self.rope(self.linear(x, names["q"], expert_id).view(b, s, c.heads, c.head_dim), cos, sin)
        k = self.rope(self.linear(x, names["k"], expert_id).view(b, s, c.kv_heads, c.head_dim),
                      cos, sin)
        v = self.linear(x, names["v"], expert_id).view(b, s, c.kv_heads, c.head_dim)
        cache[0].index_copy_(2, slots, k.transpose(1, 2))  # [B, kvh, cap, hd] at slots P..T-1
        cache[1].index_copy_(2, slots, v.transpose(1, 2))
        g = c.heads // c.kv_heads
        q = q.view(b, s, c.kv_heads, g, c.head_dim).permute(0, 2, 3, 1, 4)  # [B, kvh, g, S, hd]
        scores = torch.matmul(q, cache[0][:, :, None].transpose(-1, -2)).float()  # [B,kvh,g,S,cap]
        scores = scores * c.head_dim ** -0.5
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(self.dtype)
        ctx = torch.matmul(probs, cache[1][:, :, None])  # [B, kvh, g, S, hd]
        ctx = ctx.permute(0, 3, 1, 2, 4).reshape(b, s, c.heads * c.head_dim)
        return self.linear(ctx, names["o"], expert_id)

    def mlp(self, x: torch.Tensor, i: int, expert_id: torch.Tensor) -> torch.Tensor:
        names = {p: t.format(i=i) for p, t in self.spec.mlp.items()}
        gate = self.linear(x, names["gate"], expert_id)
        up = self.linear(x, names["up"], expert_id)
        return self.linear(gate * torch.sigmoid(gate) * up, names["down"], expert_id)

    def masks(self, mask: torch.Tensor, slots: torch.Tensor) -> dict[int | None, torch.Tensor]:
        """allowed [B, 1, 1, S, cap] per window: padding (mask [B, cap]), causal, sliding window."""
        kv = torch.arange(mask.shape[1], device=mask.device)  # [cap]
        q = slots[:, None]  # [S, 1]
        pad = mask.bool()[:, None, None, None, :]
        out = {}
        for window in set(self.cfg.windows):
            allowed = kv <= q
            if window is not None:
                allowed = allowed & (kv > q - window)
            out[window] = pad & allowed
        return out

    # -- the step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                mask: torch.Tensor, expert_id: torch.Tensor, cache: list[torch.Tensor],
                ) -> torch.Tensor:
        """Last-position logits [B, V] (float32) for ids/positions [B, S] written at cache slots
        [S]; mask [B, cap] marks the slots (prompt padding excluded) every query may attend to."""
        cfg, spec = self.cfg, self.spec
        freqs = positions.float()[..., None] * self.inv_freq  # [B, S, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None]  # [B, S, 1, hd]
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        allowed = self.masks(mask, slots)
        h = self.embed(ids, expert_id)
        for i in range(cfg.layers):
            x = self.rms_norm(h, spec.input_norm.format(i=i), expert_id)
            h = h + self.attention(x, i, cos, sin, allowed[cfg.windows[i]], cache[i], slots,
                                   expert_id)
            h = h + self.mlp(self.rms_norm(h, spec.post_attention_norm.format(i=i), expert_id), i,
                             expert_id)
        last = self.rms_norm(h[:, -1:], spec.final_norm, expert_id)  # [B, 1, D]
        return self.lm_head(last, expert_id)[:, 0].float()


class MergedState:
    """One generation: a static KV cache for the batch and, on CUDA, the captured decode graph."""

    def __init__(self, decoder: MergedDecoder, expert_ids: np.ndarray, route: Any):
        """`route(expert_ids, input_ids, attention_mask)` resolves -1 rows at the first step."""
        self.d, self.route = decoder, route
        self.expert_ids = np.asarray(expert_ids, dtype=np.int64)  # [B]; -1: routed at step 1
        self.cache: list[torch.Tensor] = []
        self.capacity = 0
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

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        d = self.d
        if self.capacity == 0:
            self.expert_ids = self.route(self.expert_ids, input_ids, attention_mask)
        batch, seq = input_ids.shape
        total = attention_mask.shape[1]
        self._grow(total)
        mask = np.zeros((batch, self.capacity), dtype=np.int64)
        mask[:, :total] = attention_mask
        host = {"ids": input_ids, "positions": position_ids, "mask": mask,
                "slots": np.arange(total - seq, total), "expert_id": self.expert_ids}
        if d.device.type != "cuda" or seq != 1:
            args = {k: _tensor(v, d.device) for k, v in host.items()}
            return d.forward(**args, cache=self.cache).cpu().numpy()
        if self.graph is None:
            self._capture(host)
        for k, v in host.items():
            self.static[k].copy_(_tensor(v))
        self.graph.replay()
        d.replays += 1
        return self.logits.cpu().numpy()

    def _capture(self, host: dict[str, np.ndarray]) -> None:
        """Warm up once eagerly (Triton autotuning, allocations), then capture the decode step.
        The warm-up writes this step's keys and values; the replay rewrites the same ones."""
        d = self.d
        self.static = {k: _tensor(v, d.device) for k, v in host.items()}
        d.forward(**self.static, cache=self.cache)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = d.forward(**self.static, cache=self.cache)


def _tensor(a: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if device is None else t.to(device)
