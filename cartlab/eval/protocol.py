"""The protocol of a downstream score: everything that makes two evaluations of one checkpoint
give different numbers, stored with every score so a reader can reproduce it.

A score without its protocol is the most common irreproducible number in looped-LM papers
(few-shot formatting, a chat template or system prompt, the loop count, a document limit).
`Protocol` holds those fields; its `key` (a short hash of them all) is part of the downstream
table's key, so one checkpoint scored under two protocols is two rows, and a score table gives
each protocol its own column (`score_table`) instead of mixing them in one.

Per task, the row also records the task's version and a hash of the task config lm-eval ran
(`task_fingerprint`), so a task whose prompt or metric changed between lm-eval releases is told
apart too.

Named, pinned protocols (`cartlab eval --preset NAME`) are YAML files shipped with cartlab
(data/protocols/): `local` (the offline tasks), `paper` (section 7.5: HellaSwag, ARC-Challenge,
LAMBADA, PIQA at 0 and 5 shots) and `variable-r` (section 7.4's R sweep).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from cartlab import resources

NONE = "none"
"""How an absent chat template or system prompt is recorded."""


@dataclass(frozen=True)
class Protocol:
    """How a score was produced (one lm-eval call over one checkpoint)."""

    lm_eval_version: str
    num_fewshot: int
    fewshot_seed: int
    """lm-eval's `fewshot_random_seed`: which examples a k-shot prompt draws."""
    chat_template: str
    """The chat template applied, or 'none' (cartlab's models are base LMs: always 'none' today)."""
    system_prompt: str
    """lm-eval's `system_instruction` prepended to every prompt, or 'none'."""
    batch_size: int
    limit_docs: float | None
    """lm-eval's `limit` (first N documents, or a fraction); None for whole tasks."""
    dtype: str
    """The weights' dtype during evaluation (e.g. float32)."""
    n_loops: int
    """Inference loop count (CART; 0 for a model without a loop)."""
    exit_rule: str
    """How the loop ends: 'fixed' (every token runs n_loops)."""
    step: int
    """The checkpoint's training step (with run_id: which weights were scored)."""

    @property
    def key(self) -> str:
        """A short hash of every field: equal keys mean scores of one protocol."""
        text = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def row(self) -> dict:
        """The downstream columns of this protocol (`cartlab.results.schema.PROTOCOL_COLUMNS`)."""
        return {"protocol": self.key, **asdict(self)}


PUBLISHED = "published"
"""The protocol of the paper's own scores (`cartlab.analysis.published`): as its sections 7.4-7.5 say."""


def describe(row: dict, loops: bool = True) -> str:
    """One line naming a stored protocol (a downstream row or a Protocol's `row()`), e.g.
    "0-shot, R=4, exit fixed, fewshot seed 1234, no chat template, no system prompt, batch 8,
    whole tasks, float32, step 12, lm-eval 0.4.13" (without the R when not `loops`); a row
    stored before protocols were, or a published one, says so."""
    get = row.get
    shots, r = f"{int(get('num_fewshot') or 0)}-shot", [f"R={int(get('n_loops') or 0)}"] if loops else []
    if get("protocol") == PUBLISHED:
        return ", ".join([shots, *r, "the paper's published scores (lm-eval, its sections 7.4-7.5)"])
    if not get("protocol"):
        return ", ".join([shots, *r, "protocol not recorded (stored before cartlab kept it)"])
    limit = get("limit_docs")
    r = ([f"R={int(get('n_loops'))}" if get("n_loops") else "no loop"]) if loops else []
    parts = [shots, *r,
             f"exit {get('exit_rule')}", f"fewshot seed {get('fewshot_seed')}",
             "no chat template" if get("chat_template") == NONE else f"chat template {get('chat_template')!r}",
             "no system prompt" if get("system_prompt") == NONE else f"system prompt {get('system_prompt')!r}",
             f"batch {get('batch_size')}", "whole tasks" if limit is None or limit != limit else f"limit {limit:g}",
             str(get("dtype")), f"step {get('step')}", f"lm-eval {get('lm_eval_version')}"]
    return ", ".join(parts)


