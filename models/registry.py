"""The architectures chmc exports and runs: one explicit table over the per-family spec files."""

from __future__ import annotations

from typing import Any

from chmc.errors import NotSupportedError
from chmc.models import llama
from chmc.models.spec import ArchSpec, DecoderConfig, decoder_config

SPECS: dict[str, ArchSpec] = {name: spec for spec in llama.SPECS for name in spec.architectures}


def architecture_of(config: dict[str, Any]) -> str:
    """config.json's architecture class, or the registered one for its model_type."""
    if config.get("architectures"):
        return str(config["architectures"][0])
    model_type = config.get("model_type", "unknown")
    for name, spec in SPECS.items():
        if spec.model_type == model_type:
            return name
    return str(model_type)


def get_spec(architecture: str) -> ArchSpec:
    spec = SPECS.get(architecture)
    if spec is None:
        raise NotSupportedError(
            f"not supported: {architecture} (ONNX export handles {sorted(SPECS)})")
    return spec


def describe(config: dict[str, Any]) -> tuple[ArchSpec, DecoderConfig]:
    """The family spec and the checked numbers of a config.json."""
    arch = architecture_of(config)
    spec = get_spec(arch)
    return spec, decoder_config(config, spec, arch)
