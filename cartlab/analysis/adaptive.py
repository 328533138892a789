"""Adaptive depth (issue 27): the compute-quality frontier of exit rules and the fixed-point mode,
where halting saves loops at equal loss, and whether the loop contracts.

    pts = frontier_points(res.probes, res.runs)     # one row per (run, domain, curve, x): loss, loops
    frontier_means(pts)                             # seed mean and sd per (variant, domain, curve, x)
    sav = savings(pts)                              # per (variant, domain, curve): the fewest loops at equal loss
    describe_savings(sav)                           # the same in words
    conv = convergence(res.runs, res.probes, res.train_log)   # per (variant, domain, loop)
    verdicts(conv); describe_convergence(verdicts(conv))      # does the loop contract?
    plot_frontier(pts); plot_convergence(conv)

**The frontier** is the opt-in measure `adaptive_depth` (`cartlab.measures.adaptive`, after the last
step): per domain, a curve of (mean loops per token, validation loss) points for a fixed R = 1..2R
(`fixed`), for each exit rule over its thresholds (`kl`, `entropy`, `latent`, `argmax`, `learned`
with the hook exit_head), and for the fixed-point mode over iteration caps (`fixed_point`).

**Equal loss** (`equal_loss`, `savings`). A variant's reference is its trained depth: the `fixed`
point at the trained R (under random_loops the configured mean R), or, for a fixed-point model, its
solve at the largest iteration cap. A point and its reference are the same model on the same
batches, so they are compared within each seed: with d_s the point's loss minus the reference's in
seed s, excess = mean_s d_s, se its standard error over the seeds (0 for one seed) and L_ref the
seed-mean reference loss,

    tol = min(max(rel_tol x L_ref, k x se), MAX_TOL x L_ref)   (0.5%, 2 standard errors, at most 2%)

(seeds that disagree widen the margin, up to 2% of the loss and never more: the standard error
of two seeds can be as large as the effect). A point is at equal loss when excess <= tol (a point
better than the reference always is), and a curve saves loops when its cheapest point at equal loss runs at most (1 - MIN_SAVING) x the
reference's mean loops per token. The seed-to-seed spread of the loss itself is not the noise
here: after a short training it is far larger than any difference within one model (0.05-0.13
nats against 0.01-0.02 in the adaptive-depth study), and would call R=1 equal to R=4.

**Contraction** (`verdicts`). Per variant and domain at the last evaluation, seed means: the LTI
gate's radius (train_log rho_max, section 6), the radius and 2-norm of one loop step's Jacobian at
each loop (`loop_contraction`), and the relative state change of each loop run on to 4R
(`loop_residual`) or the solver's residual after each iteration (`solver`). Its tail rate q is the
geometric mean ratio residual(r+1) / residual(r) over the second half of the curve. The loop
contracts when the Jacobian's radius at the last trained loop is below 1 (where measured) and the
residual keeps falling, q < STALL ("falls geometrically" when q < GEOMETRIC, "falls slowly" up to
STALL, "levels off" up to 1 / STALL, else "grows").
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cartlab.analysis.figures import domain_panels
from cartlab.analysis.schema import display_labels, final_measurements, validate, with_variants

PROBE = "adaptive_depth"
REL_TOL = 0.005
"""Equal loss: within 0.5% of the reference loss, or k seed sd of it, whichever is larger."""
K = 2.0
MAX_TOL = 0.02
"""The margin never exceeds 2% of the reference loss, however much the seeds disagree."""
MIN_SAVING = 0.05
"""A curve saves loops when its cheapest equal-loss point needs at most 95% of the reference's loops."""
GEOMETRIC = 0.95
"""The residual falls geometrically when it shrinks by at least 5% per loop over the tail ..."""
STALL = 0.99
"""... and keeps falling (the loop contracts) while it shrinks by at least 1% per loop."""
EXIT_RULES = ("kl", "entropy", "latent", "argmax", "learned")

POINT_COLUMNS = ("run_id", "variant", "config", "seed", "split", "curve", "x", "loss", "loops", "trained_r")
SAVING_COLUMNS = ("variant", "config", "split", "curve", "reference", "ref_loss", "ref_loops", "n_seeds", "x", "loops",
                  "loss", "excess", "tol", "saved", "saves", "best_loss", "best_loops")
