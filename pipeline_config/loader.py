"""The one loader of the three configs (data profile, training profile, planner).

YAML file -> ``--data-set``/``--train-set KEY=VALUE`` overrides -> values from command-line flags -> pydantic
validation. Every error names where the bad value came from: the file, the ``--data-set``/``--train-set``
or the flag, and the field's dotted path.
"""
from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

PACKAGE_DIR = Path(__file__).resolve().parent
# The embedded default (shipped samples, the tiny model on CPU): the one place the flows, the CLI and the loaders take it from.
DEFAULT_DATA_PROFILE = "sample"
DEFAULT_TRAIN_PROFILE = "cpu-tiny"

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file, override or flag is wrong; the message names the file and the field."""


class Section(BaseModel):
    """Base of every config section: unknown fields are errors, assignments are validated, and a float is a finite
    number (YAML's .inf and .nan are refused: `--train-set train.learning_rate=.inf` passed and crashed training)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def find_config(name_or_path: str | Path, folder: Path, what: str) -> Path:
    """A shipped config by name (``folder/<name>.yaml``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"{p}: {what} not found")
        return p
    candidate = folder / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(x.stem for x in folder.glob("*.yaml")))
        raise ConfigError(f"unknown {what} {str(name_or_path)!r}; shipped: {known}, or give a path to a .yaml file")
    return candidate


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of fields")
    return data


FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def field_path(dotted: str, label: str) -> list[str]:
    """A dotted field name, exactly: 'train.epochs'. Empty parts, dots at either end and spaces are refused (each was
    read as some other key, or applied silently)."""
    if not isinstance(dotted, str) or not FIELD_PATH.fullmatch(dotted):
        raise ConfigError(f"{label}: {dotted!r} is not a field name; write section.field with no spaces, e.g. train.epochs=3")
    return dotted.split(".")


def parse_override(item: str, flag: str = "--data-set") -> tuple[list[str], Any]:
    """'qa.max_in_flight=8' -> (['qa', 'max_in_flight'], 8). Values are parsed as YAML. ``flag`` is the option that gave
    it (--data-set or --train-set), named in errors."""
    if "=" not in item:
        raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE, e.g. section.field=8")
    key, raw = item.split("=", 1)
    keys = field_path(key, f"{flag} {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def overrides_dict(items: list[str] | tuple[str, ...], flag: str = "--data-set") -> dict[str, Any]:
    """``--data-set``/``--train-set`` items as the flows' typed overrides: {'qa.max_in_flight': 8}."""
    return {".".join(keys): value for keys, value in (parse_override(i, flag) for i in items)}


def override_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field an override can set, as a dotted path (a section's fields, never the section itself)."""
    out: list[str] = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += override_keys(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _put(data: dict, keys: list[str], value: Any, label: str) -> None:
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{label}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def _format_errors(err: ValidationError, source: str, labels: dict[str, str]) -> str:
    lines = [f"{source}: invalid configuration ({err.error_count()} error(s))"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        where = labels.get(loc, source)
        msg = "unknown field (check the spelling)" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        got = f" (got {e['input']!r})" if e["type"] not in ("missing", "extra_forbidden") and not isinstance(e.get("input"), dict) else ""
        if "password" in msg:   # a value refused for holding a secret is not repeated in the error
            got = ""
        # a check across fields (a model validator of the whole profile) has no one field to name: its message names them
        lines.append(f"  {where}: field '{loc}': {msg}{got}" if loc else f"  {where}: {msg}")
    return "\n".join(lines)


def load_config(model: type[M], path: Path, overrides: list[str] | tuple[str, ...] | dict[str, Any] = (),
                flags: dict[str, tuple[str, Any]] | None = None, defaults: dict[str, Any] | None = None,
                override_flag: str = "--data-set") -> M:
    """Validate ``path`` as ``model`` after overrides (``override_flag`` KEY=VALUE strings, or a mapping) and flag values.

    ``flags`` maps a dotted field to (the flag that set it, its value), so an error says ``--campus``
    rather than the file. ``defaults`` fill top-level fields the file leaves out (e.g. the name).
    """
    data = load_yaml(path)
    for k, v in (defaults or {}).items():
        data.setdefault(k, v)
    labels: dict[str, str] = {}
    # --data-set/--train-set strings (the CLI) or a mapping of dotted field -> value (the flows' parameters, from the UI)
    pairs = overrides.items() if isinstance(overrides, dict) else ((".".join(k), v) for k, v in (parse_override(i, override_flag) for i in overrides))
    for dotted, value in pairs:
        keys = field_path(dotted, f"override {dotted!r}")
        _put(data, keys, value, f"override {dotted!r}")
        labels[".".join(keys)] = f"override {'.'.join(keys)}" if isinstance(overrides, dict) else f"{override_flag} {'.'.join(keys)}"
    for dotted, (flag, value) in (flags or {}).items():
        _put(data, dotted.split("."), value, flag)
        labels[dotted] = flag
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path), labels)) from None


def field_doc(model: type[BaseModel], dotted: str) -> str:
    """The one description of a (possibly nested) field."""
    *parents, name = dotted.split(".")
    for p in parents:
        model = model.model_fields[p].annotation
    return model.model_fields[name].description or ""


def field_docs(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field with its type, default and description, nested sections as headings."""
    import json

    out: list[str] = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += ["", f"# {prefix}{name}: {f.description}"] + field_docs(ann, f"{prefix}{name}.")
            continue
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        shown = "(required)" if f.is_required() else json.dumps(default, ensure_ascii=False, default=lambda m: (
            m.model_dump(mode="json", exclude_defaults=True) if isinstance(m, BaseModel) else str(m)))
        out += [f"{prefix}{name} = {shown}", f"    {f.description}"]
        item = typing.get_args(ann)[0] if typing.get_origin(ann) is list and typing.get_args(ann) else None
        if isinstance(item, type) and issubclass(item, BaseModel):   # a list of sections: document one entry's fields
            out += ["", f"# {prefix}{name}[]: each entry"] + field_docs(item, f"{prefix}{name}[].")
    return out
