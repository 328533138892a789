"""The variant of a runs row that has none of its own: what groups runs as seeds of one configuration.

A run trained today records its variant (`TrainConfig.variant_fields()`). A row written without
one (a database of schema 1, a published or hand-made row) gets it here:

- a local row with a stored training config: rebuilt from that config by a *rebuilder* that the
  training layer registers (`register_variant_rebuilder`; `cartlab.train.config` does so on import),
  so the storage layer never imports training code;
- otherwise, or when the stored config no longer builds: a hash of its configuration columns
  (`config_variant`), labelled from those columns.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Iterable

import numpy as np

from cartlab.results.schema import CONFIG_COLUMNS

REBUILDERS: list[Callable[[dict], dict[str, str]]] = []
"""Functions `train_config_dict -> {variant, overrides, variant_label}`, registered from above."""


def register_variant_rebuilder(fn: Callable[[dict], dict[str, str]]) -> Callable[[dict], dict[str, str]]:
    """Register `fn(train) -> variant fields`, which rebuilds a stored training config (the `train`
    entry of a row's config_json) and returns its variant fields; it may raise when the config no
    longer builds (the row then falls back on its columns). Registering the same function twice is
    a no-op."""
    if fn not in REBUILDERS:
        REBUILDERS.append(fn)
    return fn


def variant_of(row: dict) -> dict[str, str]:
    """The variant fields of a runs row written without them: a local run's are rebuilt from its
    stored training config (the registered rebuilder, the same fields a run trained today records);
    a published row's, or one whose config is missing or no longer builds, are a hash of its
    configuration columns. Raises ValueError when a local row has a stored training config but no
    rebuilder is registered (nothing imported the training layer), rather than guess."""
    if row.get("source") != "published":
        try:
            train = json.loads(row.get("config_json") or "{}").get("train")
        except (ValueError, AttributeError):
            train = None
        if isinstance(train, dict):
            if not REBUILDERS:
                raise ValueError(f"run {row.get('run_id')!r}: its variant must be rebuilt from its stored training "
                                 f"config (a database of schema 1), which needs the training layer: import "
                                 f"cartlab.train before opening it (`cartlab train`, `ablate` and `report` do)")
            for rebuild in REBUILDERS:
                try:
                    return rebuild(train)
                except Exception:  # noqa: BLE001 - any reason an old config no longer builds
                    pass
        # A row without a stored training config that builds with this cartlab (written by hand,
        # or by a version whose fields have since changed): fall back on a hash of its descriptive
        # columns. Fields set by hand are then invisible (overrides ""), so such a row is told from
        # a baseline by its hooks alone; its label says the variant comes from the columns.
    fields = {"variant": config_variant(row), "overrides": "", "variant_label": column_label(row)}
    if row.get("source") != "published":
        fields["variant_label"] += " (variant from columns)"
    return fields


def plain(value):
    """A cell as a JSON value: None for NaN/None, an int for an integral number."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_variant(row) -> str:
    """The variant key of a row that has no variant of its own (the paper's tables of sections 5-7,
    synthetic frames): a 12-hex sha256 of its configuration columns (CONFIG_COLUMNS, hooks
    canonical) plus `overrides` when it is not "". Two such rows are seeds of one configuration
    iff every one of those columns is equal (NaN = NaN)."""
    key = {c: plain(row.get(c)) for c in CONFIG_COLUMNS}
    key["hooks"] = format_hooks(key["hooks"] or "")
    overrides = plain(row.get("overrides")) or ""
    if overrides:
        key["overrides"] = overrides
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def parse_hooks(hooks, known: Iterable[str] = ()) -> tuple[str, ...]:
    """Hook names of a `runs.hooks` string: "no_lti,unshare_core" -> ("no_lti", "unshare_core");
    a malformed name is a ValueError (listing `known` names when given)."""
    if hooks is None or (isinstance(hooks, float) and np.isnan(hooks)):
        return ()
    if not isinstance(hooks, str):
        raise ValueError(f"runs.hooks: expected a string, got {hooks!r}")
    names = tuple(h.strip() for h in hooks.split(",") if h.strip())
    for h in names:
        if not h.replace("_", "").isalnum():
            raise ValueError(f"runs.hooks: bad hook name {h!r}; known names: {list(known)}")
    return names


def format_hooks(hooks) -> str:
    """The canonical `runs.hooks` string: sorted, de-duplicated, comma-joined ("" for none)."""
    if isinstance(hooks, str):
        hooks = parse_hooks(hooks)
    return ",".join(sorted(set(hooks)))


def column_label(row, *, size: bool = True) -> str:
    """"cart d=1024 P=6 R=6 [no_lti] {state_gate=residual}" or "dense d=1024 L=7" from a row's
    configuration columns (without the width and Dense's depth when `size` is False)."""
    overrides = row.get("overrides") if hasattr(row, "get") else None
    tail = f" {{{overrides}}}" if isinstance(overrides, str) and overrides else ""
    return _shape_label(row, size=size) + tail


def _shape_label(row, *, size: bool = True) -> str:
    def num(key):
        value = plain(row.get(key))
        return "?" if value is None else str(value)

    width = f" d={num('d_model')}" if size else ""
    if row.get("model") == "dense":
        s = f"dense{width} L={num('n_layers')}" if size else "dense"
    else:
        s = f"{row.get('model') or 'cart'}{width} P={num('prelude_layers')} R={num('n_loops')}"
    return s + (f" [{row['hooks']}]" if isinstance(row.get("hooks"), str) and row["hooks"] else "")
