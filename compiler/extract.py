"""`chmc extract`: one expert, as reconstructed from the artifact, as a plain Hugging Face folder.

The weights are bank[index[n, c], c] per row for merged tensors and the expert's own copy of the
stacked ones, streamed tensor by tensor into safetensors shards with a
`model.safetensors.index.json`, next to the artifact's config and tokenizer files. Tied
embeddings stay tied: the artifact never stores lm_head.weight for a tied model, and neither does
the extracted folder, so transformers re-ties it on load exactly as for the original checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from chmc.formats.artifact import Artifact
from chmc.formats.checkpoint import SHARD_INDEX, copy_side_files
from chmc.formats.outputs import check_output_path, staged_output
from chmc.formats.safetensors import ShardedSafetensorsWriter, TensorSpec


def extract(artifact: str | Path, expert: str | int, out: str | Path, *,
            force: bool = False) -> Path:
    """Write expert `expert` (name or id) of `artifact` as a loadable HF checkpoint at `out`."""
    art = Artifact(artifact)
    n = art.manifest.expert_index(expert)  # unknown names fail here, before anything is written
    check_output_path(out, force, inputs=[art.path])
    specs = [TensorSpec(name, tuple(e.shape), e.dtype) for name, e in art.manifest.tensors.items()]
    with staged_output(out, force, inputs=[art.path]) as tmp:
        writer = ShardedSafetensorsWriter(tmp, specs)
        for name, tensor in art.expert_state_dict(n):
            writer.write(name, tensor.contiguous())
        writer.close()
        index = {"metadata": {"total_size": writer.total_bytes}, "weight_map": writer.weight_map}
        (tmp / SHARD_INDEX).write_text(json.dumps(index, indent=1))
        copy_side_files(art.path, tmp)
    return Path(out)
