"""The CART-Dense gap and its decomposition by ablations (paper sections 7.6 and 8).

    dense_gaps(runs, eval_log, cart={"d_model": 1024, "n_loops": 6})   # section 7.6
    decompose_gap(runs, eval_log, cart={...}, split="wiki")            # section 8

Sign convention: every gap and component is `metric(with) - metric(without)` for a metric where
lower is better (ppl, loss): positive means CART (or the component) costs, negative that it helps.
Relative values divide by the Dense reference, so they add up like the absolute ones.
"""
from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd

from cartlab.analysis.schema import describe_variants, final_eval, format_hooks, is_baseline
from cartlab.analysis.stats import seed_band

# (component, hooks of the run "without" it, hooks of the run "with" it), section 8.
# The shared-baseline components are measured against the baseline and assumed additive.
EFFECTIVE_PATH = (
    ("shared_weights", "unshare_core", ""),  # 8.3
    ("attention_type", "self_attn_core,unshare_core", "unshare_core"),  # 8.4
    ("frozen_kv", "unfreeze_kv", ""),  # 8.1
    ("hyperconnection", "no_hyper", ""),  # 8.5
    ("lti_gate", "no_lti", ""),  # 8.6
    ("loop_index_embedding", "no_lie", ""),  # 8.7
)
STORED_PATH = (("recurrence_beyond_R1", "single_loop", ""),)  # 8.2


def relative_gap(value, reference):
    """(value - reference) / reference: CART's excess over Dense as a fraction (section 7.6)."""
    value, reference = np.asarray(value, float), np.asarray(reference, float)
    if np.any(reference <= 0):
        raise ValueError(f"reference: must be > 0, got {reference}")
    out = (value - reference) / reference
    return float(out) if out.ndim == 0 else out


def _final(runs, eval_log, metric):
    if metric not in ("ppl", "loss"):
        raise ValueError(f"metric: {metric!r} not allowed; allowed: ['ppl', 'loss']")
    return final_eval(runs, eval_log)


def _select(frame: pd.DataFrame, where: dict) -> pd.DataFrame:
    mask = np.ones(len(frame), bool)
    for col, val in where.items():
        if col not in frame.columns:
            raise ValueError(f"cart: unknown column {col!r}; use runs columns such as d_model, n_loops, stage")
        mask &= (frame[col] == val).to_numpy()
    return frame[mask]


def _one_variant(rows: pd.DataFrame, what: str) -> pd.DataFrame:
    """`rows` if they are seeds of one variant, else a ValueError naming the variants (they are
    different configurations: pooling them would count one as seeds of the other)."""
    keys = rows["variant"].unique()
    if len(keys) > 1:
        raise ValueError(f"{what} matches {len(keys)} different variants, which are not seeds of one "
                         f"configuration: {describe_variants(rows, keys)}; select one")
    return rows


def _baseline(fe: pd.DataFrame, cart: dict) -> pd.DataFrame:
    base = _select(fe[is_baseline(fe)], cart)
    if base.empty:
        raise ValueError(f"cart: no CART baseline run (hooks='' and no overrides) matches {cart}")
    return _one_variant(base, f"cart: {cart}")


def _matched(fe: pd.DataFrame, target: float, tolerance: float, stage):
    """Dense variant of the same `stage` (training budget), without fields set by hand, whose
    stored params are closest to `target` (relative); two variants equally close are refused."""
    dense = fe[(fe["model"] == "dense") & (fe["stage"] == stage) & (fe["overrides"].fillna("") == "")]
    if dense.empty or not np.isfinite(target):
        return None
    mis = (dense.groupby("variant")["stored_params"].mean() - target).abs() / target
    if not mis.min() <= tolerance:
        return None
    best = mis.index[np.isclose(mis, mis.min(), rtol=0, atol=1e-12)]
    return _one_variant(dense[dense["variant"].isin(best)], f"the Dense nearest {target:.4g} stored params")


