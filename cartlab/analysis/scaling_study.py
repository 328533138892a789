"""The joint law L(N, D) on a study's runs (paper section 7.3; notebooks/scaling_law.ipynb):
the runs' points, the families a law can be fitted to, the fits, their tables and figures.

    points = scaling_points(res.runs, res.eval_log, split="wiki")   # one row per run: N, D, FLOPs, loss
    ready, short = law_families(points)                             # {family: rows}, {family: why not}
    fits = joint_fits(ready["cart P=2 R=4"])                        # {"stored": fit, "effective": fit}
    law_table(fits); frontier_table(fits, flops_per_token, C)
    plot_iso_loss(fits); plot_compute_frontier(fits, flops_per_token, C); plot_law_residuals(fits)

N and FLOPs come from the model accounting of each run's stored config (`cartlab.analysis.runs`,
shared with `cartlab.analysis.compute`): non-embedding stored / effective parameters and the
training FLOPs per token the loop logs (LM head, LRT memory passes, truncated BPTT and random R
included).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cartlab.analysis.figures import log_ticks, sci_label
from cartlab.analysis.joint_law import CHINCHILLA_PARAMS, fit_chinchilla
from cartlab.analysis.runs import run_accounting
from cartlab.analysis.schema import describe_variants, family_label, final_eval


def scaling_points(runs: pd.DataFrame, eval_log: pd.DataFrame, *, split: str) -> pd.DataFrame:
    """One row per run for the joint law L(N, D) (section 7.3): its variant, `family` (the
    architecture apart from width: "cart P=2 R=4", "dense", with hooks and fields set by hand),
    n_stored and n_effective (non-embedding parameters, `cartlab.model.account` of the run's
    stored model config), tokens (D: training tokens), flops_per_token (training, LM head
    included, as the training loop counts it), flops = flops_per_token * tokens, and loss: the
    final validation loss on `split`, or the mean over the run's domains for split="mean".

    Needs each run's training config (the results database's config_json; published rows have
    none). Within a family each (N, D) cell must hold the seeds of ONE variant: two variants
    there (say two learning rates) are refused by name, never pooled."""
    fe = final_eval(runs, eval_log)
    if split == "mean":  # every run's domains weigh equally
        fe = fe.drop_duplicates("run_id").assign(loss=fe["run_id"].map(fe.groupby("run_id")["loss"].mean()))
    else:
        if split not in set(fe["split"]):
            raise ValueError(f"split: {split!r} not among the runs' evaluated splits {sorted(set(fe['split']))}, "
                             f"or 'mean' for the mean over them")
        fe = fe[fe["split"] == split]
    if fe.empty:
        raise ValueError("runs: no run has a final evaluation")
    configs = runs.set_index("run_id")["config_json"] if "config_json" in runs.columns else pd.Series(dtype=object)
    # run_accounting names the first run without a stored config: the law needs runs trained here
    rows = []
    for row in fe.to_dict("records"):
        acc = run_accounting({"run_id": row["run_id"], "config_json": configs.get(row["run_id"])})
        rows.append({"run_id": row["run_id"], "variant": row["variant"], "variant_label": row["variant_label"],
                     "family": family_label(row), "model": row["model"], "d_model": row["d_model"], "seed": row["seed"],
                     "n_stored": float(acc.non_embedding_stored), "n_effective": float(acc.non_embedding_effective),
                     "tokens": float(row["tokens"]), "flops_per_token": acc.train_flops_per_token(),
                     "loss": float(row["loss"])})
    points = pd.DataFrame(rows)
    points["flops"] = points["flops_per_token"] * points["tokens"]
    cells = points.groupby(["family", "n_stored", "tokens"])["variant"].nunique()
    if (cells > 1).any():
        family, n, d = cells.index[cells > 1][0]
        at = points[(points["family"] == family) & (points["n_stored"] == n) & (points["tokens"] == d)]
        raise ValueError(f"runs: {family} at N={n:.4g}, D={d:.4g} holds several variants, not seeds of one "
                         f"configuration: {describe_variants(runs, at['variant'])}; select the runs to fit")
    return points.sort_values(["family", "n_stored", "tokens", "seed"]).reset_index(drop=True)


def law_families(points: pd.DataFrame, *, min_sizes: int = 3, min_budgets: int = 3) -> tuple[dict, dict]:
    """Split `scaling_points` rows by family into ({family: rows} that a joint law can be fitted
    to, {family: why not}): the law's 5 parameters need >= `min_sizes` model sizes, >=
    `min_budgets` token budgets and >= 6 runs (section 7.3)."""
    ready, short = {}, {}
    for family, g in points.groupby("family"):
        sizes, budgets = g["n_stored"].nunique(), g["tokens"].nunique()
        if sizes >= min_sizes and budgets >= min_budgets and len(g) >= 6:
            ready[family] = g
        else:
            short[family] = (f"its {len(g)} run(s) span {sizes} model size(s) and {budgets} token budget(s); the "
                             f"law's 5 parameters need >= {min_sizes} sizes, >= {min_budgets} budgets and >= 6 runs")
    return ready, short


def joint_fits(points: pd.DataFrame, *, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> dict:
    """fit_chinchilla of loss on (N, tokens) for N = n_stored and N = n_effective, the seeds of
    one variant forming one bootstrap cluster (section 7.3): {"stored": fit, "effective": fit}.
    `points` is one family's rows of `scaling_points`."""
    if points["family"].nunique() > 1:
        raise ValueError(f"points: one law per family; got {sorted(points['family'].unique())}")
    return {kind: fit_chinchilla(points[f"n_{kind}"], points["tokens"], points["loss"], groups=points["variant"],
                                 n_boot=n_boot, level=level, seed=seed)
            for kind in ("stored", "effective")}


