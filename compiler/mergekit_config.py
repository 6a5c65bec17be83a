"""The build request, typed: mergekit-style merge.yml files and the options that mirror them.

Accepted (mergekit's form):
  base_model: PATH
  models:                      # the base may be listed too (mergekit allows it); it is skipped
    - model: PATH
      name: math               # ours, optional: default is the path's last component
      parameters: {weight: 0.5, density: 0.5}
  merge_method: ties
  parameters: {lambda: 1.0, normalize: true}     # int8_mask is accepted and ignored
  dtype: float16               # (or out_dtype) the artifact's dtype
A model may be a PEFT adapter folder (LoRA / DoRA), alone or in mergekit's `BASE+ADAPTER` form.
Our own keys: groups, clustering, seed. Per-layer parameter lists and slices are mergekit
features chmc does not have: they are errors, named.

The file is read into pydantic models (`MergeFile`) with the YAML's line numbers kept, so a wrong
type, an unknown key, an out-of-range method parameter or a YAML syntax error is one line naming
the file, the line and the field. `BuildOptions` checks the same fields when they come from the
command line or from Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from chmc.compiler.methods import get_method
from chmc.errors import ChmcError
from chmc.formats.manifest import field_path, first_error

IGNORED_PARAMETERS = {"int8_mask"}  # mergekit memory/speed knobs with no effect on the result
Clustering = Literal["cosine", "error", "output-error"]  # grouping.CLUSTERINGS (a test checks)
FloatDtype = Literal["float64", "float32", "float16", "bfloat16"]  # safetensors.FLOAT_DTYPES


def _one_value(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        raise ValueError("a per-layer list or mapping; chmc takes one value per parameter "
                         "(per expert under models:)")
    return value


Scalar = Annotated[bool | int | float | str, BeforeValidator(_one_value)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    model: str
    name: str | None = None
    parameters: dict[str, Scalar] = {}


class MergeFile(_Strict):
    """A merge.yml as written."""

    base_model: str | None = None
    models: list[ModelEntry] = []
    merge_method: str | None = None
    parameters: dict[str, Scalar] = {}
    dtype: FloatDtype | None = None
    out_dtype: FloatDtype | None = None
    groups: Annotated[StrictInt, Field(ge=1)] | None = None
    clustering: Clustering | None = None
    seed: StrictInt | None = None
    tokenizer_source: str | None = None  # mergekit's; the base's tokenizer is what chmc copies
    chat_template: str | None = None


class BuildOptions(_Strict):
    """The types of a build's scalar options, whichever way they arrive (command line, Python);
    their ranges and names are the planner's to check (chmc.compiler.plan)."""

    groups: StrictInt | None = None
    clustering: StrictStr | None = None
    method: StrictStr | None = None
    seed: StrictInt | None = None
    dtype: StrictStr | None = None
    budget: StrictFloat | StrictInt | None = None


@dataclass
class MergeConfig:
    """The resolved request: experts in id order, method parameters global or per expert."""

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


def read_yaml(file: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """The document and the line (1-based) of every key and item, by its path."""
    try:
        text = file.read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ChmcError(f"{file}: cannot read the config ({e})") from None
    except yaml.YAMLError as e:  # the problem's line; at the end of the file, its last line
        mark = getattr(e, "problem_mark", None)
        last = max((i for i, line in enumerate(text.splitlines(), 1) if line.strip()), default=1)
        where = f"{file}:{min(mark.line + 1, last)}" if mark is not None else str(file)
        what = "; ".join(p for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p)
        raise ChmcError(f"{where}: invalid YAML ({what or str(e).splitlines()[0]})") from None
    lines: dict[tuple[Any, ...], int] = {}

    def walk(n: Any, path: tuple[Any, ...]) -> None:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                lines[(*path, key.value)] = key.start_mark.line + 1
                walk(value, (*path, key.value))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*path, i))

    if node is not None:
        walk(node, ())
    return data, lines