def dense_gaps(runs: pd.DataFrame, eval_log: pd.DataFrame, *, cart: dict, metric: str = "ppl",
               tolerance: float = 0.15) -> pd.DataFrame:
    """Relative gaps of a CART config to its stored- and effective-matched Dense, per split (sec. 7.6).

    gap_stored = (m_CART - m_Dense_s) / m_Dense_s, with Dense_s the Dense variant of the same stage
    (training budget, no overrides) whose parameters are nearest CART's stored_params; gap_effective likewise against CART's effective_params.
    m = seed mean of the final `metric`. A match further than `tolerance` (relative parameter
    mismatch) is absent and its columns are NaN. Columns: split, cart, cart_sd, cart_n,
    dense_stored, dense_stored_run, gap_stored, dense_effective, dense_effective_run, gap_effective.
    """
    fe = _final(runs, eval_log, metric)
    base = _baseline(fe, cart)
    matches = {
        "stored": _matched(fe, base["stored_params"].mean(), tolerance, base["stage"].iloc[0]),
        "effective": _matched(fe, base["effective_params"].mean(), tolerance, base["stage"].iloc[0]),
    }
    rows = []
    for split, b in base.groupby("split"):
        row = {"split": split, "cart": b[metric].mean(), "cart_sd": b[metric].std(ddof=1) if len(b) > 1 else np.nan,
               "cart_n": int(b["n_seeds"].sum()) if b["seed"].isna().all() else len(b)}
        for kind, dense in matches.items():
            d = None if dense is None else dense[dense["split"] == split]
            ok = d is not None and not d.empty
            row[f"dense_{kind}"] = d[metric].mean() if ok else np.nan
            row[f"dense_{kind}_run"] = d["name"].iloc[0] if ok else None
            row[f"gap_{kind}"] = relative_gap(row["cart"], row[f"dense_{kind}"]) if ok else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def decompose_gap(runs: pd.DataFrame, eval_log: pd.DataFrame, *, cart: dict, split: str = "wiki",
                  metric: str = "ppl", k: float = 2.0, tolerance: float = 0.15) -> pd.DataFrame:
    """Decompose the CART-Dense gap with the section 8 ablations, each judged against seed noise.

    m(x) = mean final `metric` on `split` over the seeds of variant x; B = the CART baseline
    variant (hooks '' and no overrides) `cart` selects, ablations are the runs at the baseline's
    d_model, prelude_layers and stage with the named hooks and no overrides. A selection that
    matches several variants (e.g. two learning rates) is refused, never pooled.
    Effective path (to the effective-matched Dense D_e), with components c = m(with) - m(without):
        shared_weights       = m(B) - m(unshare_core)
        attention_type       = m(unshare_core) - m(unshare_core + self_attn_core)
        frozen_kv            = m(B) - m(unfreeze_kv)
        hyperconnection      = m(B) - m(no_hyper);  lti_gate = m(B) - m(no_lti);
        loop_index_embedding = m(B) - m(no_lie)
        residual_framing     = [m(B) - m(D_e)] - sum of the above (a row `unattributed (includes
                               ...)` instead when a component's ablation is missing: then it is
                               not one component, and it is not judged as one)
    Stored path (to the stored-matched Dense D_s):
        recurrence_beyond_R1 = m(B) - m(single_loop)   (negative: the loop helps)
        cart_at_R1_vs_dense  = m(single_loop) - m(D_s)
    So each path's components sum exactly to its `total` row (m(B) - m(D)); the remainder rows
    also absorb any component whose ablation is missing (named in `note`). `rel` = value / m(D).

    Noise: every component is a combination c = sum_j w_j m(x_j) of configuration means, m(x_j)
    averaging n_j seeds. With sd the baseline's seed sd (every configuration taken to be as
    noisy as the baseline), sd(c) = sd * sqrt(sum_j w_j^2 / n_j), reported as `noise` = k * sd(c);
    c is "signal" if |c| > noise, else "within noise". For a single-seed ablation against the
    baseline this is section 8's band criterion widened by sqrt(1 + 1/n_B) for the baseline
    mean's own error; a difference of two single-seed runs (attention_type) gets sqrt(2), and the
    remainders, which collect every measurement of their path, get the most. The baseline needs
    >= 2 seeds.
    """
    fe = _final(runs, eval_log, metric)
    fe = fe[fe["split"] == split]
    if fe.empty:
        raise ValueError(f"split: no evaluation on {split!r}; available: {sorted(final_eval(runs, eval_log)['split'].unique())}")
    base = _baseline(fe, cart)
    if len(base) < 2:
        raise ValueError(f"cart: the baseline needs >= 2 seeds for a noise band, found {len(base)} run(s)")
    band = seed_band(base[metric].to_numpy(), k=k)
    d, P, R, stage = (base[c].iloc[0] for c in ("d_model", "prelude_layers", "n_loops", "stage"))
    family = fe[(fe["model"] == "cart") & (fe["d_model"] == d) & (fe["prelude_layers"] == P) & (fe["stage"] == stage)
                & (fe["overrides"].fillna("") == "")]

    seeds = {"": band.n}  # configuration -> number of seeds its mean averages

    def mean_of(hooks: str) -> float:
        if hooks == "":
            return band.mean
        rows = family[family["hooks"] == format_hooks(hooks)]
        if "single_loop" not in hooks:
            rows = rows[rows["n_loops"] == R]
        _one_variant(rows, f"ablation hooks={hooks!r}")
        seeds[hooks] = len(rows)
        return float(rows[metric].mean()) if len(rows) else np.nan

    out = []

    def add(path, component, value, ref, with_, without, weights, note=""):
        noise = band.k * band.sd * float(np.sqrt(sum(w * w / seeds[x] for x, w in weights.items() if w)))
        label = ("signal" if abs(value) > noise else "within noise") if np.isfinite(value) else "missing"
        out.append({"path": path, "component": component, "with": with_, "without": without,
                    "value": value, "rel": value / ref if np.isfinite(ref) else np.nan,
                    "noise": noise, "label": label, "note": note})

    for path, dense_params, comps, remainder in (
        ("effective", base["effective_params"].mean(), EFFECTIVE_PATH, "residual_framing"),
        ("stored", base["stored_params"].mean(), STORED_PATH, "cart_at_R1_vs_dense"),
    ):
        dense = _matched(fe, dense_params, tolerance, stage)
        ref = float(dense[metric].mean()) if dense is not None else np.nan
        seeds["dense"] = 1 if dense is None else len(dense)
        total, total_w = band.mean - ref, {"": 1.0, "dense": -1.0}
        measured, rest_w, missing = 0.0, dict(total_w), []
        for name, without, with_ in comps:
            value = mean_of(with_) - mean_of(without)
            if np.isfinite(value):
                weights = {with_: 1.0, without: -1.0}
                measured += value
                for x, w in weights.items():
                    rest_w[x] = rest_w.get(x, 0.0) - w
                add(path, name, value, ref, with_ or "baseline", without, weights)
            else:
                missing.append(name)
        # the remainder starts from the last configuration of the path that was trained
        if path == "effective":
            start = ("self_attn_core,unshare_core" if "attention_type" not in missing
                     else "unshare_core" if "shared_weights" not in missing else "baseline")
        else:
            start = "baseline" if missing else "single_loop"
        if missing:  # not one component: the path's rest, with what was not measured in it
            add(path, f"unattributed (includes {', '.join(missing)})", total - measured, ref, start, "dense",
                rest_w, f"{remainder} plus the unmeasured: {', '.join(missing)}")
            out[-1]["label"] = "unattributed"
        else:
            add(path, remainder, total - measured, ref, start, "dense", rest_w)
        add(path, "total", total, ref, "baseline", "dense" if dense is None else dense["name"].iloc[0], total_w)
    frame = pd.DataFrame(out)
    frame.attrs["band"] = band
    frame.attrs["caveat"] = (f"noise = {band.k:g} sd x sqrt(sum w^2/n) over the configurations a component combines, "
                             f"sd from the baseline's n={band.n} seeds (every configuration taken to be as noisy "
                             f"as the baseline; single-seed ablations' own noise is not measured)"
                             + (f"; with n={band.n} the sd is itself uncertain" if band.n < 5 else ""))
    return frame


