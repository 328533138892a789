"""Seed noise (paper sections 4.4 and 8): how much of a difference between runs is the seed, and
the curves over training drawn as seed means with their spread.

    band = seed_band([20.31, 20.35, 20.40], k=2)     # mean, sd, n, band of k sd
    compare_to_band(20.9, band)                      # single-seed delta: signal or within noise
    seed_summary(runs, eval_log)                     # per variant and domain: mean, sd, n
    band_comparisons(runs, eval_log)                 # every variant against its baseline's band, per domain
    smoothed_train_loss(runs, train_log)             # running-mean training loss, per domain if logged
    plot_train_loss(runs, train_log); plot_validation_curves(runs, eval_log)
    plot_train_dynamics(runs, train_log); plot_loss_curves(runs, log)

Screen-vs-full agreement (section 9.5) is `cartlab.analysis.screen`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cartlab.analysis.figures import domain_panels, plain_log_y, select_runs
from cartlab.analysis.schema import DESCRIBE_COLUMNS, RUNS_COLUMNS, display_labels, final_eval, is_baseline, validate


@dataclass(frozen=True)
class SeedBand:
    """mean +/- k * sd over n seeds."""

    mean: float
    sd: float
    n: int
    k: float

    @property
    def half_width(self) -> float:
        """half width = k * sd (section 4.4)."""
        return self.k * self.sd

    @property
    def lo(self) -> float:
        """Lower edge of the band: lo = mean - k * sd (section 4.4)."""
        return self.mean - self.half_width

    @property
    def hi(self) -> float:
        """Upper edge of the band: hi = mean + k * sd (section 4.4)."""
        return self.mean + self.half_width


def seed_band(values, *, k: float = 2.0) -> SeedBand:
    """Seed-noise band of a baseline (section 4.4, section 8's interpretability threshold).

    mean = sum(v) / n, sd = sqrt(sum (v - mean)^2 / (n - 1)) (sample sd), band = mean +/- k sd.
    Needs n >= 2 finite values; with n = 3 (the paper's seeds) the sd itself is uncertain by
    roughly +/- 50%, which `compare_to_band` states in its caveat.
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or not np.all(np.isfinite(v)):
        raise ValueError(f"values: expected a 1-d sequence of finite numbers, got {values!r}")
    if len(v) < 2:
        raise ValueError(f"values: need >= 2 seeds for a seed-noise band, got n={len(v)}")
    if not k > 0:
        raise ValueError(f"k: band width in sd must be > 0, got {k}")
    return SeedBand(mean=float(v.mean()), sd=float(v.std(ddof=1)), n=len(v), k=float(k))


@dataclass(frozen=True)
class DeltaVsBand:
    """A single-seed delta judged against a baseline's seed band."""

    value: float
    delta: float  # value - band.mean
    z: float  # delta / band.sd
    signal: bool  # |delta| > k * sd
    label: str  # "signal" | "within noise"
    caveat: str


def compare_to_band(value: float, band: SeedBand, *, n_variant: int = 1) -> DeltaVsBand:
    """Is a variant's value outside the baseline's seed band? (section 8's criterion)

    delta = value - mean_baseline, z = delta / sd_baseline; signal iff |delta| > k * sd_baseline.
    The caveat states both sample sizes: the band measures the baseline's seed noise only, and a
    single-seed variant's own noise is not measured.
    """
    if not np.isfinite(value):
        raise ValueError(f"value: must be finite, got {value}")
    if n_variant < 1:
        raise ValueError(f"n_variant: must be >= 1, got {n_variant}")
    delta = float(value - band.mean)
    z = delta / band.sd if band.sd > 0 else np.copysign(np.inf, delta) if delta else 0.0
    signal = bool(abs(delta) > band.half_width)
    caveat = (f"baseline band = mean +/- {band.k:g} sd over n={band.n} seeds; variant n={n_variant}"
              + ("; the variant's own seed noise is not measured" if n_variant == 1 else "")
              + (f"; with n={band.n} the sd is itself uncertain" if band.n < 5 else ""))
    return DeltaVsBand(value=float(value), delta=delta, z=float(z), signal=signal,
                       label="signal" if signal else "within noise", caveat=caveat)


def seed_summary(runs: pd.DataFrame, eval_log: pd.DataFrame, *, metric: str = "ppl",
                 step: int | None = None) -> pd.DataFrame:
    """Per variant and split: mean, sd (ddof=1), n of the final `metric` over seeds (section 4.4).

    Seeds are the runs of one `variant` (the run's whole config minus its seed), never runs that
    merely agree on some columns: a run with a component field set by hand is its own variant.
    Columns: variant, config (display label), variant_label, the CONFIG_COLUMNS, overrides,
    split, mean, sd, n. Rows that are already seed means (seed NaN, n_seeds > 1) keep their mean
    with sd NaN and n = n_seeds.
    """
    if metric not in ("ppl", "loss"):
        raise ValueError(f"metric: {metric!r} not allowed; allowed: ['ppl', 'loss']")
    fe = final_eval(runs, eval_log, step=step)
    fe = fe.assign(config=display_labels(fe))
    g = fe.groupby(["variant", "split"], dropna=False)
    out = g[metric].agg(mean="mean", sd=lambda s: s.std(ddof=1) if len(s) > 1 else np.nan, n="size")
    described = g[["config", *DESCRIBE_COLUMNS]].first()
    out = described.join(out).reset_index()
    out["n"] = np.where(out["n"] == 1, g["n_seeds"].first().to_numpy(), out["n"])
    cols = ["variant", "config", *DESCRIBE_COLUMNS, "split", "mean", "sd", "n"]
    return out[cols]


def band_comparisons(runs: pd.DataFrame, eval_log: pd.DataFrame, *, split=None, metric: str = "ppl",
                     k: float = 2.0) -> pd.DataFrame:
    """Every variant against the seed band of its stage's CART baseline, on every validation
    domain (section 8's test).

    For each domain (`split`: one name, a list, or None for every split evaluated) and each CART
    baseline variant (hooks '' and no overrides, `schema.is_baseline`) with >= 2 seeds there:
    band = mean +/- k sd of its final `metric`; every other variant of the same stage (ablations,
    fields set by hand, other R, Dense) is compared by its seed mean: delta = mean - band mean,
    z = delta / sd, "signal" iff |delta| > k sd (compare_to_band). Columns: split, baseline,
    config, variant, n, value, delta, z, label; attrs["caveat"] states the sample sizes. Raises
    if no baseline has >= 2 seeds on any of the domains.
    """
    fe = final_eval(runs, eval_log)
    have = sorted(fe["split"].unique())
    splits = have if split is None else [split] if isinstance(split, str) else list(split)
    missing = [s for s in splits if s not in have]
    if missing:
        raise ValueError(f"split: {missing} not evaluated; available: {have}")
    rows, caveat = [], ""
    for name in splits:
        found, caveat = _band_rows(fe[fe["split"] == name], metric, k, caveat)
        rows += [{"split": name, **r} for r in found]
    if not rows and not any(_has_band(fe[fe["split"] == s], metric) for s in splits):
        raise ValueError(f"runs: no CART baseline (hooks '' and no overrides) with >= 2 seeds on split(s) "
                         f"{splits}; train the baseline with several seeds to get a noise band")
    out = pd.DataFrame(rows, columns=["split", "baseline", "config", "variant", "n", "value", "delta", "z", "label"])
    out.attrs["caveat"] = caveat
    return out


def _variant_means(fe: pd.DataFrame, metric: str) -> pd.DataFrame:
    fe = fe.assign(config=display_labels(fe), baseline=is_baseline(fe), stage=fe["stage"].fillna(""))
    g = fe.groupby("variant")
    return g[["stage", "config", "baseline"]].first().join(
        g[metric].agg(mean="mean", sd=lambda s: s.std(ddof=1) if len(s) > 1 else np.nan, n="size")).reset_index()


def _has_band(fe: pd.DataFrame, metric: str) -> bool:
    summ = _variant_means(fe, metric) if len(fe) else None
    return summ is not None and bool((summ["baseline"] & summ["sd"].notna()).any())


def _band_rows(fe: pd.DataFrame, metric: str, k: float, caveat: str) -> tuple[list[dict], str]:
    """band_comparisons on one domain's final evaluations: its rows and the last caveat."""
    if fe.empty:
        return [], caveat
    summ = _variant_means(fe, metric)
    rows = []
    for _, b in summ[summ["baseline"] & summ["sd"].notna()].iterrows():
        band = seed_band(fe.loc[fe["variant"] == b["variant"], metric].to_numpy(), k=k)
        for _, v in summ[(summ["stage"] == b["stage"]) & (summ["variant"] != b["variant"])].iterrows():
            cmp = compare_to_band(v["mean"], band, n_variant=int(v["n"]))
            caveat = cmp.caveat
            rows.append({"baseline": b["config"], "config": v["config"], "variant": v["variant"], "n": int(v["n"]),
                         "value": v["mean"], "delta": cmp.delta, "z": cmp.z, "label": cmp.label})
    return rows, caveat


# -- curves over training: seed mean +/- 1 sd per variant -----------------------------------------------
TRAIN_LOG_LABELS = {"loss": "training loss (nats)", "lr": "learning rate", "grad_norm": "gradient norm (before clipping)",
                    "tokens_per_s": "throughput (tokens/s)", "mfu": "model FLOPs utilisation"}


def _variant_panels(df: pd.DataFrame, panels: dict, *, title: str, log_y=()) -> Figure:
    """One panel per `title: (mask of df's rows, y column, y label)`, y against step per variant
    (seed mean, 1-sd band), colours fixed across panels and one legend below them all."""
    import seaborn as sns
    from matplotlib.figure import Figure

    df = df.assign(config=display_labels(df))  # one hue per variant, never two variants under one label
    order = sorted(df["config"].unique())
    palette = dict(zip(order, sns.color_palette(n_colors=len(order))))
    fig = Figure(figsize=(4.2 * len(panels), 3.4 + 0.22 * -(-len(order) // 3)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, (mask, y, ylabel)) in zip(axes, panels.items()):
        sns.lineplot(data=df[mask], x="step", y=y, hue="config", hue_order=order, palette=palette, errorbar="sd",
                     ax=ax, legend=ax is axes[0])
        ax.set(title=name, xlabel="step", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if name in log_y:
            ax.set_yscale("log")
            plain_log_y(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].get_legend().remove()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize=7, frameon=False)
    fig.suptitle(title)
    return fig


def plot_loss_curves(runs: pd.DataFrame, log: pd.DataFrame, *, value: str = "loss", split: str | None = None,
                     where: dict | None = None) -> Figure:
    """`value` against step per variant, seed mean with a 1-sd band (section 5.4).

    `log` is a train_log, or an eval_log together with `split`."""
    import seaborn as sns
    from matplotlib.figure import Figure

    is_eval = "split" in log.columns
    validate(log, "eval_log" if is_eval else "train_log")
    if value not in log.columns:
        raise ValueError(f"value: {value!r} not a column of the log; allowed: {list(log.columns[2:])}")
    if is_eval:
        if split is None:
            raise ValueError(f"split: required for an eval_log; available: {sorted(log['split'].unique())}")
        log = log[log["split"] == split]
    runs = select_runs(runs, where)
    df = runs[list(RUNS_COLUMNS)].merge(log[["run_id", "step", value]].dropna(subset=[value]), on="run_id")
    if df.empty:
        raise ValueError(f"log: no {value} values for the selected runs")
    df["config"] = display_labels(df)  # one hue per variant, never two variants under one label
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    sns.lineplot(data=df, x="step", y=value, hue="config", errorbar="sd", ax=ax)
    what = f"Validation {value} on {split}" if is_eval else f"Training {value}"
    ax.set(xlabel="step", ylabel=value + (f" ({split})" if split else ""),
           title=f"{what} against step (seed mean +/- 1 sd)")
    fig.tight_layout()
    return fig


def plot_validation_curves(runs: pd.DataFrame, eval_log: pd.DataFrame, *, value: str = "ppl", splits=None,
                           where: dict | None = None) -> Figure:
    """Validation `value` against step on every domain (one panel per split, default all that
    were evaluated), one line per variant: seed mean with a 1-sd band (section 5.4). Perplexity
    is drawn on a log axis: it falls by orders of magnitude early in training."""
    validate(eval_log, "eval_log")
    if value not in ("ppl", "loss"):
        raise ValueError(f"value: {value!r} not allowed; allowed: ['ppl', 'loss']")
    runs = select_runs(runs, where)
    df = runs[list(RUNS_COLUMNS)].merge(eval_log[["run_id", "step", "split", value]].dropna(subset=[value]), on="run_id")
    if df.empty:
        raise ValueError(f"eval_log: no {value} values for the selected runs")
    names = domain_panels(df, splits, f"validation {value}")
    ylabel = f"validation {value}" + (" (nats)" if value == "loss" else "")
    panels = {s: (df["split"] == s, value, ylabel) for s in names}
    return _variant_panels(df, panels, log_y=names if value == "ppl" else (),
                           title=f"Validation {value} per domain over training (seed mean +/- 1 sd)")


def plot_train_dynamics(runs: pd.DataFrame, train_log: pd.DataFrame, *, columns=("lr", "grad_norm", "tokens_per_s"),
                        where: dict | None = None) -> Figure:
    """What the training loop logs besides the loss (section 4.3's recipe), against step (one panel per train_log
    column that has values: by default the learning rate, the gradient norm before clipping (log
    axis) and the throughput), one line per variant: seed mean with a 1-sd band."""
    validate(train_log, "train_log")
    unknown = [c for c in columns if c not in train_log.columns or c in ("run_id", "step")]
    if unknown:
        raise ValueError(f"columns: {unknown} not logged; allowed: {list(train_log.columns[2:])}")
    runs = select_runs(runs, where)
    df = runs[list(RUNS_COLUMNS)].merge(train_log[["run_id", "step", *columns]], on="run_id")
    have = [c for c in columns if df[c].notna().any()]
    if not have:
        raise ValueError(f"train_log: no values of {list(columns)} for the selected runs")
    panels = {c: (df[c].notna(), c, TRAIN_LOG_LABELS.get(c, c)) for c in have}
    return _variant_panels(df, panels, log_y=("grad_norm",),
                           title="Training dynamics: " + ", ".join(TRAIN_LOG_LABELS.get(c, c) for c in have))


# -- the training loss, smoothed ------------------------------------------------------------------------------
MIXED = "all domains"
"""The `domain` of smoothed_train_loss rows when the train log does not say which domain a step's batch came from."""


def smoothed_train_loss(runs: pd.DataFrame, train_log: pd.DataFrame, *, window: int | None = None,
                        where: dict | None = None) -> pd.DataFrame:
    """The training loss per variant as a running mean over `window` logged steps,
    smooth(t) = mean of loss over the run's last `window` logged steps up to t, then seed mean, sd
    and n per step (section 5.4): columns variant, config, domain, step, mean, sd, n.

    A step's batch can come from one domain (windows are read in order inside single-domain
    chunks, so a small batch often holds one chunk), and the raw per-step loss then zig-zags
    between the domains' losses. With a `domain` column in the train log (the domain of the
    step's batch) each domain is smoothed on its own steps and drawn apart; without one (the
    results database does not record it) the loss is the training mixture's, smoothed across
    domains, and `domain` is MIXED. `window` defaults to a tenth of a run's logged steps, at
    most 25; attrs["window"] holds it and attrs["how"] says all this in one phrase for a caption."""
    validate(train_log, "train_log")
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1):
        raise ValueError(f"window: must be an integer >= 1 (logged steps), got {window!r}")
    runs = select_runs(runs, where)
    per_domain = "domain" in train_log.columns and train_log["domain"].notna().any()
    cols = ["run_id", "step", "loss"] + (["domain"] if per_domain else [])
    df = runs[list(RUNS_COLUMNS)].merge(train_log[cols].dropna(subset=["loss"]), on="run_id")
    if df.empty:
        raise ValueError("train_log: no training loss for the selected runs")
    if not per_domain:
        df["domain"] = MIXED
    df["domain"] = df["domain"].astype(str)
    if window is None:
        window = int(max(1, min(25, df.groupby("run_id")["step"].nunique().min() // 10)))
    df = df.sort_values(["run_id", "domain", "step"])
    df["smooth"] = df.groupby(["run_id", "domain"])["loss"].transform(
        lambda s: s.rolling(window, min_periods=1).mean())
    df["config"] = display_labels(df)  # one label per variant, never two variants under one label
    out = (df.groupby(["variant", "config", "domain", "step"])["smooth"]
           .agg(mean="mean", sd=lambda s: s.std(ddof=1) if len(s) > 1 else np.nan, n="size").reset_index())
    out.attrs["window"] = window
    out.attrs["how"] = (f"per domain (the domain of each step's batch), each a running mean over {window} of "
                        f"its logged steps" if per_domain else
                        f"a running mean over {window} logged steps of the loss on the training mixture: the train "
                        f"log does not record which domain each step's batch came from, so domains are not drawn "
                        f"apart (the validation curves are per domain)")
    return out


def plot_train_loss(runs: pd.DataFrame, train_log: pd.DataFrame, *, window: int | None = None,
                    where: dict | None = None) -> Figure:
    """The smoothed training loss (`smoothed_train_loss`) against step: one panel per domain (one
    panel, "all domains", when the train log does not record it), one line per variant, seed
    mean with a 1-sd band (section 5.4); the title says the window and what was smoothed."""
    import seaborn as sns
    from matplotlib.figure import Figure

    curve = smoothed_train_loss(runs, train_log, window=window, where=where)
    domains = sorted(curve["domain"].unique())
    order = sorted(curve["config"].unique())
    palette = dict(zip(order, sns.color_palette(n_colors=len(order))))
    fig = Figure(figsize=(4.6 * len(domains), 3.8), layout="constrained")
    axes = fig.subplots(1, len(domains), squeeze=False)[0]
    for ax, domain in zip(axes, domains):
        for config in order:
            g = curve[(curve["domain"] == domain) & (curve["config"] == config)].sort_values("step")
            if g.empty:
                continue
            ax.plot(g["step"], g["mean"], color=palette[config], label=config)
            sd = g["sd"].fillna(0)
            ax.fill_between(g["step"], g["mean"] - sd, g["mean"] + sd, color=palette[config], alpha=0.2, lw=0)
        ax.set(title=domain if domain != MIXED else "training mixture (all domains)", xlabel="step",
               ylabel="training loss (nats), running mean")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=7)
    w = curve.attrs["window"]
    fig.suptitle(f"Training loss, running mean over {w} logged step{'s' * (w > 1)}"
                 + (" per domain" if domains != [MIXED] else " (batches' domains not logged)")
                 + " (seed mean +/- 1 sd)")
    return fig
