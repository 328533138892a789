"""The test-time depth profile (issue 14; paper section 7.4, Table 12): validation loss against the
inference loop count R, per run and domain, its shape, and whether more loops than the model was
trained with keep helping.

    prof = depth_profiles(res.probes, res.runs)       # one row per (run, domain, inference R)
    summary = summarise_profiles(prof)                # one row per (variant, domain): shape, best R, ...
    classify_profile([1, 2, 4, 8, 16], [4.0, 3.6, 3.4, 3.9, 4.6], trained_r=4)   # 'v-shape'
    classify_profile([1, 2, 4], [3.0, 3.3, 3.9], trained_r=1)                     # 'rising'
    plot_depth_profiles(prof, summary)                # the profiles drawn, shapes in the legend

The profile is the `depth_profile` measure (`cartlab.measures.depth`: loss at R = 1 .. 4x the
trained R on the evaluation's fixed batches). Its shape is not stored: `classify_profile`
recomputes it from the stored losses, so changing the rule never needs a re-run.

**The rule** (`classify_profile`). L(r) is the loss at inference R = r, R the trained R (under
`random_loops`, the configured mean), tol >= 0 a tolerance in nats. Only the profile from R
outwards is judged (below R a fixed-R model is often erratic and that is not the question):

    A       = the grid points r >= R
    gain    = L(R) - min_A L                   what running deeper than R can buy (>= 0)
    rise    = max over r in A of L(r) - min{L(r') : r' in A, r' < r}
                                               the largest worsening past R from the best so far
    regret  = L(r_max) - min_A L               what the deepest R loses to the best one past R
    b       = the r in A with the smallest L (the smallest such r on a tie)

    1. r_max <= R                              -> "untested"  the grid stops at R (an unshared core)
    2. rise <= tol, gain > tol                 -> "monotone"  keeps improving past R, never worse
                                                              than before by more than tol, to 4R
    3. rise <= tol                             -> "plateau"   flat past R within tol
    4. regret <= tol                           -> "other"     worse somewhere past R but recovered by 4R
    5. gain <= tol and min_{r<R} L < L(R) - tol -> "degrading" fewer loops than trained were better
                                                              and more are worse still
    6. no r < b has L(r) > L(b) + tol          -> "rising"    worse past its best, with nothing
                                                              worse before it: the loss only rises
                                                              (e.g. trained at R=1, the smallest R
                                                              measured, and worse at every R > 1)
    7. b <= 2R                                 -> "v-shape"   falls into a best at (or within the
                                                              dense grid around) R, worse beyond
                                                              by > tol: both arms of a V
    8. otherwise                               -> "other"

Noise. One profile is measured on fixed batches, so its points move smoothly with r; what varies
is the model, between seeds. `classify_profile` takes tol = `rel_tol` x L(R) (1%) by default;
`summarise_profiles` classifies the seed-mean profile of each variant with
tol = max(rel_tol x L(R), k x the seeds' sd of L(R)): a difference along the profile smaller than
k standard deviations of the seed-to-seed spread of the loss itself is not called a trend.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cartlab.analysis.figures import domain_panels
from cartlab.analysis.schema import display_labels, final_measurements, validate, with_variants

PROBE = "depth_profile"
SHAPES = ("monotone", "plateau", "rising", "v-shape", "degrading", "other", "untested")
REL_TOL = 0.01
"""Default tolerance: 1% of the loss at the trained R."""

PROFILE_COLUMNS = ("run_id", "variant", "config", "seed", "split", "n_loops", "loss", "ppl", "trained_r")
SUMMARY_COLUMNS = ("variant", "config", "split", "trained_r", "n_seeds", "shape", "best_r", "loss_trained",
                   "loss_best", "max_r", "loss_max_r", "improves_past_trained", "tol", "seed_shapes", "sentence")


def depth_profiles(probes: pd.DataFrame | None, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, domain, inference R) of the `depth_profile` measure, at each run's last
    measured step, joined to the run's variant: columns PROFILE_COLUMNS, where `config` is the
    variant's display label (never shared by two variants) and `trained_r` the run's R. Empty
    (with those columns) when no run has a profile, e.g. the paper's tables."""
    p = final_measurements(probes, PROBE)
    if p is None:
        return pd.DataFrame(columns=list(PROFILE_COLUMNS))
    wide = p.pivot_table(index=["run_id", "split", "x"], columns="metric", values="value", aggfunc="last")
    wide = wide.reset_index().rename(columns={"x": "n_loops"})
    validate(runs, "runs")
    runs = with_variants(runs)
    runs = runs.assign(config=display_labels(runs), trained_r=runs["n_loops"])
    out = runs[["run_id", "variant", "config", "seed", "trained_r"]].merge(wide, on="run_id", how="inner")
    out = out.astype({"n_loops": int, "trained_r": int})
    return out[list(PROFILE_COLUMNS)].sort_values(["config", "split", "run_id", "n_loops"]).reset_index(drop=True)