# -- findings ---------------------------------------------------------------------------------------------------
def findings(res, *, metric: str = "loss", tolerance: float = 0.15) -> list:
    """The gap and the ablations as findings, on every validation domain (`cartlab.analysis.findings`):
    per CART baseline variant, CART against its stored- and effective-matched Dense (section 7.6),
    then every other CART variant of the same width, prelude and stage against that baseline (the
    ablations of section 8, the variable-depth training modes, ...). Each finding's effect =
    mean_seeds m(a) - mean_seeds m(b) of the final `metric` m on one domain, with Welch's 95%
    interval (`findings.compare`). Rows that are seed means (the paper's tables) make no finding."""
    from cartlab.analysis.findings import finding

    if res.eval_log is None or res.eval_log.empty:
        return []
    fe = _final(res.runs, res.eval_log, metric)
    fe = fe[fe["seed"].notna()]
    splits = sorted(str(s) for s in fe["split"].unique())
    out = []

    def values(rows, split):
        return rows[rows["split"] == split][metric].to_numpy(float)

    for variant, base in fe[is_baseline(fe)].groupby("variant", sort=False):
        label = base["variant_label"].iloc[0]
        for kind in ("stored", "effective"):
            try:
                dense = _matched(fe, base[f"{kind}_params"].mean(), tolerance, base["stage"].iloc[0])
            except ValueError:  # two Dense variants equally close: no one match
                dense = None
            if dense is None:
                continue
            claim = f"{label} vs {kind}-matched {dense['variant_label'].iloc[0]}"
            out += [finding("gap", claim, label, dense["variant_label"].iloc[0], split, metric,
                            values(base, split), values(dense, split)) for split in splits]
        d, P, stage = (base[c].iloc[0] for c in ("d_model", "prelude_layers", "stage"))
        family = fe[(fe["model"] == "cart") & (fe["d_model"] == d) & (fe["prelude_layers"] == P)
                    & (fe["stage"] == stage) & (fe["variant"] != variant)]
        for other, rows in family.groupby("variant", sort=False):
            other_label = rows["variant_label"].iloc[0]
            claim = f"{other_label} vs the baseline {label}"
            out += [finding("ablation", claim, other_label, label, split, metric, values(rows, split),
                            values(base, split)) for split in splits]
    return out


