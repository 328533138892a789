"""Loss against training compute: models of different cost per step compared at matched FLOPs.

An LRT model (Dense with the `lrt_kv` / `lrt_residual` memory) costs about 2x its Dense backbone
per training step, and CART costs R core applications; compared at the same step count the
costlier model has simply trained more. This module puts every run on one axis, the cumulative
training FLOPs the loop logs (`train_log.flops`), and compares variants at the largest budget all
of them reached. It also tabulates and draws LRT's approximation probe (`probes` rows of
`lrt_gap`, `cartlab.measures.lrt`) and the measured cost of its interleaved forward.

    log = with_flops(res.runs, res.train_log)            # flops filled for older databases
    fig = plot_loss_vs_flops(res.runs, res.train_log, res.eval_log)
    table = matched_compute(res.runs, res.train_log, res.eval_log)

Variants are the `variant` column (seeds of one configuration share it): seeds are averaged,
never two variants. FLOPs follow `cartlab.model.accounting` (3x the training forward, LM head
included), per optimizer step over all processes.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cartlab.analysis.runs import accounted_step_flops
from cartlab.analysis.runs import run_config as _config
from cartlab.analysis.runs import run_model as _model
from cartlab.analysis.schema import display_labels, validate, with_variants

PROBE = "lrt_gap"
GAP_METRICS = ("loss_gap", "source_dist")
METRIC_LABELS = {"loss_gap": "loss gap, interleaved - exact (nats)",
                 "source_dist": "source-state distance (relative RMS)",
                 "loss": "interleaved loss (nats)", "loss_exact": "exact loss (nats)"}


# -- FLOPs per run: cartlab.analysis.runs, shared with the scaling analyses ------------------------------------

def with_flops(runs: pd.DataFrame, train_log: pd.DataFrame) -> pd.DataFrame:
    """`train_log` (a copy) with the cumulative training FLOPs of every row in `flops`: the value
    the loop logged, or for rows without one (databases of schema 2, written before the loop
    logged FLOPs) step x `accounted_step_flops` of the run. `flops_source` says which:
    "logged", "accounted", or missing where neither is known (rows without a config)."""
    validate(train_log, "train_log")
    log = train_log.copy()
    if "flops" not in log.columns:
        log["flops"] = np.nan
    log["flops"] = log["flops"].astype(float)
    logged = log["flops"].notna()
    missing = set(log.loc[~logged, "run_id"])
    per_step = {r["run_id"]: accounted_step_flops(r) for r in runs.to_dict("records") if r["run_id"] in missing}
    log.loc[~logged, "flops"] = log.loc[~logged, "step"] * log.loc[~logged, "run_id"].map(per_step).astype(float)
    log["flops_source"] = [("logged" if was else "accounted") if known else None
                           for was, known in zip(logged, log["flops"].notna())]
    return log


def flops_at(log: pd.DataFrame, frame: pd.DataFrame) -> pd.Series:
    """The cumulative training FLOPs at each row's (run_id, step) of `frame` (e.g. an eval_log),
    read off `log` (`with_flops`'s output): equal to the training row of the same step, linear
    between logged steps from (0, 0); NaN past a run's last logged step or where FLOPs are
    unknown."""
    out = pd.Series(np.nan, index=frame.index, dtype=float)
    for run_id, rows in frame.groupby("run_id"):
        known = log[(log["run_id"] == run_id) & log["flops"].notna()].sort_values("step")
        if known.empty:
            continue
        steps = np.concatenate([[0.0], known["step"].to_numpy(float)])
        flops = np.concatenate([[0.0], known["flops"].to_numpy(float)])
        out[rows.index] = np.interp(rows["step"].to_numpy(float), steps, flops, right=np.nan)
    return out


def _labelled(runs: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    runs = with_variants(runs)
    runs = runs.assign(config=display_labels(runs))[["run_id", "variant", "config"]]
    return frame.merge(runs, on="run_id")


# -- curves and the matched-compute table -----------------------------------------------------------------
def compute_curves(runs: pd.DataFrame, train_log: pd.DataFrame, eval_log: pd.DataFrame | None = None,
                   smooth: int = 1) -> pd.DataFrame:
    """Long frame of loss against cumulative training FLOPs, seeds averaged per variant: one row
    per (curve, variant, step) with `config`, `flops` and `mean`, `sd`, `n` of the loss over
    seeds. `curve` is "train" (training loss) or a validation domain (eval_log). The training
    loss of one logged step is one batch's; `smooth` > 1 replaces it by each run's running mean
    over that many logged steps (the last ones up to the step). Rows without known FLOPs are
    dropped."""
    if smooth < 1:
        raise ValueError(f"smooth: {smooth!r} is not allowed; it must be an integer >= 1 (1: no smoothing)")
    log = with_flops(runs, train_log).sort_values(["run_id", "step"])
    log["loss"] = log.groupby("run_id")["loss"].transform(lambda v: v.rolling(smooth, min_periods=1).mean())
    parts = [log.assign(curve="train")[["run_id", "step", "curve", "flops", "loss"]]]
    if eval_log is not None and len(eval_log):
        validate(eval_log, "eval_log")
        ev = eval_log.assign(curve=eval_log["split"], flops=flops_at(log, eval_log))
        parts.append(ev[["run_id", "step", "curve", "flops", "loss"]])
    df = _labelled(runs, pd.concat(parts, ignore_index=True)).dropna(subset=["flops", "loss"])
    grouped = df.groupby(["curve", "variant", "config", "step"])
    out = grouped.agg(flops=("flops", "mean"), mean=("loss", "mean"), sd=("loss", "std"), n=("loss", "size"))
    return out.reset_index().sort_values(["curve", "config", "step"]).reset_index(drop=True)


def budget(runs: pd.DataFrame, train_log: pd.DataFrame) -> float:
    """The largest training budget every run reached: the smallest of the runs' final FLOPs."""
    log = with_flops(runs, train_log).dropna(subset=["flops"])
    log = log[log["run_id"].isin(runs["run_id"])]
    if log.empty:
        raise ValueError("train_log: no run has known training FLOPs (no flops logged and no config to account them)")
    return float(log.groupby("run_id")["flops"].max().min())


MAX_SPAN = 0.1
"""The longest stretch of a run (a fraction of its steps) a mid-schedule read may interpolate over."""


def _interp_at(flops: np.ndarray, values: np.ndarray, at: float) -> float:
    """values at `at` FLOPs, linear between the logged points; NaN outside them."""
    order = np.argsort(flops)
    flops, values = flops[order], values[order]
    if not len(flops) or at < flops[0] or at > flops[-1]:
        return math.nan
    return float(np.interp(at, flops, values))


def _span(flops: np.ndarray, steps: np.ndarray, at: float) -> float:
    """Steps between the two evaluations around `at` FLOPs (0 when one is at `at`)."""
    order = np.argsort(flops)
    flops, steps = flops[order], steps[order]
    i = int(np.searchsorted(flops, at))
    if i < len(flops) and np.isclose(flops[i], at, rtol=1e-9, atol=0):
        return 0.0
    return float(steps[i] - steps[i - 1]) if 0 < i < len(flops) else math.inf


def read_at_budget(final_flops: float, steps: int, at: float) -> str:
    """How a run is read at the budget `at`: "end of schedule" when its schedule ends there
    (within one of its steps, or 1%), "mid-schedule" when it trains past it (its learning rate
    not yet annealed there: not a fair comparison), "not reached" when it stops short."""
    tol = max(final_flops / max(steps, 1), 0.01 * at)
    if abs(final_flops - at) <= tol:
        return "end of schedule"
    return "mid-schedule" if final_flops > at else "not reached"


def _reads(runs: pd.DataFrame, train_log: pd.DataFrame, eval_log: pd.DataFrame, at: float) -> pd.DataFrame:
    """One row per (run, domain): the run's read at budget `at` and its validation loss there.
    An end-of-schedule read is the run's final evaluation; a mid-schedule read interpolates
    between the evaluations around the budget when they are at most MAX_SPAN of the run apart,
    and is refused (NaN, said in `read`) otherwise."""
    log = with_flops(runs, train_log).dropna(subset=["flops"])
    ev = eval_log.assign(flops=flops_at(log, eval_log)).dropna(subset=["flops"])
    rows = []
    for run in with_variants(runs).to_dict("records"):
        mine, evals = log[log["run_id"] == run["run_id"]], ev[ev["run_id"] == run["run_id"]]
        if mine.empty:
            continue
        last = mine.loc[mine["step"].idxmax()]
        steps, final = int(last["step"]), float(last["flops"])
        read = read_at_budget(final, steps, at)
        step_at = steps if read == "end of schedule" else _interp_at(mine["flops"].to_numpy(float),
                                                                    mine["step"].to_numpy(float), at)
        for domain, e in evals.groupby("split"):
            how = read
            if read == "end of schedule":
                loss = float(e.loc[e["step"].idxmax(), "loss"])
            elif read == "mid-schedule":
                span = _span(e["flops"].to_numpy(float), e["step"].to_numpy(float), at)
                loss = _interp_at(e["flops"].to_numpy(float), e["loss"].to_numpy(float), at)
                if span > MAX_SPAN * steps:
                    how, loss = f"mid-schedule, evaluations {span:.0f} steps apart: not read", math.nan
            else:
                loss = math.nan
            rows.append({"run_id": run["run_id"], "variant": run["variant"], "split": str(domain), "read": how,
                         "steps": steps, "step at budget": step_at, "training FLOPs": final,
                         "FLOPs/token": final / float(run["tokens"]) if run.get("tokens") else math.nan,
                         "final": float(e.loc[e["step"].idxmax(), "loss"]), "at budget": loss})
    return pd.DataFrame(rows, columns=["run_id", "variant", "split", "read", "steps", "step at budget",
                                       "training FLOPs", "FLOPs/token", "final", "at budget"])


def matched_compute(runs: pd.DataFrame, train_log: pd.DataFrame, eval_log: pd.DataFrame,
                    split: str | None = None, at: float | None = None) -> pd.DataFrame:
    """One row per variant at the training-FLOPs budget `at` (the study's `flops:` budget; default
    the largest budget every run reached, `budget`), sorted by its validation loss on `split`
    (default: the first domain) there: seeds, how it is read (`read_at_budget`: "end of schedule"
    is a fair comparison; "mid-schedule" is not, and is labelled so; "not reached"), its schedule
    length and the step at the budget, training FLOPs per token and in total, and per domain the
    validation loss at the budget and at its own end (final, matched steps), seeds averaged.
    Mid-schedule reads interpolate between evaluations at most a tenth of the run apart, else
    are refused (NaN). (Training losses are left out: one batch's loss is too noisy to rank by.)"""
    validate(eval_log, "eval_log")
    at = budget(runs, train_log) if at is None else float(at)
    splits = sorted(str(s) for s in eval_log["split"].unique())
    if split is not None and split not in splits:
        raise ValueError(f"split: {split!r} is not a validation domain of these runs; available: {splits}")
    reads = _reads(runs, train_log, eval_log, at)
    per_run = _labelled(runs, reads.drop(columns="variant"))
    out = []
    for (variant, config), g in per_run.groupby(["variant", "config"]):
        first = g.drop_duplicates("run_id")
        row = {"config": config, "seeds": first["run_id"].nunique(),
               "read at budget": "; ".join(sorted(set(g["read"]))),
               "steps": int(round(first["steps"].mean())), "step at budget": first["step at budget"].mean(),
               "FLOPs/token": first["FLOPs/token"].mean(), "training FLOPs": first["training FLOPs"].mean()}
        for domain in splits:
            d = g[g["split"] == domain]
            row[f"{domain} at budget"] = d["at budget"].mean() if len(d) else math.nan
        for domain in splits:
            d = g[g["split"] == domain]
            row[f"final {domain}"] = d["final"].mean() if len(d) else math.nan
        out.append(row)
    table = pd.DataFrame(out)
    if len(table):
        table["step at budget"] = table["step at budget"].round().astype("Int64")
        key = f"{split or splits[0]} at budget"
        table = table.sort_values([key, "config"]).reset_index(drop=True)
    table.attrs["budget"] = at
    return table


def reference_dense(runs: pd.DataFrame) -> str | None:
    """The variant matched-compute findings compare against: the study's one plain Dense (no
    hooks, no fields set by hand); None when there is none or several."""
    runs = with_variants(runs)
    plain = runs[(runs["model"] == "dense") & (runs["hooks"].fillna("") == "") & (runs["overrides"].fillna("") == "")]
    variants = plain["variant"].unique()
    return variants[0] if len(variants) == 1 else None


def findings(res, at: float | None = None) -> list:
    """Matched-compute findings: each variant's validation loss at the budget minus the plain
    Dense's, per domain, over seeds (`cartlab.analysis.findings`). Made when the study has one
    plain Dense and variants of different training FLOPs per token; a comparison that reads any
    run mid-schedule carries the note "mid-schedule read" (its verdict is not a fair one)."""
    from cartlab.analysis.findings import finding, not_measured

    if res.train_log is None or res.train_log.empty or res.eval_log.empty:
        return []
    ref = reference_dense(res.runs)
    if ref is None:
        return []
    try:
        at = budget(res.runs, res.train_log) if at is None else float(at)
    except ValueError:
        return []
    reads = _reads(res.runs, res.train_log, res.eval_log, at)
    if reads.empty or reads["FLOPs/token"].round(6).nunique() < 2:
        return []  # one cost per token: matched compute is matched steps, the other findings cover it
    labels = dict(zip(with_variants(res.runs)["variant"], display_labels(with_variants(res.runs))))
    out = []
    b = reads[reads["variant"] == ref]
    for variant, a in reads[reads["variant"] != ref].groupby("variant", sort=False):
        claim = f"{labels[variant]} vs {labels[ref]} at {at:.3g} training FLOPs"
        for split in sorted(set(reads["split"])):
            sa, sb = a[a["split"] == split], b[b["split"] == split]
            mid = sorted({r for r in (*sa["read"], *sb["read"]) if r != "end of schedule"})
            if sa["at budget"].notna().sum() == 0 or sb["at budget"].notna().sum() == 0:
                out.append(not_measured("matched_compute", claim, labels[variant], labels[ref], split, "loss",
                                        "; ".join(mid) or "no evaluation"))
                continue
            note = "mid-schedule read: not a fair comparison" if any(r.startswith("mid") for r in mid) else ""
            out.append(finding("matched_compute", claim, labels[variant], labels[ref], split, "loss",
                               sa["at budget"], sb["at budget"], note))
    return out


# -- LRT: measured forward cost, approximation probe --------------------------------------------------------
def forward_cost(runs: pd.DataFrame, train_log: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: the median measured cost of the LRT training forward (wall time over
    its memory-free initialisation pass; `train_log.forward_cost`, ~2 when the S refinements
    cost one pass; blank for models without the memory), the accounted training FLOPs ratio
    over the Dense backbone (`memory_overhead`, the ~2x the LRT summary aims for; blank for
    models without the memory), and the median training throughput in tokens/s."""
    from cartlab.measures.lrt import has_memory
    from cartlab.model import memory_overhead

    validate(train_log, "train_log")
    log = train_log.copy()
    if "forward_cost" not in log.columns:
        log["forward_cost"] = np.nan
    rows = []
    for run in with_variants(runs).to_dict("records"):
        cfg, ratio = _config(run), math.nan
        if cfg is not None:
            model = _model(cfg)
            if has_memory(model):
                ratio = memory_overhead(model, cfg["train"]["seq_len"])["train_flops_ratio"]
        mine = log[log["run_id"] == run["run_id"]]
        rows.append({"run_id": run["run_id"], "forward_cost": mine["forward_cost"].astype(float).to_list(),
                     "tokens_per_s": mine["tokens_per_s"].astype(float).to_list(), "ratio": ratio})
    per_run = _labelled(runs, pd.DataFrame(rows, columns=["run_id", "forward_cost", "tokens_per_s", "ratio"]))
    out = []
    for (variant, config), g in per_run.groupby(["variant", "config"]):
        costs = [c for cs in g["forward_cost"] for c in cs if not math.isnan(c)]
        speeds = [c for cs in g["tokens_per_s"] for c in cs if not math.isnan(c)]
        out.append({"config": config, "seeds": len(g),
                    "measured forward cost (median)": float(np.median(costs)) if costs else math.nan,
                    "accounted train FLOPs vs backbone": g["ratio"].mean(),
                    "tokens/s (median)": float(np.median(speeds)) if speeds else math.nan})
    return pd.DataFrame(out).sort_values("config").reset_index(drop=True)


def lrt_gap(runs: pd.DataFrame, probes: pd.DataFrame | None) -> pd.DataFrame:
    """The `lrt_gap` probe rows, seeds averaged: one row per (variant, domain, S) with `config`,
    `split`, `S` and one column per metric (loss, loss_exact, loss_gap, source_dist). Empty when
    no run has the probe."""
    cols = ["variant", "config", "split", "S", "loss", "loss_exact", "loss_gap", "source_dist"]
    if probes is None or probes.empty or not (probes["probe"] == PROBE).any():
        return pd.DataFrame(columns=cols)
    validate(probes, "probes")
    p = probes[probes["probe"] == PROBE]
    p = p[p["step"] == p.groupby("run_id")["step"].transform("max")]  # the final measurement of each run
    p = _labelled(runs, p.rename(columns={"x": "S"}))
    table = p.pivot_table(index=["variant", "config", "split", "S"], columns="metric", values="value", aggfunc="mean")
    table = table.reset_index()
    table.columns.name = None
    table["S"] = table["S"].astype(int)
    return table.reindex(columns=cols).sort_values(["config", "split", "S"]).reset_index(drop=True)


def trained_subsets(runs: pd.DataFrame) -> dict[str, int]:
    """{variant: the S it trained with (`memory_subsets`)} for the LRT runs with a readable config."""
    from cartlab.measures.lrt import has_memory

    out = {}
    for run in with_variants(runs).to_dict("records"):
        cfg = _config(run)
        if cfg is not None and has_memory(model := _model(cfg)):
            out[run["variant"]] = model.memory_subsets
    return out


def gap_summary(runs: pd.DataFrame, probes: pd.DataFrame | None) -> pd.DataFrame:
    """One row per (LRT variant, domain): the exact recurrence's loss, the loss gap at S = 1, at
    the trained S and at S = T (0 up to float error: the probe's self-check), and the
    source-state distance at the trained S."""
    gap = lrt_gap(runs, probes)
    trained = trained_subsets(runs)
    rows = []
    for (variant, config, split), g in gap.groupby(["variant", "config", "split"]):
        g = g.set_index("S")
        S = trained.get(variant)
        T = int(g.index.max())
        rows.append({"config": config, "split": split, "trained S": S, "exact loss": g["loss_exact"].iloc[0],
                     "gap S=1": g["loss_gap"].get(1, math.nan),
                     "gap trained S": g["loss_gap"].get(S, math.nan) if S else math.nan,
                     "gap S=T": g["loss_gap"].loc[T], "T": T,
                     "source dist trained S": g["source_dist"].get(S, math.nan) if S else math.nan})
    return pd.DataFrame(rows)


# -- figures ---------------------------------------------------------------------------------------------------
def _palette(configs) -> dict:
    import seaborn as sns

    configs = sorted(configs)
    return dict(zip(configs, sns.color_palette(n_colors=len(configs))))


def plot_loss_vs_flops(runs: pd.DataFrame, train_log: pd.DataFrame, eval_log: pd.DataFrame | None = None,
                       smooth: int = 5) -> Figure:
    """Training loss (running mean over `smooth` logged steps) and each domain's validation loss
    against cumulative training FLOPs, one line per variant (seed mean, 1-sd band where there are
    several seeds), with the matched budget (`budget`) dashed: curves compared at a vertical line
    compare equal compute."""
    curves = compute_curves(runs, train_log, eval_log, smooth=smooth)
    if curves.empty:
        raise ValueError("train_log: no loss with known training FLOPs to draw")
    panels = ["train", *sorted(c for c in curves["curve"].unique() if c != "train")]
    colors = _palette(curves["config"].unique())
    fig = Figure(figsize=(4.2 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    at = budget(runs, train_log)
    for ax, panel in zip(axes, panels):
        for config, g in curves[curves["curve"] == panel].groupby("config"):
            g = g[g["flops"] > 0]
            ax.plot(g["flops"], g["mean"], "-" if panel == "train" else "o-", ms=3, color=colors[config], label=config)
            if (g["n"] > 1).any():
                sd = g["sd"].fillna(0)
                ax.fill_between(g["flops"], g["mean"] - sd, g["mean"] + sd, color=colors[config], alpha=0.2)
        ax.axvline(at, color="k", ls="--", lw=0.8)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        what = "training loss" if panel == "train" else f"validation loss ({panel})"
        ax.set(xlabel="training FLOPs (cumulative)", ylabel=f"{what}, nats",
               title=f"{what} (mean of {smooth} logs)" if panel == "train" and smooth > 1 else what)
    axes[0].legend(fontsize=7, title="dashed: matched budget", title_fontsize=7)
    fig.suptitle("Loss against training compute (seed mean)")
    fig.tight_layout()
    return fig


def plot_lrt_gap(runs: pd.DataFrame, probes: pd.DataFrame, metrics=GAP_METRICS) -> Figure:
    """LRT's approximation probe: each metric (rows: the loss gap interleaved - exact, the
    source-state distance) against the subset count S (log2 axis) per validation domain
    (columns), one line per LRT variant (seed mean), its trained S marked with a hollow circle."""
    gap = lrt_gap(runs, probes)
    if gap.empty:
        raise ValueError(f"probes: no {PROBE!r} rows; train an LRT model with measures null or [{PROBE}]")
    splits = sorted(gap["split"].unique())
    colors, trained = _palette(gap["config"].unique()), trained_subsets(runs)
    fig = Figure(figsize=(3.8 * len(splits), 3.2 * len(metrics)))
    axes = fig.subplots(len(metrics), len(splits), squeeze=False, sharex=True)
    for i, metric in enumerate(metrics):
        for j, split in enumerate(splits):
            ax = axes[i][j]
            for (variant, config), g in gap[gap["split"] == split].groupby(["variant", "config"]):
                ax.plot(g["S"], g[metric], "o-", ms=3, color=colors[config], label=config)
                S = trained.get(variant)
                if S in set(g["S"]):
                    ax.plot(S, g.set_index("S")[metric].loc[S], "o", ms=9, mfc="none", color=colors[config])
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xscale("log", base=2)
            grid = sorted(gap["S"].unique())
            ax.set_xticks(grid, [str(S) for S in grid], fontsize=7)
            ax.minorticks_off()
            ax.set(xlabel="interleaved subsets S (S = T is exact)", ylabel=METRIC_LABELS.get(metric, metric),
                   title=f"{split}: {metric}")
    axes[0][0].legend(fontsize=7, title="hollow circle: trained S", title_fontsize=7)
    fig.suptitle("LRT: interleaved training forward vs the exact recurrence, against S")
    fig.tight_layout()
    return fig