def _line(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    """The line of the deepest part of `loc` the YAML has."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _fail(file: Path, lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...],
          message: str) -> ChmcError:
    line = _line(lines, loc)
    return ChmcError(f"{file}{f':{line}' if line else ''}: {message}")


def load_merge_config(path: str | Path) -> MergeConfig:
    """Parse a mergekit-style YAML into a MergeConfig; every problem names the file, line and
    field."""
    file = Path(path)
    if not file.is_file():
        raise ChmcError(f"{file}: no such config file")
    raw, lines = read_yaml(file)
    if not isinstance(raw, dict):
        raise ChmcError(f"{file}: expected a mapping at the top level")
    try:
        doc = MergeFile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "extra_forbidden":
            known = ", ".join(MergeFile.model_fields)
            message = (f"key '{field_path(err['loc'])}' is not supported (chmc reads {known})")
        else:
            message = first_error(e)
        raise _fail(file, lines, tuple(err["loc"]), message) from None
    cfg = MergeConfig(base=doc.base_model, method=doc.merge_method, groups=doc.groups,
                      clustering=doc.clustering, dtype=doc.out_dtype or doc.dtype, seed=doc.seed)
    cfg.parameters = {k: v for k, v in doc.parameters.items() if k not in IGNORED_PARAMETERS}
    for i, entry in enumerate(doc.models):
        if doc.base_model is not None and Path(entry.model) == Path(doc.base_model) \
                and not entry.parameters:
            continue  # mergekit configs often list the base among the models
        model = adapter_path(entry.model, doc.base_model, file, lines, i)
        name = entry.name or Path(model).name
        if name in cfg.experts:
            raise _fail(file, lines, ("models", i), f"duplicate expert name '{name}' "
                        f"({cfg.experts[name]} and {entry.model}); give one a 'name:'")
        cfg.experts[name] = model
        for key, value in entry.parameters.items():
            cfg.expert_parameters.setdefault(key, {})[name] = value
    if doc.merge_method is not None:
        check_parameters(file, lines, doc, cfg)
    return cfg


def adapter_path(model: str, base: str | None, file: Path, lines: dict[tuple[Any, ...], int],
                 i: int) -> str:
    """mergekit's `BASE+ADAPTER` form names the adapter folder (an adapter folder given alone is
    recognised by its adapter_config.json); the model before '+' must be the base."""
    if "+" not in model or Path(model).exists():
        return model
    left, _, right = model.rpartition("+")
    if base is None or Path(left).resolve() != Path(base).resolve():
        raise _fail(file, lines, ("models", i, "model"), f"field 'models.{i}.model': '{model}' "
                    f"adds an adapter to {left}, but chmc folds adapters into base_model only")
    return right


def check_parameters(file: Path, lines: dict[tuple[Any, ...], int], doc: MergeFile,
                     cfg: MergeConfig) -> None:
    """The method's typed parameters, each value checked where the file gives it."""
    try:
        method = get_method(doc.merge_method or "")
    except ChmcError as e:
        raise _fail(file, lines, ("merge_method",), f"field 'merge_method': {e}") from None
    known = {p.name: p for p in method.params}
    places: list[tuple[tuple[Any, ...], str, Any]] = [
        (("parameters", k), k, v) for k, v in cfg.parameters.items()]
    places += [(("models", i, "parameters", k), k, v) for i, m in enumerate(doc.models)
               for k, v in m.parameters.items()]
    for loc, key, value in places:
        param = known.get("weight" if key == "weights" else key)
        if param is None:
            raise _fail(file, lines, loc, f"field '{field_path(loc)}': method "
                        f"'{method.name}' has no parameter '{key}' (it takes {', '.join(known)})")
        try:
            param.check(value, key)
        except ChmcError as e:
            raise _fail(file, lines, loc, f"field '{field_path(loc)}': {e}") from None


def with_overrides(cfg: MergeConfig, *, base: str | None, experts: dict[str, str],
                   parameters: dict[str, Any], **options: Any) -> MergeConfig:
    """A new config: command-line values win over the YAML's; experts from both are merged
    (names unique, the YAML's first). The scalar options are checked as BuildOptions."""
    try:
        BuildOptions(**{k: v for k, v in options.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise ChmcError(f"--{err['loc'][0]} {err['input']!r}: {err['msg']}") from None
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
        if value is not None and key != "budget":
            setattr(cfg, key, value)
    return cfg