def law_table(fits: dict) -> pd.DataFrame:
    """The parameters of several joint fits side by side (section 7.3): one row per parameter
    (E, A, B, alpha, beta, and a = beta / (alpha + beta), the exponent of N_opt ~ C^a under C =
    k N D), one estimate/lo/hi column triple per fit name, intervals from the fits' bootstrap."""
    out = {"parameter": [*CHINCHILLA_PARAMS, "a"]}
    for name, fit in fits.items():
        a = fit.beta / (fit.alpha + fit.beta)
        if len(fit.samples):
            boot = fit.samples[:, 4] / (fit.samples[:, 3] + fit.samples[:, 4])
            a_ci = tuple(np.quantile(boot, [(1 - fit.level) / 2, (1 + fit.level) / 2]))
        else:
            a_ci = (np.nan, np.nan)
        cis = [*(fit.ci[p] for p in CHINCHILLA_PARAMS), a_ci]
        out[f"{name}"] = [*(getattr(fit, p) for p in CHINCHILLA_PARAMS), a]
        out[f"{name} lo"] = [lo for lo, _ in cis]
        out[f"{name} hi"] = [hi for _, hi in cis]
    return pd.DataFrame(out)


def frontier_table(fits: dict, flops_per_token: dict, C) -> pd.DataFrame:
    """The compute-optimal allocation of each joint fit at the budgets `C` (section 7.3): one row
    per (fit name, C) with N_opt, D_opt, tokens per parameter D/N and, for fits with bootstrap
    refits, their percentile band (N_lo, N_hi, D_lo, D_hi)."""
    C = np.atleast_1d(np.asarray(C, float))
    frames = []
    for name, fit in fits.items():
        n_opt, d_opt = fit.optimal_allocation(C, flops_per_token[name])
        frame = pd.DataFrame({"N": name, "C": C, "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt})
        if len(fit.samples):
            (n_lo, n_hi), (d_lo, d_hi) = fit.optimal_allocation_band(C, flops_per_token[name])
            frame = frame.assign(N_lo=n_lo, N_hi=n_hi, D_lo=d_lo, D_hi=d_hi)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# -- figures ---------------------------------------------------------------------------------------------
N_LABELS = {"stored": "N: stored non-embedding parameters", "effective": "N: effective non-embedding parameters"}


def plot_iso_loss(fits: dict, *, frontier: dict | None = None, levels: int = 10) -> Figure:
    """Iso-loss contours of each joint fit L(N, D) = E + A N^-alpha + B D^-beta (section 7.3),
    one panel per fit ({"stored": fit, "effective": fit}: which parameter count is N), with the
    fitted runs drawn in the colour of their measured loss on the same scale. With `frontier`
    ({name: FLOPs per token, a number k for C = k N D or a callable of N}) the compute-optimal
    path (N*(C), D*(C)) is drawn too."""
    from matplotlib.figure import Figure
    import matplotlib.colors as mcolors

    fig = Figure(figsize=(5.2 * len(fits), 4.4))
    axes = fig.subplots(1, len(fits), squeeze=False)[0]
    for ax, (name, fit) in zip(axes, fits.items()):
        n, d, loss = (fit.data[c].to_numpy(float) for c in ("n", "d", "loss"))
        N, D = np.meshgrid(np.geomspace(n.min() / 2, n.max() * 2, 200), np.geomspace(d.min() / 2, d.max() * 2, 200))
        Z = fit.predict(N, D)
        norm = mcolors.Normalize(min(loss.min(), np.quantile(Z, 0.02)), max(loss.max(), np.quantile(Z, 0.98)))
        cs = ax.contour(N, D, Z, levels=np.linspace(norm.vmin, norm.vmax, levels), cmap="viridis", norm=norm)
        ax.clabel(cs, fmt="%.2f", fontsize=7)
        dots = ax.scatter(n, d, c=loss, cmap="viridis", norm=norm, edgecolors="k", s=45, zorder=3, label="runs")
        if frontier and name in frontier:
            f = frontier[name]
            spent = (f(n) if callable(f) else f * n) * d  # the runs' training FLOPs
            C = np.geomspace(spent.min() / 30, spent.max() * 30, 80)
            n_opt, d_opt = fit.optimal_allocation(C, f)
            keep = (n_opt > N.min()) & (n_opt < N.max()) & (d_opt > D.min()) & (d_opt < D.max())
            ax.plot(n_opt[keep], d_opt[keep], "r--", lw=1.5, label="compute-optimal N*(C), D*(C)")
        ax.set(xscale="log", yscale="log", xlim=(N.min(), N.max()), ylim=(D.min(), D.max()),
               xlabel=N_LABELS.get(name, f"N ({name})"), ylabel="D: training tokens",
               title=f"fitted loss, N = {name}: alpha = {fit.alpha:.2f}, beta = {fit.beta:.2f}")
        log_ticks(ax.xaxis)
        log_ticks(ax.yaxis)
        ax.legend(fontsize=7, loc="lower left", framealpha=0.9)
        fig.colorbar(dots, ax=ax, label="validation loss (nats)")
    fig.tight_layout()
    return fig


def plot_compute_frontier(fits: dict, flops_per_token: dict, C, *, points: pd.DataFrame | None = None) -> Figure:
    """The compute-optimal allocation N*(C), D*(C) of each joint fit (section 7.3) with its
    bootstrap band, for C = f(N) D with f = `flops_per_token[name]` (a number k or a callable of
    N). `points` (scaling_points rows: n_stored, n_effective, tokens, flops) draws the runs
    and shades the compute range they span: the frontier outside it is an extrapolation."""
    import seaborn as sns
    from matplotlib.figure import Figure

    C = np.asarray(C, float)
    fig = Figure(figsize=(10, 4))
    ax_n, ax_d = fig.subplots(1, 2)
    colors = dict(zip(fits, sns.color_palette(n_colors=len(fits))))
    for name, fit in fits.items():
        f = flops_per_token[name]
        n_opt, d_opt = fit.optimal_allocation(C, f)
        ax_n.plot(C, n_opt, color=colors[name], label=f"N = {name}")
        ax_d.plot(C, d_opt, color=colors[name], label=f"N = {name}")
        if len(fit.samples):
            (n_lo, n_hi), (d_lo, d_hi) = fit.optimal_allocation_band(C, f)
            ax_n.fill_between(C, n_lo, n_hi, color=colors[name], alpha=0.2)
            ax_d.fill_between(C, d_lo, d_hi, color=colors[name], alpha=0.2,
                              label=f"{fit.level:.0%} bootstrap band")
        if points is not None:
            ax_n.plot(points["flops"], points[f"n_{name}"], "o", color=colors[name], mec="k", ms=4)
    if points is not None:
        ax_d.plot(points["flops"], points["tokens"], "o", color="grey", mec="k", ms=4, label="runs")
        for ax in (ax_n, ax_d):
            ax.axvspan(points["flops"].min(), points["flops"].max(), color="grey", alpha=0.1, lw=0)
    ax_n.set(xscale="log", yscale="log", xlabel="C: training FLOPs", ylabel="N*: non-embedding parameters",
             title="compute-optimal model size N*(C)")
    ax_d.set(xscale="log", yscale="log", xlabel="C: training FLOPs", ylabel="D*: training tokens",
             title="compute-optimal data D*(C)")
    for ax in (ax_n, ax_d):
        log_ticks(ax.xaxis, sci_label)
        log_ticks(ax.yaxis)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_law_residuals(fits: dict) -> Figure:
    """Log residuals log L - log L_hat of each joint fit against N and against D (section 7.3):
    a trend left in either means the law misses a term."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2 * len(fits)))
    axes = fig.subplots(len(fits), 2, squeeze=False)
    for row, (name, fit) in zip(axes, fits.items()):
        for ax, col, label in zip(row, ("n", "d"), (N_LABELS.get(name, f"N ({name})"), "D: training tokens")):
            ax.axhline(0, color="grey", lw=0.8)
            ax.plot(fit.data[col], fit.residuals, "o", color="k")
            ax.set(xscale="log", xlabel=label, ylabel="log L - log L_hat",
                   title=f"N = {name}: residuals against {col.upper()}")
            log_ticks(ax.xaxis)
    fig.tight_layout()
    return fig
