"""What a run trained, read back from its stored config: the one place analysis code turns a
runs row (`config_json`, `hardware_json`) into the model it built and that model's accounting.

    cfg = run_config(row)                  # the resolved training config, or None (published rows)
    acc = run_accounting(row)              # cartlab.model.account of the trained model
    per_step = accounted_step_flops(row)   # training FLOPs of one optimizer step
    flops = run_flops(runs)                # per run: flops_per_token, tokens, flops

Every FLOPs number in the analyses (the matched-compute curves of `compute`, the joint law of
`scaling_study`, the FLOPs axis of the scaling figures) comes from `cartlab.model.account`: LM
head included, LRT's memory passes counted, and for variable-depth CART (`random_loops`,
`truncated_bptt`) the expected loop count and the frozen loops' forward-only cost. Never
6 * N * D: at laptop sizes the LM head and attention weigh as much as the weights, and CART
applies its core R times.
"""
from __future__ import annotations

import json
import math

import pandas as pd


def run_config(row) -> dict | None:
    """The run's resolved training config (`config_json`, a dict with "model" and "train"), or
    None when the row has none (the published numbers of sections 5-7) or it is not a training config."""
    text = row.get("config_json") if hasattr(row, "get") else None
    if not isinstance(text, str) or not text:
        return None
    try:
        cfg = json.loads(text)
    except ValueError:
        return None
    return cfg if isinstance(cfg, dict) and "model" in cfg and "train" in cfg else None


def run_model(cfg: dict):
    """The model config (`LMConfig`, section 3.5's notation) a training config built."""
    from cartlab.model import LMConfig

    return LMConfig.from_dict(cfg["model"])


def run_accounting(row):
    """`cartlab.model.account` of the model the run `row` trained, at its training length: stored
    and effective parameters and FLOPs per token (section 7.3's N and C = f(N) D). ValueError
    naming the run when the row has no stored training config."""
    from cartlab.config import ConfigError
    from cartlab.model import account

    cfg = run_config(row)
    try:
        return account(run_model(cfg), int(cfg["train"]["seq_len"]))
    except (TypeError, KeyError, ValueError, ConfigError):
        raise ValueError(f"runs: {row.get('run_id')!r} has no stored training config (config_json), so its "
                         f"non-embedding parameters and FLOPs are unknown; this needs runs trained here") from None


def accounted_step_flops(row) -> float:
    """Training FLOPs of one optimizer step of the run `row` (a runs row with `config_json`):
    tokens per step (batch x accumulation x seq_len x processes) times the accounted training
    FLOPs per token (`account(...).train_flops_per_token()`, LM head included; for
    variable-depth CART at the expected loop count; section 7.3). What the training loop adds to
    `train_log.flops` every step; NaN when the row has no readable config (published numbers)."""
    from cartlab.config import ConfigError
    from cartlab.model import account

    cfg = run_config(row)
    if cfg is None:
        return math.nan
    try:
        train = cfg["train"]
        hardware = json.loads(row.get("hardware_json") or "{}")
        tokens = train["batch_size"] * train.get("grad_accum", 1) * train["seq_len"] * hardware.get("world_size", 1)
        return account(run_model(cfg), train["seq_len"]).train_flops_per_token(include_lm_head=True) * tokens
    except (KeyError, TypeError, ConfigError):
        return math.nan


def run_flops(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: run_id, flops_per_token (accounted training FLOPs per token, LM head
    included), tokens (the runs row's training tokens) and flops = flops_per_token x tokens, the
    run's total training compute as the loop logs it (section 7.3's C). NaN for rows without a config."""
    rows = []
    for row in runs.to_dict("records"):
        cfg = run_config(row)
        try:
            per_token = run_accounting(row).train_flops_per_token(include_lm_head=True) if cfg else math.nan
        except ValueError:
            per_token = math.nan
        tokens = float(row["tokens"]) if pd.notna(row.get("tokens")) else math.nan
        rows.append({"run_id": row["run_id"], "flops_per_token": per_token, "tokens": tokens,
                     "flops": per_token * tokens})
    return pd.DataFrame(rows, columns=["run_id", "flops_per_token", "tokens", "flops"])
