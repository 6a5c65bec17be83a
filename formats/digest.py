"""The sha256 that identifies a model's weight files in an artifact's manifest, remembered in
$CHMC_CACHE/hashes by the files' paths, sizes, mtimes and inodes: rebuilding from the same
experts (another K, method or budget) does not read every byte again, which costs 1-2 s per GB.
Like git's index, a file rewritten in place with the same size and mtime keeps its old hash;
touching it is enough to have it read again.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import suppress
from pathlib import Path

from chmc.cache import cache_root


def files_sha256(files: list[Path]) -> str:
    """sha256 over each file's name and bytes, in the order given."""
    key = _stat_key(files)
    remembered = cache_root() / "hashes" / f"{key}.sha256"
    with suppress(OSError):
        return remembered.read_text().strip()
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    digest = h.hexdigest()
    if _stat_key(files) == key:  # not remembered if a file changed while it was read
        with suppress(OSError):
            remembered.parent.mkdir(parents=True, exist_ok=True)
            partial = remembered.with_name(f"{key}.{os.getpid()}.partial")
            partial.write_text(digest)
            os.replace(partial, remembered)
    return digest


def _stat_key(files: list[Path]) -> str:
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                      st.st_dev])
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]
