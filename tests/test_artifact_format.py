"""The artifact's storage layer: streamed safetensors shards, manifest checks, staged outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chmc.errors import ChmcError
from chmc.formats.artifact import FORMAT, MANIFEST, read_manifest, write_manifest
from chmc.formats.outputs import staged_output
from chmc.formats.safetensors import ShardedSafetensorsWriter, TensorSpec
from chmc.formats.safetensors import read_header as read_safetensors_header


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bank": torch.randn(2, 5, 3, generator=g).to(torch.bfloat16),
        "a.index": torch.randint(0, 2, (4, 5), generator=g, dtype=torch.uint8),
        "b.experts": torch.randn(4, 7, generator=g, dtype=torch.float16),
        "c.bank": torch.randn(3, 6, 2, generator=g),
    }


def test_streamed_shards_round_trip_through_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    specs = [TensorSpec(n, tuple(t.shape), str(t.dtype).removeprefix("torch."))
             for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=64)  # forces several shards
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    assert len(writer.shard_names) > 1
    loaded: dict[str, torch.Tensor] = {}
    for shard in writer.shard_names:
        read_safetensors_header(tmp_path / shard)  # our own validator accepts it
        loaded.update(load_file(tmp_path / shard))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype
        assert torch.equal(loaded[name], t), name
        assert writer.weight_map[name] in writer.shard_names


def test_writer_rejects_out_of_plan_tensor(tmp_path: Path) -> None:
    writer = ShardedSafetensorsWriter(tmp_path, [TensorSpec("x", (2, 2), "float32")])
    with pytest.raises(RuntimeError, match="expected"):
        writer.write("x", torch.zeros(3, 2))


def test_truncated_safetensors_is_named(tmp_path: Path) -> None:
    writer = ShardedSafetensorsWriter(tmp_path, [TensorSpec("x", (64, 64), "float32")])
    writer.write("x", torch.ones(64, 64))
    writer.close()
    file = tmp_path / writer.shard_names[0]
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ChmcError, match=r"tensor 'x'.*truncated"):
        read_safetensors_header(file)


def test_manifest_checks_format_and_version(tmp_path: Path, artifact_manifest) -> None:
    with pytest.raises(ChmcError, match="not a chmc artifact"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": 99}))
    with pytest.raises(ChmcError, match="format_version 99"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, artifact_manifest(["math", "code"]))
    manifest = read_manifest(tmp_path)
    assert manifest.experts[1].name == "code"
    assert manifest.expert_index("code") == 1
    assert manifest.expert_index(0) == 0
    with pytest.raises(ChmcError, match="unknown expert 'chat'"):
        manifest.expert_index("chat")
    with pytest.raises(ChmcError, match="expert id 2 is out of range"):
        manifest.expert_index(2)


def test_staged_output_is_all_or_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError), staged_output(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise ValueError("stage failed")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder remains

    with staged_output(out) as tmp:
        (tmp / "done.txt").write_text("v1")
        (tmp / MANIFEST).write_text("{}")  # what --force may replace: an output chmc wrote
    assert (out / "done.txt").read_text() == "v1"

    with pytest.raises(ChmcError, match="exists"), staged_output(out):
        pass
    with staged_output(out, force=True) as tmp:
        (tmp / "done.txt").write_text("v2")
    assert (out / "done.txt").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_weight_digest_is_remembered_until_a_file_changes(tmp_path: Path, monkeypatch) -> None:
    """files_sha256 is sha256 over (name, bytes) per file; it is read back from $CHMC_CACHE while
    the files' size, mtime and inode stay, and recomputed once one changes."""
    import hashlib
    import os

    from chmc.formats.digest import files_sha256

    monkeypatch.setenv("CHMC_CACHE", str(tmp_path / "cache"))
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    files[0].write_bytes(b"first" * 1000)
    files[1].write_bytes(b"second")
    plain = hashlib.sha256(b"a.safetensors" + b"first" * 1000 + b"b.safetensors" + b"second")
    assert files_sha256(files) == plain.hexdigest()
    (remembered,) = (tmp_path / "cache" / "hashes").iterdir()
    remembered.write_text("f" * 64)  # what a later call returns without reading the files
    assert files_sha256(files) == "f" * 64
    files[1].write_bytes(b"SECOND")  # same size; its mtime and ctime move
    stat = files[1].stat()
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = hashlib.sha256(b"a.safetensors" + b"first" * 1000 + b"b.safetensors" + b"SECOND")
    assert files_sha256(files) == changed.hexdigest()
