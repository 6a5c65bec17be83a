"""Shared fixtures. Heavy fixtures (trained families, exported graphs) are built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def random_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A 4-expert random-delta Llama family in fp32 (base path, {name: path})."""
    from chmc.models.tiny.random_family import make_random_family

    return make_random_family(tmp_path_factory.mktemp("random_family"), n_experts=4, arch="llama")
