"""mergekit YAML files as build requests, so mergekit users can reuse their merge configs.

Accepted (mergekit's form):
  base_model: PATH
  models:                      # the base may be listed too (mergekit allows it); it is skipped
    - model: PATH
      name: math               # ours, optional: default is the path's last component
      parameters: {weight: 0.5, density: 0.5}
  merge_method: ties
  parameters: {lambda: 1.0, normalize: true}     # int8_mask is accepted and ignored
  dtype: float16               # (or out_dtype) the artifact's dtype
Our own keys: groups, clustering, seed. Per-layer parameter lists, slices and lora models are
mergekit features chmc does not have: they are NotSupportedError, named.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from chmc.errors import ChmcError, NotSupportedError

TOP_KEYS = {"base_model", "models", "merge_method", "parameters", "dtype", "out_dtype", "groups",
            "clustering", "seed", "tokenizer_source", "chat_template"}
IGNORED_PARAMETERS = {"int8_mask"}  # mergekit memory/speed knobs with no effect on the result


@dataclass
class MergeConfig:
    base: str | None = None
    experts: dict[str, str] = field(default_factory=dict)
    method: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # global values
    expert_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)  # {key: {name: v}}
    groups: int | None = None
    clustering: str | None = None
    dtype: str | None = None
    seed: int | None = None

    def merge_parameters(self) -> dict[str, Any]:
        """Method parameters: per-expert values where given, the global value for the others."""
        out = dict(self.parameters)
        for key, given in self.expert_parameters.items():
            if key in self.parameters:
                out[key] = {n: given.get(n, self.parameters[key]) for n in self.experts}
            else:
                out[key] = dict(given)
        return out


def _scalar(value: Any, where: str, file: Path) -> Any:
    if isinstance(value, (list, dict)):
        raise NotSupportedError(f"{file}: '{where}' is a per-layer list or mapping; chmc takes one "
                                "value per parameter (per expert under models:)")
    return value


def load_merge_config(path: str | Path) -> MergeConfig:
    """Parse a mergekit-style YAML into a MergeConfig; every problem names the file and field."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ChmcError(f"{file}: no such config file")
    try:
        raw = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ChmcError(f"{file}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ChmcError(f"{file}: expected a mapping at the top level")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise NotSupportedError(f"{file}: key '{unknown[0]}' is not supported "
                                f"(chmc reads {', '.join(sorted(TOP_KEYS))})")
    cfg = MergeConfig(base=raw.get("base_model"), method=raw.get("merge_method"),
                      groups=raw.get("groups"), clustering=raw.get("clustering"),
                      dtype=raw.get("out_dtype", raw.get("dtype")), seed=raw.get("seed"))
    for key, value in (raw.get("parameters") or {}).items():
        if key not in IGNORED_PARAMETERS:
            cfg.parameters[key] = _scalar(value, f"parameters.{key}", file)
    models = raw.get("models") or []
    if not isinstance(models, list):
        raise ChmcError(f"{file}: 'models' must be a list of {{model: PATH}} entries")
    for i, entry in enumerate(models):
        _add_model(cfg, entry, f"models[{i}]", file)
    return cfg


def _add_model(cfg: MergeConfig, entry: Any, where: str, file: Path) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
        raise ChmcError(f"{file}: {where} needs 'model: PATH' (a path string)")
    model = entry["model"]
    if cfg.base is not None and Path(model) == Path(cfg.base) and not entry.get("parameters"):
        return  # mergekit configs often list the base among the models
    name = str(entry.get("name") or Path(model).name)
    if name in cfg.experts:
        raise ChmcError(f"{file}: duplicate expert name '{name}' "
                        f"({cfg.experts[name]} and {model}); give one a 'name:'")
    cfg.experts[name] = model
    for key, value in (entry.get("parameters") or {}).items():
        cfg.expert_parameters.setdefault(key, {})[name] = _scalar(
            value, f"{where}.parameters.{key}", file)


def with_overrides(cfg: MergeConfig, *, base: str | None, experts: dict[str, str],
                   parameters: dict[str, Any], **options: Any) -> MergeConfig:
    """A new config: command-line values win over the YAML's; experts from both are merged
    (names unique, the YAML's first)."""
    cfg = replace(cfg, experts=dict(cfg.experts), parameters=dict(cfg.parameters),
                  expert_parameters={k: dict(v) for k, v in cfg.expert_parameters.items()})
    for name, path in experts.items():
        if name in cfg.experts:
            raise ChmcError(f"duplicate expert name '{name}' ({cfg.experts[name]} and {path})")
        cfg.experts[name] = path
    if base is not None:
        cfg.base = base
    for key, value in parameters.items():
        if isinstance(value, dict):  # per expert, e.g. --weight math=0.7
            cfg.expert_parameters.setdefault(key, {}).update(value)
        else:  # a global value on the command line replaces the YAML's, per-expert ones too
            cfg.parameters[key] = value
            cfg.expert_parameters.pop(key, None)
    for key, value in options.items():
        if value is not None:
            setattr(cfg, key, value)
    return cfg