CONVERGENCE_COLUMNS = ("variant", "config", "split", "loop", "gate_radius", "jac_radius", "jac_norm", "residual",
                       "converged", "source", "trained_r", "n")


def _curve(metric: pd.Series) -> tuple[pd.Series, pd.Series]:
    """'fixed_point_loss' -> ('fixed_point', 'loss')."""
    parts = metric.str.rsplit("_", n=1)
    return parts.str[0], parts.str[1]


def _last_step(p: pd.DataFrame) -> pd.DataFrame:
    return p[p["step"] == p.groupby("run_id")["step"].transform("max")]


def _run_info(runs: pd.DataFrame) -> pd.DataFrame:
    validate(runs, "runs")
    runs = with_variants(runs)
    return runs.assign(config=display_labels(runs), trained_r=runs["n_loops"])[
        ["run_id", "variant", "config", "seed", "trained_r"]]


# -- the frontier ------------------------------------------------------------------------------------------
def frontier_points(probes: pd.DataFrame | None, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, domain, curve, x) of the `adaptive_depth` measure at each run's last
    measured step: its loss (nats) and mean loops per token, joined to the run's variant (columns
    POINT_COLUMNS; x is R, the threshold or the iteration cap). Empty when no run measured it."""
    p = final_measurements(probes, PROBE)
    if p is None:
        return pd.DataFrame(columns=list(POINT_COLUMNS))
    curve, what = _curve(p["metric"])
    p = p.assign(curve=curve, what=what)
    wide = p.pivot_table(index=["run_id", "split", "curve", "x"], columns="what", values="value", aggfunc="last")
    wide = wide.reset_index().dropna(subset=["loss", "loops"])
    out = _run_info(runs).merge(wide, on="run_id", how="inner")
    return out[list(POINT_COLUMNS)].sort_values(["config", "split", "curve", "x", "run_id"]).reset_index(drop=True)


def frontier_means(points: pd.DataFrame) -> pd.DataFrame:
    """Seed mean, sd and count of the loss and of the mean loops per token per (variant, domain,
    curve, x): the points and error bars of the frontier figure. Seeds pool only within a variant."""
    keys = ["variant", "config", "split", "curve", "x", "trained_r"]
    g = points.groupby(keys)
    out = pd.concat([g["loss"].agg(loss="mean", loss_sd="std", n="count"),
                     g["loops"].agg(loops="mean", loops_sd="std")], axis=1).reset_index()
    return out.sort_values(keys).reset_index(drop=True)


def _reference(v: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """A variant's trained depth on one domain: its fixed point at R, else its full fixed-point solve."""
    R = int(v["trained_r"].iloc[0])
    at = v[(v["curve"] == "fixed") & (v["x"] == R)]
    if len(at):
        return f"fixed R={R}", at
    fp = v[v["curve"] == "fixed_point"]
    if fp.empty:
        raise ValueError(f"points: variant {v['config'].iloc[0]} on {v['split'].iloc[0]!r} has neither a fixed point "
                         f"at its trained R={R} nor a fixed-point solve to compare with")
    cap = fp["x"].max()
    return f"fixed point, cap {cap:g}", fp[fp["x"] == cap]


def equal_loss(points: pd.DataFrame, *, rel_tol: float = REL_TOL, k: float = K) -> pd.DataFrame:
    """Every frontier point measured against its variant's reference on the same domain, paired
    within each seed (module docstring): one row per (variant, domain, curve, x) with the seed-mean
    loss and loops, the reference's name, loss and loops, the mean paired loss difference `excess`
    (nats), its standard error, the tolerance and whether the point is at equal loss (`equal`)."""
    if not rel_tol >= 0 or not k >= 0:
        raise ValueError(f"rel_tol, k: must be >= 0, got {rel_tol}, {k}")
    rows = []
    for (variant, split), v in points.groupby(["variant", "split"], sort=True):
        name, ref = _reference(v)
        ref_loss, ref_loops = ref.set_index("run_id")["loss"], float(ref["loops"].mean())
        for (curve, x), c in v.groupby(["curve", "x"], sort=True):
            d = (c.set_index("run_id")["loss"] - ref_loss).dropna()  # per seed: this point minus the reference
            se = float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else 0.0
            tol = min(max(rel_tol * float(ref_loss.mean()), k * se), MAX_TOL * float(ref_loss.mean()))
            rows.append({"variant": variant, "config": v["config"].iloc[0], "split": split, "curve": curve, "x": x,
                         "loss": float(c["loss"].mean()), "loops": float(c["loops"].mean()), "reference": name,
                         "ref_loss": float(ref_loss.mean()), "ref_loops": ref_loops, "excess": float(d.mean()),
                         "excess_se": se, "tol": tol, "n_seeds": len(d), "equal": bool(d.mean() <= tol)})
    return pd.DataFrame(rows)