def classify_profile(n_loops, loss, trained_r: int, tol: float | None = None, *, rel_tol: float = REL_TOL) -> str:
    """The shape of one depth profile (losses `loss` at inference R `n_loops`, any order) of a
    model trained at `trained_r`: one of SHAPES, by the rule in this module's docstring. `tol`
    (nats) defaults to `rel_tol` x the loss at the trained R."""
    r, L = _profile(n_loops, loss, trained_r)
    tol = _tol(tol, rel_tol, L[r == trained_r][0])
    return _shape(r, L, trained_r, tol)


def profile_means(profiles: pd.DataFrame, metric: str = "loss") -> pd.DataFrame:
    """Seed mean, sd and count of `metric` per (variant, domain, inference R): the points and error
    bars of the profile figure. Runs are pooled only within one variant."""
    if metric not in ("loss", "ppl"):
        raise ValueError(f"metric: {metric!r} not allowed; allowed: ['loss', 'ppl']")
    keys = ["variant", "config", "split", "trained_r", "n_loops"]
    return (profiles.groupby(keys)[metric].agg(mean="mean", sd="std", n="count").reset_index()
            .sort_values(keys).reset_index(drop=True))


def summarise_profiles(profiles: pd.DataFrame, *, rel_tol: float = REL_TOL, k: float = 2.0) -> pd.DataFrame:
    """One row per (variant, domain): the seed-mean loss profile's shape with
    tol = max(rel_tol x L(R), k x sd over seeds of L(R)), the best inference R and its loss, the
    loss at the trained and the largest R, whether some R past the trained one beats it by more
    than tol (`improves_past_trained`), each seed's own shape (at rel_tol), and a sentence.
    Only the inference R every seed of the variant was measured at enter the mean."""
    if not k >= 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    rows = []
    for (variant, split), g in profiles.groupby(["variant", "split"], sort=True):
        R = int(g["trained_r"].iloc[0])
        seeds = g.pivot_table(index="n_loops", columns="run_id", values="loss").dropna()  # (R values, runs)
        r, L = seeds.index.to_numpy(), seeds.mean(axis=1).to_numpy()
        n = seeds.shape[1]
        if R not in seeds.index:
            raise ValueError(f"profiles: variant {variant} on {split!r} has no loss at its trained R={R}")
        at_r = seeds.loc[R]  # each seed's loss at the trained R
        noise = float(at_r.std(ddof=1)) if n > 1 else 0.0
        tol = max(rel_tol * float(at_r.mean()), k * noise)
        shape = _shape(r, L, R, tol)
        past = r > R
        b = int(r[np.argmin(L)])
        row = {
            "variant": variant, "config": g["config"].iloc[0], "split": split, "trained_r": R, "n_seeds": n,
            "shape": shape, "best_r": b, "loss_trained": float(L[r == R][0]), "loss_best": float(L.min()),
            "max_r": int(r.max()), "loss_max_r": float(L[-1]),
            "improves_past_trained": bool(past.any() and L[past].min() < L[r == R][0] - tol), "tol": tol,
            "seed_shapes": ", ".join(classify_profile(r, seeds[c].to_numpy(), R, rel_tol=rel_tol) for c in seeds),
        }
        row["sentence"] = _sentence(row)
        rows.append(row)
    out = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    return out.sort_values(["config", "split"]).reset_index(drop=True)


def profile_table(profiles: pd.DataFrame, metric: str = "loss") -> pd.DataFrame:
    """The paper's Table 12 layout: one row per (variant, domain), one column per inference R
    ("R=1", ...), seed-mean `metric`."""
    means = profile_means(profiles, metric)
    table = means.pivot_table(index=["config", "split", "trained_r"], columns="n_loops", values="mean")
    table.columns = [f"R={c}" for c in table.columns]
    return table


