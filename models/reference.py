"""transformers models as the reference: greedy continuations and answer NLL of a batch, padded
the way the runtime pads (chmc.models.inputs), with a full recompute per step (no cache to get
wrong). The evaluation and the tiny families' training both score with these."""

from __future__ import annotations

from typing import Any

import torch

from chmc.models.inputs import left_pad, positions


def padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and position ids [B, S] of left-padded sequences."""
    ids, mask = left_pad(seqs, pad_id)
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(positions(mask))


def greedy(model: Any, prompts: list[list[int]], max_new: int, eos_id: int,
           pad_id: int) -> list[list[int]]:
    """Greedy continuations (without the EOS) of a batch of prompts."""
    seqs = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with torch.no_grad():
        for _ in range(max_new):
            ids, mask, pos = padded(seqs, pad_id)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            for i, t in enumerate(logits[:, -1].argmax(-1).tolist()):
                if done[i]:
                    continue
                if t == eos_id:
                    done[i] = True
                else:
                    out[i].append(t)
                seqs[i].append(t)
            if all(done):
                break
    return out


def answer_nll(model: Any, prompts: list[list[int]], answers: list[list[int]],
               pad_id: int) -> torch.Tensor:
    """-log p of every answer token given the prompt, summed per example: [B]."""
    ids, mask, pos = padded([p + a for p, a in zip(prompts, answers)], pad_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        logp = logits.float().log_softmax(-1)
    width = ids.shape[1]
    sums = torch.zeros(len(prompts))
    for i, a in enumerate(answers):
        start = width - len(a)  # answer token j sits at start + j, predicted at start + j - 1
        targets = ids[i, start:]
        sums[i] = -logp[i, start - 1:width - 1].gather(-1, targets[:, None]).sum()
    return sums
