"""The architectures chmc exports and runs: one explicit table over the per-family spec files."""

from __future__ import annotations

from typing import Any

from chmc.errors import NotSupportedError
from chmc.formats.checkpoint import architecture
from chmc.models import gemma, llama, phi3, qwen3
from chmc.models.spec import ArchSpec, DecoderConfig, decoder_config

SPECS: dict[str, ArchSpec] = {name: spec for family in (llama, qwen3, gemma, phi3)
                              for spec in family.SPECS for name in spec.architectures}


def get_spec(architecture: str) -> ArchSpec:
    spec = SPECS.get(architecture)
    if spec is None:
        raise NotSupportedError(
            f"not supported: {architecture} (ONNX export handles {sorted(SPECS)})")
    return spec


def describe(config: dict[str, Any]) -> tuple[ArchSpec, DecoderConfig]:
    """The family spec and the checked numbers of a config.json."""
    arch = architecture(config)
    spec = get_spec(arch)
    return spec, decoder_config(config, spec, arch)