def savings(points: pd.DataFrame, *, rel_tol: float = REL_TOL, k: float = K) -> pd.DataFrame:
    """Per (variant, domain, curve): the cheapest point at equal loss with the reference
    (`equal_loss`), its threshold `x`, mean loops, loss and excess over the reference, the loops
    it saves, whether that is a saving (`saves`), and the curve's lowest loss with its loops. `x`,
    `loops`, `loss`, `excess` and `saved` are NaN where no point of the curve is at equal loss.
    Columns SAVING_COLUMNS."""
    rows = []
    eq = equal_loss(points, rel_tol=rel_tol, k=k)
    for (variant, split, curve), c in eq.groupby(["variant", "split", "curve"], sort=True):
        ok = c[c["equal"]].sort_values(["loops", "loss"])
        best = c.sort_values(["loss", "loops"]).iloc[0]
        row = {"variant": variant, "config": c["config"].iloc[0], "split": split, "curve": curve,
               "reference": best["reference"], "ref_loss": best["ref_loss"], "ref_loops": best["ref_loops"],
               "n_seeds": int(c["n_seeds"].max()), "x": math.nan, "loops": math.nan, "loss": math.nan,
               "excess": math.nan, "tol": math.nan, "saved": math.nan, "saves": False,
               "best_loss": float(best["loss"]), "best_loops": float(best["loops"])}
        if len(ok):
            cheap = ok.iloc[0]
            row.update(x=float(cheap["x"]), loops=float(cheap["loops"]), loss=float(cheap["loss"]),
                       excess=float(cheap["excess"]), tol=float(cheap["tol"]),
                       saved=float(cheap["ref_loops"] - cheap["loops"]),
                       saves=bool(cheap["loops"] <= (1 - MIN_SAVING) * cheap["ref_loops"]))
        rows.append(row)
    out = pd.DataFrame(rows, columns=list(SAVING_COLUMNS))
    return out.sort_values(["config", "split", "curve"]).reset_index(drop=True)


def describe_savings(sav: pd.DataFrame) -> str:
    """Where halting saves loops at equal loss and where it does not: one markdown bullet per
    variant and domain, naming each exit rule's cheapest equal-loss point or its failure."""
    lines = []
    for (config, split), g in sav.groupby(["config", "split"], sort=True):
        ref = g.iloc[0]
        parts = []
        for s in g.itertuples():
            if s.curve == "fixed" and s.reference.startswith("fixed R"):
                continue
            if math.isnan(s.loops):
                parts.append(f"{s.curve}: never at equal loss (best {s.best_loss - s.ref_loss:+.3f} nats at "
                             f"{s.best_loops:.2f} loops)")
            else:
                word = "saves" if s.saves else "no saving"
                parts.append(f"{s.curve}: {word}, {s.loops:.2f} loops at {s.excess:+.3f} nats (x={s.x:.3g})")
        fixed = g[g["curve"] == "fixed"]
        fewer = "" if fixed.empty or not fixed["loops"].iloc[0] < ref.ref_loops else \
            f"; a fixed R={fixed['loops'].iloc[0]:g} is already at equal loss"
        lines.append(f"- `{config}` on {split} (reference {ref.reference}: {ref.ref_loss:.3f} nats at "
                     f"{ref.ref_loops:.2f} loops, {ref.n_seeds} seed(s){fewer}): "
                     + ("; ".join(parts) or "no exit rule measured") + ".")
    return "\n".join(lines)


# -- the convergence picture -------------------------------------------------------------------------------
def _per_loop(probes: pd.DataFrame, probe: str, metric: str, name: str) -> pd.DataFrame:
    p = probes[(probes["probe"] == probe) & (probes["metric"] == metric) & (probes["x"] > 0)]
    p = _last_step(p)
    return p.rename(columns={"x": "loop", "value": name})[["run_id", "split", "loop", name]]