def describe(summary: pd.DataFrame) -> str:
    """The summary in words, one markdown bullet per variant: on which domains performance keeps
    improving past the trained R, and each domain's shape."""
    lines = []
    for config, g in summary.groupby("config", sort=True):
        better = g[g["improves_past_trained"]]
        shapes = "; ".join(f"{s.split}: {s.shape} (best R={s.best_r})" for s in g.itertuples())
        R = int(g["trained_r"].iloc[0])
        if better.empty:
            verdict = f"does **not** improve past its trained R={R} on any domain"
        elif len(better) == len(g):
            verdict = f"**keeps improving past its trained R={R}** on every domain"
        else:
            verdict = (f"improves past its trained R={R} on {len(better)} of {len(g)} domains "
                       f"({', '.join(better['split'])})")
        lines.append(f"- `{config}` ({int(g['n_seeds'].max())} seed(s)): {verdict}. Shapes: {shapes}.")
    return "\n".join(lines)


# -- the rule ---------------------------------------------------------------------------------------
def _profile(n_loops, loss, trained_r) -> tuple[np.ndarray, np.ndarray]:
    r, L = np.asarray(n_loops, dtype=float), np.asarray(loss, dtype=float)
    if r.ndim != 1 or r.shape != L.shape or len(r) < 2:
        raise ValueError(f"n_loops, loss: need two 1-d sequences of equal length >= 2, got {len(r)} and {len(L)}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(L))):
        raise ValueError("n_loops, loss: every value must be finite")
    if len(np.unique(r)) != len(r):
        raise ValueError(f"n_loops: repeated inference R in {sorted(r.tolist())}")
    if trained_r not in r:
        raise ValueError(f"trained_r={trained_r!r} is not among n_loops {sorted(int(x) for x in r)}")
    order = np.argsort(r)
    return r[order], L[order]


def _tol(tol, rel_tol, loss_at_trained) -> float:
    if tol is None:
        if not rel_tol >= 0:
            raise ValueError(f"rel_tol: must be >= 0, got {rel_tol}")
        return rel_tol * abs(float(loss_at_trained))
    if not tol >= 0:
        raise ValueError(f"tol: must be >= 0 (nats), got {tol}")
    return float(tol)


def _shape(r: np.ndarray, L: np.ndarray, R: int, tol: float) -> str:
    """The rule of the module docstring on a profile sorted by r."""
    if r.max() <= R:
        return "untested"
    A = L[r >= R]  # from the trained R outwards
    L_R = A[0]
    gain, regret = L_R - A.min(), A[-1] - A.min()
    rise = max(float(A[j] - A[:j].min()) for j in range(1, len(A)))
    if rise <= tol:
        return "monotone" if gain > tol else "plateau"
    if regret <= tol:
        return "other"
    below = L[r < R]
    if gain <= tol and below.size and below.min() < L_R - tol:
        return "degrading"
    b = r[r >= R][np.argmin(A)]
    before = L[r < b]  # the whole measured profile left of the best point, below R included
    if not before.size or before.max() <= L[r == b][0] + tol:
        return "rising"  # one arm only: no descent into the best point
    return "v-shape" if b <= 2 * R else "other"


def _sentence(row: dict) -> str:
    R, top = row["trained_r"], row["max_r"]
    delta = row["loss_max_r"] - row["loss_trained"]
    verdict = "keeps improving past the trained R" if row["improves_past_trained"] else \
        "does not improve past the trained R"
    return (f"{row['config']} on {row['split']}: {row['shape']} (tol {row['tol']:.3f} nats); "
            f"loss {row['loss_trained']:.3f} at the trained R={R}, best {row['loss_best']:.3f} at R={row['best_r']}, "
            f"{row['loss_max_r']:.3f} at R={top} ({delta:+.3f}); {verdict}.")


# -- figures ---------------------------------------------------------------------------------------------
def plot_depth_profiles(profiles: pd.DataFrame, summary: pd.DataFrame | None = None, *, metric: str = "loss",
                        splits=None) -> Figure:
    """Validation `metric` against the inference loop count R per domain (section 7.4, the shape of
    Table 12):
    one line per variant, seed mean with 1-sd error bars (`cartlab.analysis.depth.profile_means`),
    a dotted line at the variant's trained R, and with `summary` (`summarise_profiles`) each
    variant's shape on that domain in the legend. `profiles` is `depth_profiles(...)`."""
    import seaborn as sns
    from matplotlib.figure import Figure

    if profiles.empty:
        raise ValueError("profiles: no depth profiles to plot (train with the depth_profile measure)")
    means = profile_means(profiles, metric)
    panels = domain_panels(means, splits, "the depth profile")
    labels = means.drop_duplicates("variant").set_index("variant")["config"].sort_values()  # distinct per variant
    colors = dict(zip(labels.index, zip(sns.color_palette(n_colors=len(labels)), labels)))
    shape = {} if summary is None else {(s.variant, s.split): s.shape for s in summary.itertuples()}
    fig = Figure(figsize=(4.2 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, split in zip(axes, panels):
        for variant, g in means[means["split"] == split].groupby("variant"):
            color, label = colors[variant]
            tail = f" [{shape[variant, split]}]" if (variant, split) in shape else ""
            ax.errorbar(g["n_loops"], g["mean"], yerr=g["sd"].fillna(0), marker="o", ms=3, color=color, capsize=2,
                        label=label + tail)
            ax.axvline(g["trained_r"].iloc[0], ls=":", color=color)
        ax.set(title=f"{split}: {metric} against inference R", xlabel="inference loop count R",
               ylabel=f"validation {metric}" + (" (nats/token)" if metric == "loss" else ""))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=6)
    fig.suptitle("Test-time depth profile: dotted = trained R, bars = 1 sd over seeds")
    fig.tight_layout()
    return fig


def plot_variable_r_profile(downstream: pd.DataFrame, runs: pd.DataFrame | None = None, *,
                            run_id: str | None = None, num_fewshot: int = 0) -> Figure:
    """Downstream metrics against the inference loop count (section 7.4, Table 12): one panel per
    (task, metric); with `runs`, a dashed line marks the trained R."""
    from matplotlib.figure import Figure

    validate(downstream, "downstream")
    df = downstream[downstream["num_fewshot"] == num_fewshot]
    if run_id is None:
        counts = df.groupby("run_id")["n_loops"].nunique()
        if counts.empty or counts.max() < 2:
            raise ValueError("downstream: no run evaluated at >= 2 inference loop counts (n_loops)")
        run_id = counts.idxmax()
    df = df[df["run_id"] == run_id]
    if df["n_loops"].nunique() < 2:
        raise ValueError(f"run_id: {run_id!r} has no downstream rows at >= 2 n_loops")
    if df.duplicated(["task", "metric", "n_loops"]).any():
        raise ValueError(f"downstream: run {run_id!r} has scores of more than one protocol at one loop count; "
                         f"draw one sweep at a time (cartlab.eval.protocol.sweeps)")
    panels = sorted(df.groupby(["task", "metric"]).groups)
    fig = Figure(figsize=(3 * len(panels), 3))
    axes = fig.subplots(1, len(panels), squeeze=False)
    trained = None
    if runs is not None:
        validate(runs, "runs")
        match = runs.loc[runs["run_id"] == run_id, "n_loops"]
        trained = float(match.iloc[0]) if len(match) else None
    for ax, (task, metric) in zip(axes[0], panels):
        g = df[(df["task"] == task) & (df["metric"] == metric)].sort_values("n_loops")
        ax.errorbar(g["n_loops"], g["value"], yerr=g["stderr"].fillna(0), marker="o")
        if trained is not None:
            ax.axvline(trained, ls="--", color="grey")
        ax.set(title=f"{task} {metric}", xlabel="inference R", ylabel=metric,
               yscale="log" if "perplexity" in metric else "linear")
    fig.suptitle(f"Downstream metrics against the inference loop count ({num_fewshot}-shot"
                 + (", dashed: trained R)" if trained is not None else ")"))
    fig.tight_layout()
    return fig


# -- findings ---------------------------------------------------------------------------------------------------
def findings(res) -> list:
    """Do loops past the trained R help? Per variant and domain, the loss at inference 2R minus
    the loss at the trained R, paired within each seed (`cartlab.analysis.findings`; negative:
    running deeper helps). Variants without a depth profile, or whose grid stops before 2R, make
    none."""
    from cartlab.analysis.findings import paired_finding

    prof = depth_profiles(res.probes, res.runs)
    out = []
    for (variant, config, split), g in prof.groupby(["variant", "config", "split"], sort=False):
        R = int(g["trained_r"].iloc[0])
        at = g.pivot_table(index="run_id", columns="n_loops", values="loss")
        if R not in at.columns or 2 * R not in at.columns:
            continue
        out.append(paired_finding("depth", f"{config}: {2 * R} loops at inference vs the trained {R}", config,
                                  str(split), "loss", (at[2 * R] - at[R]).to_numpy(float)))
    return out