def task_fingerprint(results: dict, task: str) -> tuple[str | None, str | None]:
    """(version, hash of the config lm-eval ran) of `task` in simple_evaluate's results."""
    version = results.get("versions", {}).get(task)
    config = results.get("configs", {}).get(task)
    digest = None if config is None else hashlib.sha256(
        json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return (None if version is None else str(version)), digest


def score_table(rows, run_ids=None):
    """Rows (run, task, metric) x one column per protocol, "value +/- stderr"; the protocols as a
    second frame (column -> its description). Scores of two protocols never share a column."""
    import pandas as pd

    if run_ids is not None:
        rows = rows[rows.run_id.isin(list(run_ids))]
    if rows.empty:
        return pd.DataFrame(), pd.DataFrame(columns=["column", "protocol"])
    rows = rows.copy()
    rows["protocol"] = rows["protocol"].fillna("")
    firsts = rows.drop_duplicates("protocol").sort_values(["num_fewshot", "n_loops", "protocol"])
    firsts = firsts.assign(base=[f"{int(k)}-shot" + (f" R={int(r)}" if r else "")
                                 for k, r in zip(firsts.num_fewshot, firsts.n_loops)])
    names = {}
    for base, group in firsts.groupby("base", sort=False):  # same shots and R: named by what differs
        parts = [describe(p, loops=False).split(", ") for p in group.to_dict("records")]
        for p, own in zip(group.to_dict("records"), parts):
            differs = [x for x in own if len(group) > 1 and any(x not in other for other in parts)]
            names[p["protocol"]] = base + (f" ({', '.join(differs)})" if differs else "")
    rows["column"] = rows["protocol"].map(names)
    rows["cell"] = [f"{v:.4f}" + (f" +/- {s:.4f}" if s is not None and s == s else "")
                    for v, s in zip(rows.value, rows.stderr)]
    table = rows.pivot_table(index=["run_id", "task", "metric"], columns="column", values="cell", aggfunc="first")
    table = table[[names[p] for p in firsts.protocol]]
    legend = pd.DataFrame({"column": [names[p] for p in firsts.protocol],
                           "protocol": [describe(p) for p in firsts.to_dict("records")]})
    return table, legend


def sweeps(rows) -> list[tuple[str, object]]:
    """Downstream rows split into sweeps over the loop count: (the protocol but its R, its rows),
    one per run and protocol-but-R, so a curve or table over R never mixes two protocols (a
    `--limit` look beside the whole tasks, two checkpoints, two few-shot seeds)."""
    if rows.empty:
        return []
    rows = rows.assign(protocol=rows["protocol"].fillna(""))
    rows = rows.assign(sweep=[describe(r, loops=False) for r in rows.to_dict("records")])
    return [(label, group.drop(columns="sweep")) for (_, label), group in rows.groupby(["run_id", "sweep"])]


# -- presets -----------------------------------------------------------------------------------------------------
PRESET_FIELDS = ("description", "tasks", "num_fewshot", "n_loops", "fewshot_seed", "system_prompt", "batch_size")


def presets_dir() -> Path:
    return resources.protocols_dir()


def presets() -> dict[str, dict]:
    """name -> the preset's settings, for every data/protocols/*.yaml."""
    return {p.stem: load_preset(p.stem) for p in sorted(presets_dir().glob("*.yaml"))}


def load_preset(name: str) -> dict:
    """The settings of preset `name`, checked: a misspelt name or field is one line naming it."""
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in presets_dir().glob("*.yaml"))
        raise ValueError(f"--preset: {name!r} is not a protocol preset; allowed: {', '.join(known)} "
                         f"(cartlab eval --list-presets)")
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = sorted(set(spec) - set(PRESET_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; allowed: {list(PRESET_FIELDS)}")
    if not spec.get("tasks"):
        raise ValueError(f"{path}: tasks: name at least one task")
    return spec


def _check_columns() -> None:
    """Every field of a Protocol row is a column of the downstream table (`PROTOCOL_COLUMNS`)."""
    from cartlab.results.schema import SCORE_COLUMNS

    missing = [f for f in ("protocol", *(f.name for f in fields(Protocol))) if f not in SCORE_COLUMNS]
    assert not missing, f"Protocol fields {missing} are not downstream columns"


_check_columns()