def convergence(runs: pd.DataFrame, probes: pd.DataFrame | None, train_log: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (variant, domain, loop) at each run's last evaluation, seed means: the gate's radius
    (train_log rho_max at the run's last logged step; NaN without a gate), the loop step's Jacobian
    radius and 2-norm (`loop_contraction`, loops 1..R), and the residual with the converged share
    (`loop_residual`: relative state change per loop to 4R; `solver`: the residual after each
    iteration, `source` says which). Columns CONVERGENCE_COLUMNS; empty when nothing was measured."""
    empty = pd.DataFrame(columns=list(CONVERGENCE_COLUMNS))
    if probes is None or probes.empty:
        return empty
    validate(probes, "probes")
    parts = [_per_loop(probes, "loop_contraction", "radius_mean", "jac_radius"),
             _per_loop(probes, "loop_contraction", "norm_mean", "jac_norm"),
             _per_loop(probes, "loop_residual", "residual_curve", "residual").assign(source="loop_residual"),
             _per_loop(probes, "loop_residual", "converged", "converged"),
             _per_loop(probes, "solver", "residual_curve", "residual").assign(source="solver")]
    keys = ["run_id", "split", "loop"]
    residual = pd.concat([parts[2], parts[4]], ignore_index=True)
    frame = residual.merge(parts[3], on=keys, how="left")
    for extra in parts[:2]:
        frame = frame.merge(extra, on=keys, how="outer")
    if frame.empty:
        return empty
    info = _run_info(runs)
    gate = pd.Series(np.nan, index=info["run_id"], name="gate_radius")
    if train_log is not None and "rho_max" in train_log and len(train_log):
        log = train_log.dropna(subset=["rho_max"])
        gate = log[log["step"] == log.groupby("run_id")["step"].transform("max")].set_index("run_id")["rho_max"]
        from cartlab.analysis.spectral import gateless

        nogate = with_variants(runs).loc[gateless(runs).values, "run_id"]
        gate = gate.drop(index=[r for r in nogate if r in gate.index]).rename("gate_radius")
    frame = info.merge(frame, on="run_id").join(gate, on="run_id")
    frame["source"] = frame.groupby("run_id")["source"].transform(lambda s: s.dropna().iloc[0] if s.notna().any()
                                                                  else "")
    values = ["gate_radius", "jac_radius", "jac_norm", "residual", "converged"]
    g = frame.groupby(["variant", "config", "split", "loop"])
    out = g[values].mean().join(g["run_id"].nunique().rename("n")).join(g[["source", "trained_r"]].first())
    out = out.reset_index()
    out["loop"] = out["loop"].astype(int)
    return out[list(CONVERGENCE_COLUMNS)].sort_values(["config", "split", "loop"]).reset_index(drop=True)


def tail_rate(residual) -> float:
    """Geometric mean ratio residual(r+1) / residual(r) over the second half of the curve (NaN for
    fewer than two points or a non-positive residual)."""
    r = np.asarray(residual, dtype=float)
    r = r[np.isfinite(r)]
    if len(r) < 2 or (r <= 0).any():
        return math.nan
    mid = (len(r) - 1) // 2
    return float((r[-1] / r[mid]) ** (1.0 / (len(r) - 1 - mid)))


def verdicts(conv: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, domain): the gate radius, the Jacobian radius and norm at the last trained
    loop, the residual's first and last value, its tail rate q, the converged share at the last
    loop, whether the loop contracts (module docstring), and a sentence saying so."""
    rows = []
    for (variant, split), g in conv.groupby(["variant", "split"], sort=True):
        g = g.sort_values("loop")
        jac = g.dropna(subset=["jac_radius"])
        res = g.dropna(subset=["residual"])
        q = tail_rate(res["residual"])
        row = {"variant": variant, "config": g["config"].iloc[0], "split": split, "source": g["source"].iloc[0],
               "gate_radius": float(g["gate_radius"].mean()),
               "jac_loop": int(jac["loop"].max()) if len(jac) else math.nan,
               "jac_radius": float(jac["jac_radius"].iloc[-1]) if len(jac) else math.nan,
               "jac_norm": float(jac["jac_norm"].iloc[-1]) if len(jac) else math.nan,
               "loops_run": int(res["loop"].max()) if len(res) else 0,
               "residual_first": float(res["residual"].iloc[0]) if len(res) else math.nan,
               "residual_last": float(res["residual"].iloc[-1]) if len(res) else math.nan,
               "rate": q, "converged": float(res["converged"].iloc[-1]) if len(res) else math.nan}
        row["contracts"] = bool(q < STALL and not (row["jac_radius"] >= 1))
        row["sentence"] = _contraction_sentence(row)
        rows.append(row)
    return pd.DataFrame(rows)


def _contraction_sentence(row: dict) -> str:
    gate = "no gate" if math.isnan(row["gate_radius"]) else f"gate radius {row['gate_radius']:.3f}"
    jac = "" if math.isnan(row["jac_radius"]) else \
        f", Jacobian radius {row['jac_radius']:.2f} and norm {row['jac_norm']:.2f} at loop {row['jac_loop']}"
    if math.isnan(row["rate"]):
        trend = "no residual curve measured"
    else:
        q = row["rate"]
        how = ("falls geometrically" if q < GEOMETRIC else "falls slowly" if q < STALL else
               "levels off" if q <= 1 / STALL else "grows")
        unit = "iteration" if row["source"] == "solver" else "loop"
        trend = (f"the residual {how} ({row['residual_first']:.2g} -> {row['residual_last']:.2g} over "
                 f"{row['loops_run']} {unit}s, tail rate {row['rate']:.3f} per {unit})")
    verdict = "contracts" if row["contracts"] else "does **not** contract"
    return f"`{row['config']}` on {row['split']}: the loop {verdict}: {gate}{jac}; {trend}."


def describe_convergence(ver: pd.DataFrame) -> str:
    """One markdown bullet per variant: on how many domains its loop contracts, then each domain's sentence."""
    lines = []
    for config, g in ver.groupby("config", sort=True):
        n = int(g["contracts"].sum())
        head = "contracts on every domain" if n == len(g) else ("contracts on no domain" if n == 0 else
                                                                 f"contracts on {n} of {len(g)} domains")
        lines.append(f"- `{config}`: the loop {head}. " + " ".join(g["sentence"]))
    return "\n".join(lines)


# -- figures -------------------------------------------------------------------------------------------------
CURVE_STYLE = {"fixed": ("-", "o"), "kl": ("--", "v"), "entropy": ("--", "^"), "latent": ("-.", "s"),
               "argmax": (":", "D"), "learned": ("--", "*"), "fixed_point": ("-", "P")}


def plot_frontier(points: pd.DataFrame, *, splits=None) -> Figure:
    """Validation loss against mean loops per token (the compute-quality frontier): one row per
    variant, one panel per domain, one line per curve (fixed R and each exit rule over its
    thresholds, or the fixed-point mode over iteration caps), seed means (no seed bars: the seeds'
    spread of the absolute loss, in `frontier_means`, is far wider than the within-model differences
    the equal-loss test pairs); dotted: the reference loss (the trained depth), shaded: REL_TOL above it (the equal-loss band
    where the seeds agree; `equal_loss` widens it by their disagreement)."""
    import seaborn as sns
    from matplotlib.figure import Figure

    if points.empty:
        raise ValueError("points: no frontier to plot (train with measures [..., adaptive_depth])")
    means = frontier_means(points)
    panels = domain_panels(means, splits, "the frontier")
    labels = means.drop_duplicates("variant").set_index("variant")["config"].sort_values()
    curves = [c for c in CURVE_STYLE if c in set(means["curve"])]
    colors = dict(zip(curves, sns.color_palette(n_colors=len(curves))))
    sav = savings(points).drop_duplicates(["variant", "split"]).set_index(["variant", "split"])
    fig = Figure(figsize=(4.0 * len(panels), 3.2 * len(labels)))
    axes = fig.subplots(len(labels), len(panels), squeeze=False)
    for i, variant in enumerate(labels.index):
        for j, split in enumerate(panels):
            ax = axes[i, j]
            for curve, g in means[(means["variant"] == variant) & (means["split"] == split)].groupby("curve"):
                g = g.sort_values("loops")
                ls, marker = CURVE_STYLE.get(curve, ("-", "."))
                ax.plot(g["loops"], g["loss"], ls=ls, marker=marker, ms=4, color=colors.get(curve), label=curve)
            if (variant, split) in sav.index:
                s = sav.loc[(variant, split)]
                ax.axhline(s["ref_loss"], ls=":", color="grey")
                ax.axhspan(s["ref_loss"], (1 + REL_TOL) * s["ref_loss"], color="grey", alpha=0.15)
            ax.set(title=f"{labels[variant]}\n{split}", xlabel="mean loops per token",
                   ylabel="validation loss (nats/token)")
            ax.title.set_fontsize(8)
            ax.legend(fontsize=6)
    fig.suptitle(f"Compute-quality frontier: loss against mean loops per token, seed means (grey: the trained "
                 f"depth's loss and {100 * REL_TOL:g}% above it)")
    fig.tight_layout()
    return fig


def plot_convergence(conv: pd.DataFrame, *, split: str) -> Figure:
    """The convergence picture on one domain, one panel per variant, against the loop (or solver
    iteration) on a log axis: the gate's radius (dotted), the loop step's Jacobian radius (solid)
    and 2-norm (dashed), and the residual (dash-dot, relative state change per loop); grey marks 1."""
    from matplotlib.figure import Figure

    c = conv[conv["split"] == split]
    if c.empty:
        raise ValueError(f"split: {split!r} has no convergence picture; measured: {sorted(conv['split'].unique())}")
    variants = c.drop_duplicates("variant").sort_values("config")
    fig = Figure(figsize=(4.2 * len(variants), 3.6))
    axes = fig.subplots(1, len(variants), squeeze=False, sharey=True)[0]
    for ax, v in zip(axes, variants.itertuples()):
        g = c[c["variant"] == v.variant].sort_values("loop")
        ax.axhline(1.0, color="grey", lw=0.8)
        for col, style, label in (("jac_radius", "-o", "Jacobian radius"), ("jac_norm", "--.", "Jacobian 2-norm"),
                                  ("residual", "-.s", "residual")):
            d = g.dropna(subset=[col])
            if len(d):
                ax.plot(d["loop"], d[col], style, ms=3, label=label)
        if g["gate_radius"].notna().any():
            ax.axhline(g["gate_radius"].mean(), ls=":", color="k", label="gate radius")
        ax.axvline(v.trained_r, ls=":", color="grey", lw=0.8)
        unit = "solver iteration" if v.source == "solver" else "loop r"
        ax.set(yscale="log", title=v.config, xlabel=unit, ylabel="radius / norm / relative change")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    fig.suptitle(f"{split}: does the loop contract? (last evaluation, seed means; dotted vertical: trained R)")
    fig.tight_layout()
    return fig


# -- findings ------------------------------------------------------------------------------------------------
def findings(res) -> list:
    """Does an exit rule (or the fixed-point mode) keep the loss of the trained depth with fewer
    loops? Per variant and rule, the threshold that is at equal loss on every domain with the
    fewest loops (summed over domains); per domain, its loss minus the reference's, paired within
    each seed, the mean loops in the note (`cartlab.analysis.findings`). Rules never at equal loss
    on every domain make none (`describe_savings` says so)."""
    from cartlab.analysis.findings import paired_finding

    pts = frontier_points(res.probes, res.runs)
    if pts.empty:
        return []
    eq = equal_loss(pts)
    out = []
    for (variant, curve), c in eq[eq["curve"].isin(EXIT_RULES + ("fixed_point",))].groupby(["variant", "curve"]):
        domains = eq.loc[eq["variant"] == variant, "split"].nunique()
        per_x = c.groupby("x").agg(ok=("equal", "all"), n=("split", "nunique"), loops=("loops", "sum"),
                                   ref=("ref_loops", "sum"))
        per_x = per_x[per_x["ok"] & (per_x["n"] == domains)]
        if per_x.empty or per_x["loops"].min() > (1 - MIN_SAVING) * per_x["ref"].iloc[0]:
            continue  # never at equal loss on every domain, or only without saving loops
        x = per_x["loops"].idxmin()
        v = pts[pts["variant"] == variant]
        for split, s in v[(v["curve"] == curve) & (v["x"] == x)].groupby("split", sort=True):
            name, ref = _reference(v[v["split"] == split])
            diff = s.set_index("run_id")["loss"] - ref.set_index("run_id")["loss"]
            note = f"{s['loops'].mean():.2f} mean loops vs {ref['loops'].mean():.2f}"
            config = s["config"].iloc[0]
            out.append(paired_finding("adaptive", f"{config}: {curve} exit at x={x:g} vs {name}", config, str(split),
                                      "loss", diff.dropna().to_numpy(float), note=note))
    return out