# -- figure --------------------------------------------------------------------------------------------------
def plot_gap_waterfall(runs: pd.DataFrame, eval_log: pd.DataFrame, *, cart: dict, split: str = "wiki",
                       metric: str = "ppl", path: str = "effective", k: float = 2.0,
                       tolerance: float = 0.15) -> Figure:
    """Waterfall of the CART-Dense gap's components (section 8; see decompose_gap):
    one bar per component from the running sum, the total last; red costs perplexity, green
    helps, hatched bars are within noise, and each bar's error bar is its noise,
    k * sd(c) = k * sd * sqrt(sum w^2 / n). The legend says all of this."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if path not in ("effective", "stored"):
        raise ValueError(f"path: {path!r} not allowed; allowed: ['effective', 'stored']")
    dec = decompose_gap(runs, eval_log, cart=cart, split=split, metric=metric, k=k, tolerance=tolerance)
    dec = dec[dec["path"] == path]
    parts, total = dec[dec["component"] != "total"], dec[dec["component"] == "total"].iloc[0]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    start, tops = 0.0, []
    for i, row in enumerate(parts.itertuples()):
        color = "tab:red" if row.value > 0 else "tab:green"
        ax.bar(i, row.value, bottom=start, color=color, hatch=None if row.label == "signal" else "//",
               edgecolor="k")
        start += row.value
        tops.append(start)
    ax.bar(len(parts), total["value"], color="tab:grey", edgecolor="k",
           hatch=None if total["label"] == "signal" else "//")
    ax.errorbar(range(len(parts) + 1), tops + [total["value"]], yerr=list(parts["noise"]) + [total["noise"]],
                fmt="none", ecolor="k", capsize=3, label=f"noise: {k:g} sd of each component")
    ax.axhline(0, color="k", lw=0.8)
    names = [textwrap.fill(name, 24) for name in list(parts["component"]) + ["total"]]  # "unattributed (includes ...)"
    ax.set_xticks(range(len(parts) + 1), names, rotation=30, ha="right")
    ax.set(xlabel="component (section 8)", ylabel=f"{metric} ({split}): CART - Dense",
           title=f"CART's {metric} gap to the {path}-matched Dense, component by component")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(facecolor="tab:red", edgecolor="k", label=f"costs {metric} (CART worse)"),
                Patch(facecolor="tab:green", edgecolor="k", label=f"helps (lowers {metric})"),
                Patch(facecolor="white", edgecolor="k", hatch="//", label="hatched: within noise"),
                Patch(facecolor="tab:grey", edgecolor="k", label="total gap")]
    ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    return fig
