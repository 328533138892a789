"""One config base for all of cartlab: typed dataclasses, checked when made, built from dicts or
YAML, changed by dotted overrides (the OLMo-core pattern).

    @dataclass
    class OptimConfig(Config):
        lr: float = field(6e-4, gt=0)
        \"\"\"Peak learning rate.\"\"\"
        grad_clip: float | None = field(1.0, gt=0, none="null to disable clipping")

    OptimConfig.from_dict({"lr": 1e-3})
    OptimConfig.from_yaml("optim.yaml", overrides=["grad_clip=0.5"])
    OptimConfig(grad_clip=-1)   # ConfigError: grad_clip=-1 is not allowed: must be > 0, or null to disable clipping

When a config is made, every field is converted to its annotated type (an integral float is an
int, "1e-3" is a float, a dict is the nested config) and checked against the constraints
declared next to it (`ge`, `gt`, `le`, `lt`, `choices`); then `validate()` checks what involves
several fields. A float must always be finite. Every refusal is a `ConfigError` whose message is
one line naming the full dotted path, the value given and what is allowed: nested configs
prefix their parent's path (`optim.grad_clip`, `domains[1].ratio`), unknown keys are refused at
every level with the closest allowed name.

Overrides (`a.b.c=value`, value read as YAML) are resolved against the config's own fields, so
an unknown path is refused at once, and a comma-separated string given to a list field is a
list (`model.hooks=no_lti,no_lie`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, ClassVar

import yaml

__all__ = ["Config", "ConfigError", "field", "load_yaml", "marked_fields", "parse_override", "show"]


SELECTING = ("kind", "hooks")
"""Override keys that choose a section's class (a model family: `kind`, and `hooks` for LRT, stored
as kind "dense"); `from_dict` applies them first, so override order does not matter."""


class ConfigError(ValueError):
    """A value that a config cannot take. `path` is the dotted field path ('' for the whole
    config); the message is one line: `<path>=<value> is not allowed: <what is allowed>`."""

    def __init__(self, message: str, path: str = "", tail: str | None = None):
        super().__init__(message)
        self.path, self.tail = path, tail

    @classmethod
    def at(cls, path: str, tail: str) -> "ConfigError":
        """An error about the field `path`: the message is `path` followed by `tail`."""
        return cls(f"{path}{tail}", path, tail)

    @classmethod
    def value(cls, path: str, value: Any, allowed: str) -> "ConfigError":
        return cls.at(path, f"={show(value)} is not allowed: {allowed}")

    def within(self, prefix: str) -> "ConfigError":
        """The same error seen from the parent config whose field `prefix` holds this one."""
        if self.tail is None:
            return ConfigError(f"{prefix}: {self}", prefix)
        path = prefix + ("" if not self.path or self.path.startswith("[") else ".") + self.path
        return ConfigError.at(path, self.tail)


def show(value: Any) -> str:
    """A value as a user typed it (YAML-ish): -1, 1e-05, null, 'abc', [1, 2]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def field(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
          ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
          choices: Any = None, none: str | None = None, elide_default: bool = False, identity: bool = True,
          in_name: int | None = None) -> Any:
    """A dataclass field with its constraints. `choices` is a collection or a callable returning
    one (for registries filled at import time); `none` says what null means when the field
    is optional (shown in the error, e.g. "null to disable clipping"). `elide_default`: `to_dict`
    leaves the field out while it holds its default, so configs written before the field
    existed keep their identity (run names and hashes derive from `to_dict`).

    What a run is: `identity=False` marks an operational field (where results go, the device,
    logging cadence), which is not part of a run's identity; `in_name=k` marks a field that a
    derived run name shows when it differs from the preset, k-th among such fields
    (`marked_fields` collects both, through nested sections)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "none": none,
            "elide_default": elide_default or None, "identity": False if not identity else None,
            "in_name": in_name}
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={k: v for k, v in meta.items() if v is not None})


def marked_fields(cls: type, key: str) -> dict[str, Any]:
    """{dotted path: metadata value} of every field of the config class `cls`, and of its nested
    config sections (recursively), whose metadata holds `key` (e.g. 'identity', 'in_name')."""
    out = {}
    for f in dataclasses.fields(cls):
        if key in f.metadata:
            out[f.name] = f.metadata[key]
        tp = _strip_optional(_hints(cls)[f.name])
        if isinstance(tp, type) and issubclass(tp, Config) and dataclasses.is_dataclass(tp):
            out.update({f"{f.name}.{k}": v for k, v in marked_fields(tp, key).items()})
    return out


def load_yaml(path: str | Path, what: str = "config") -> Any:
    """Read a YAML file; a missing file or a syntax error is a one-line ConfigError naming the
    file (and line and column)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a {what} YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read this {what} file ({err.__class__.__name__}: {err})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], value read as YAML; '1e-3' is a float)."""
    key, sep, raw = str(item).partition("=")
    path = key.strip().split(".")
    if not sep or not all(p.strip() for p in path):
        raise ConfigError(f"override {item!r} is not of the form field=value (e.g. model.n_loops=8)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # e.g. an unbalanced bracket: let the field's type refuse it by name
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    return [p.strip() for p in path], value


class Config:
    """Base of every cartlab config dataclass (see the module docstring). Subclasses are
    `@dataclass`es; they may override `validate()` for checks that involve several fields,
    raising `self.reject(field, allowed)`."""

    _hints: ClassVar[dict[type, dict[str, Any]]] = {}
    tag: ClassVar[str | None] = None
    """A key that picks the subclass in `concrete` (e.g. 'kind' of a model family); not a field."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_field(f, getattr(self, f.name), _hints(type(self))[f.name]))
        self.validate()

    def validate(self) -> None:
        """Checks that involve several fields (after every field has its type)."""

    def reject(self, name: str, allowed: str) -> ConfigError:
        return ConfigError.value(name, getattr(self, name), allowed)

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def concrete(cls, d: Mapping) -> type:
        """The class a dict describes (a family base picks a subclass, e.g. by `kind`)."""
        return cls

    @classmethod
    def from_dict(cls, d: Any, overrides: list[str] | tuple[str, ...] = ()):
        """Build from a plain dict (as `to_dict()` writes it); `overrides` are 'a.b=value' strings
        applied first. Unknown fields at any level are refused."""
        if isinstance(d, cls) and not overrides:
            return d
        if not isinstance(d, Mapping):
            raise ConfigError(f"a {cls.__name__} must be a mapping of field: value, got {_kind(d)}")
        d = copy.deepcopy(dict(d))
        for item in sorted(overrides, key=lambda it: parse_override(it)[0][-1] not in SELECTING):
            cls.apply_override(d, item)
        target = cls.concrete(d)
        if target.tag:
            d.pop(target.tag, None)
        names = [f.name for f in dataclasses.fields(target) if f.init]
        for key in d:
            if key not in names:
                raise unknown_key(str(key), names)
        for f in dataclasses.fields(target):
            if f.init and f.name not in d and f.default is f.default_factory is dataclasses.MISSING:
                raise ConfigError.at(f.name, f" is missing: a {target.__name__} needs it")
        return target(**d)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
        d = load_yaml(path)
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ConfigError(f"{path}: a {cls.__name__} file must be a mapping of field: value, got {_kind(d)}")
        try:
            return cls.from_dict(d, overrides)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}", err.path, err.tail) from None

    @classmethod
    def apply_override(cls, d: dict, item: str) -> None:
        """Apply 'a.b.c=value' to the dict form `d` of this config, in place, refusing a path
        that names no field and splitting 'x,y' for list fields."""
        path, value = parse_override(item)
        node, owner = d, cls
        for i, part in enumerate(path):
            try:
                owner = owner.concrete(node) if isinstance(node, Mapping) else owner
            except ConfigError as err:
                raise (err.within(".".join(path[:i])) if i else err) from None
            fields = {f.name: f for f in dataclasses.fields(owner) if f.init}
            if part == owner.tag and i == len(path) - 1:
                node[part] = value
                return
            if part not in fields:
                raise unknown_key(".".join(path[: i + 1]), [".".join(path[:i] + [n]) for n in fields])
            tp = _strip_optional(_hints(owner)[part])
            if i == len(path) - 1:
                if isinstance(value, (str, int)) and typing.get_origin(tp) in (list, tuple):
                    value = [_scalar(v) for v in str(value).split(",") if v.strip()]
                node[part] = value
                return
            if not (isinstance(tp, type) and issubclass(tp, Config)):
                raise ConfigError(f"override {item!r}: {'.'.join(path[: i + 1])} is a {_type_name(tp)}, "
                                  f"not a section with fields")
            child = node.get(part)
            if isinstance(child, Config):
                child = child.to_dict()
            node[part] = child = dict(child) if isinstance(child, Mapping) else {}
            node, owner = child, tp

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data. A field marked `elide_default` is left out while it holds its
        default, compared as plain data (a section compares as the dict it is written as)."""
        out = {}
        for f in dataclasses.fields(self):
            value = _plain(getattr(self, f.name))
            if not (f.metadata.get("elide_default") and value == _default(f)):
                out[f.name] = value
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes):
        """A copy with `changes`, checked like any new config."""
        return type(self).from_dict({**self.to_dict(), **changes})


def _scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text.strip()
    return value if isinstance(value, (int, float, str)) else text.strip()


def unknown_key(path: str, allowed: list[str]) -> ConfigError:
    last = path.rsplit(".", 1)[-1]
    names = [a.rsplit(".", 1)[-1] for a in allowed]
    close = difflib.get_close_matches(last, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError.at(path, f" is not a field: {hint}allowed: {', '.join(sorted(names))}")


# -- checking one field ---------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    if cls not in Config._hints:
        Config._hints[cls] = typing.get_type_hints(cls)
    return Config._hints[cls]


def _check_field(f: dataclasses.Field, value: Any, tp: Any) -> Any:
    meta = f.metadata
    try:
        out = convert(value, tp, f.name)
    except ConfigError as err:
        allowed = _allowed(meta).removeprefix("must be ")
        if err.path != f.name or not allowed or "choices" in meta:
            raise
        raise ConfigError.at(err.path, f"{err.tail} {allowed}" if "none" not in meta else f"{err.tail}, or {meta['none']}") from None
    if out is None or isinstance(out, bool) or not isinstance(out, (int, float, str)):
        return out
    allowed = _allowed(meta)
    if allowed and not _satisfies(out, meta):
        raise ConfigError.value(f.name, value, allowed)
    return out


def _allowed(meta: Mapping) -> str:
    parts = [f"{sym} {meta[k]:g}" for k, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if k in meta]
    text = ""
    if "choices" in meta:
        text = "choose one of " + ", ".join(map(show, sorted(_choices(meta), key=str)))
    elif parts:
        text = "must be " + " and ".join(parts)
    if text and "none" in meta:
        text += f", or {meta['none']}"
    return text


def _choices(meta: Mapping):
    c = meta["choices"]
    return c() if callable(c) else c


def _satisfies(value: Any, meta: Mapping) -> bool:
    if "choices" in meta and value not in _choices(meta):
        return False
    if isinstance(value, str):
        return True
    return all((
        "gt" not in meta or value > meta["gt"], "ge" not in meta or value >= meta["ge"],
        "lt" not in meta or value < meta["lt"], "le" not in meta or value <= meta["le"],
    ))


def convert(value: Any, tp: Any, path: str) -> Any:
    """`value` as type `tp` (int, float, str, bool, X | None, list[X], tuple[X, ...], dict, a
    Config), or a ConfigError naming `path`."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return convert(value, rest[0], path)
        for a in rest:  # e.g. list[int] | str: the first shape the value has
            if _has_shape(value, a):
                return convert(value, a, path)
        raise ConfigError.value(path, value, f"must be {' or '.join(_type_name(a) for a in rest)}")
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError.value(path, value, f"must be a mapping of {tp.__name__} fields")
        try:
            return tp.from_dict(value)
        except ConfigError as err:
            raise err.within(path) from None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            example = f"[{value}]" if isinstance(value, str) else "[a, b]"
            raise ConfigError.value(path, value, f"must be a list (e.g. {example})")
        item = args[0] if args else Any
        out = [convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError.value(path, value, "must be a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError.value(path, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError.value(path, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError.value(path, value, "must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError.value(path, value, "must be a number")
        if not math.isfinite(value):
            raise ConfigError.value(path, value, "must be a finite number")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError.value(path, value, "must be a string")
        return value
    return value


def _has_shape(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(origin, type) and issubclass(origin, Config):
        return isinstance(value, (Mapping, origin))
    try:
        return isinstance(value, origin) and not (origin in (int, float) and isinstance(value, bool))
    except TypeError:
        return False


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "list"
    return getattr(tp, "__name__", str(tp)) if origin is None else str(tp)


def _kind(value: Any) -> str:
    return {list: "a list", tuple: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _default(f: dataclasses.Field) -> Any:
    """The field's default as plain data (what `to_dict` would write for it)."""
    if f.default_factory is not dataclasses.MISSING:
        return _plain(f.default_factory())
    return _plain(f.default)


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
