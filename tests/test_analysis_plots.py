"""Guards that every plot function turns results-schema frames into a Figure with the expected
artists (Agg backend; no pixels compared).
Run: pytest tests/test_analysis_plots.py -q
"""
import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cartlab.analysis import plots, published  # noqa: E402
from cartlab.analysis.synthetic import eval_rows, run_row, train_curves  # noqa: E402

CART = {"d_model": 1024, "n_loops": 6}


def ablation_store():
    """Baseline (3 seeds), two ablations and two Dense baselines at d=1024."""
    runs = [run_row(f"b{s}", seed=s, stored_params=125e6, effective_params=179e6) for s in range(3)]
    runs += [run_row("unshared", hooks="unshare_core"), run_row("r1", hooks="single_loop", n_loops=1)]
    runs += [run_row(f"dense{L}", model="dense", n_layers=L, stored_params=n, effective_params=n)
             for L, n in ((7, 123e6), (12, 180e6))]
    ppl = {"b0": 19.9, "b1": 20.0, "b2": 20.1, "unshared": 19.0, "r1": 20.2, "dense7": 19.7, "dense12": 18.5}
    return pd.DataFrame(runs), eval_rows({k: {"wiki": v} for k, v in ppl.items()}, step=100)


@pytest.fixture(scope="module")
def res():
    return published.load_published()


@pytest.fixture(scope="module")
def curves():
    runs = pd.DataFrame([run_row(f"d{d}-s{s}", d_model=d, seed=s) for d in (256, 1024) for s in range(3)])
    log = train_curves(runs["run_id"], np.arange(0, 1000, 100), loss=lambda t: 3 + 5 / (1 + t / 100),
                       rho=lambda t: 0.8 + 0.1 * np.exp(-t / 300), noise=0.01)
    return runs, log


def _fills(ax):
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_scaling_fit_plot(res):
    fig = plots.plot_scaling_fit(res.runs, res.eval_log, where={"stage": "stage2", "model": "cart",
                                                                "prelude_layers": 6, "n_loops": 6})
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    ax, axr = fig.axes
    assert len(_fills(ax)) == 1  # CI band
    assert len(axr.lines[-1].get_xdata()) == 4  # one residual per width
    # the legend's exponent is the log-log least-squares slope of Table 7's R=6 column, by numpy
    t7 = pd.read_csv(published.paper_dir() / "table7_stage2_ppl_wiki_by_R.csv").query("n_loops == 6")
    slope = np.polyfit(np.log(t7.d_model), np.log(t7.ppl_wiki_3seed_mean), 1)[0]
    assert f"b = {slope:.2f}" in ax.get_legend().get_texts()[1].get_text()
    fig = plots.plot_scaling_fit(res.runs, res.eval_log, x="effective_params",
                                 where={"stage": "stage2", "prelude_layers": 6, "n_loops": 6})
    assert fig.axes[1].get_xlabel() == "effective parameters"
    with pytest.raises(ValueError, match="allowed"):
        plots.plot_scaling_fit(res.runs, res.eval_log, x="width")


def test_radius_trajectories_plot(curves):
    runs, log = curves
    fig = plots.plot_radius_trajectories(runs, log)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and len(_fills(ax)) == 2  # one mean line and one seed band per width


def test_loss_curves_plot(curves, res):
    runs, log = curves
    fig = plots.plot_loss_curves(runs, log)
    ax = fig.axes[0]
    assert len(ax.get_legend().get_texts()) == 2 and len(_fills(ax)) == 2
    fig = plots.plot_loss_curves(res.runs, res.eval_log, value="ppl", split="wiki", where={"stage": "stage2"})
    assert fig.axes[0].get_ylabel() == "ppl (wiki)"
    with pytest.raises(ValueError, match="split"):
        plots.plot_loss_curves(res.runs, res.eval_log)


def test_gap_waterfall_plot():
    runs, ev = ablation_store()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the long "unattributed (includes ...)" label once made tight_layout give up
        fig = plots.plot_gap_waterfall(runs, ev, cart=CART)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    # only measured components, and the path's rest (residual framing, or what absorbs the unmeasured)
    assert labels[0] == "shared_weights" and labels[-1] == "total" and len(labels) == 3
    assert len(ax.containers) == len(labels) + 1  # one bar per component and the total, and the error bars
    errorbars = ax.containers[-1]
    assert len(errorbars.lines[2][0].get_segments()) == len(labels)  # one noise bar each
    fig = plots.plot_gap_waterfall(runs, ev, cart=CART, path="stored")
    assert len(fig.axes[0].containers) == 4


def test_variable_r_profile_plot(res):
    fig = plots.plot_variable_r_profile(res.downstream, res.runs)
    assert len(fig.axes) == 5  # hellaswag, arc, lambada acc + ppl, piqa
    ax = next(a for a in fig.axes if a.get_title() == "lambada_openai perplexity")
    assert ax.get_yscale() == "log"
    assert ax.lines[-1].get_xdata()[0] == 6  # dashed line at the trained R
    with pytest.raises(ValueError, match="n_loops"):
        plots.plot_variable_r_profile(res.downstream[res.downstream.n_loops == 6])


def test_r_reversal_marks_each_stages_best_r_from_the_paper():
    from cartlab.analysis import published
    from cartlab.analysis.plots import plot_r_reversal

    res = published.load_published()
    fig = plot_r_reversal(res.runs, res.eval_log, split="wiki", where={"prelude_layers": 6})
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["d=256", "d=512", "d=768", "d=1024"]
    # the star of each stage sits at its best R: Stage 1 d=256 prefers R=6 (Table 6), Stage 2 R=8 (Table 7)
    stars = [line for line in axes[0].get_lines() if line.get_marker() == "*"]
    assert sorted(float(s.get_xdata()[0]) for s in stars) == [6.0, 8.0]
    with pytest.raises(ValueError, match="two stages"):
        plot_r_reversal(res.runs, res.eval_log, where={"stage": "stage2"})


def test_band_comparisons_flags_a_far_config_and_not_a_near_one():
    from cartlab.analysis import synthetic
    from cartlab.analysis.stats import band_comparisons

    runs = pd.DataFrame([
        synthetic.run_row("b1", seed=1), synthetic.run_row("b2", seed=2), synthetic.run_row("b3", seed=3),
        synthetic.run_row("far", hooks="no_lti", seed=1), synthetic.run_row("near", hooks="no_lie", seed=1),
    ])
    ev = synthetic.eval_rows({"b1": {"wiki": 20.0}, "b2": {"wiki": 21.0}, "b3": {"wiki": 22.0},
                              "far": {"wiki": 26.0}, "near": {"wiki": 21.5}}, step=100)
    out = band_comparisons(runs, ev, split="wiki").set_index("config")
    assert out.filter(like="no_lti", axis=0)["label"].item() == "signal"  # 5 sd away
    assert out.filter(like="no_lie", axis=0)["label"].item() == "within noise"  # 0.5 sd away
    assert "n=3" in out.attrs["caveat"]
    with pytest.raises(ValueError, match=">= 2 seeds"):
        band_comparisons(runs[~runs.run_id.isin(["b2", "b3"])], ev, split="wiki")


# -- one FLOPs source: the scaling figures' FLOPs axis is the model accounting ------------------------------------
def test_scaling_fit_flops_axis_is_the_model_accounting():
    import json

    from cartlab.analysis.runs import run_flops
    from cartlab.model import CARTConfig, account

    train = {"batch_size": 4, "grad_accum": 1, "seq_len": 32, "steps": 50}
    widths, ppl = [32, 64, 128], {32: 30.0, 64: 24.0, 128: 20.0}
    runs, evals = [], {}
    for d in widths:
        model = CARTConfig.tiny(d_model=d)
        acc = account(model, train["seq_len"])
        for seed in (0, 1):
            rid = f"w{d}-s{seed}"
            runs.append(run_row(rid, d_model=d, seed=seed, tokens=50 * 4 * 32, stage="stage2",
                                effective_params=acc.effective_params, stored_params=acc.stored_params,
                                variant=f"w{d}", variant_label=f"cart d={d}")
                        | {"config_json": json.dumps({"model": model.to_dict(), "train": train})})
            evals[rid] = {"wiki": ppl[d] * (1.01 if seed else 0.99)}
    runs = pd.DataFrame(runs)
    fig = plots.plot_scaling_fit(runs, eval_rows(evals, step=50), x="flops")
    xs = np.sort(fig.axes[1].lines[-1].get_xdata().astype(float))  # the residual axis: one point per width
    expected = sorted(account(CARTConfig.tiny(d_model=d), 32).train_flops_per_token() * 50 * 4 * 32 for d in widths)
    np.testing.assert_allclose(xs, expected, rtol=1e-12)
    np.testing.assert_allclose(xs, np.sort(run_flops(runs).drop_duplicates("flops")["flops"]), rtol=1e-12)
    six_nd = np.sort(6.0 * runs.drop_duplicates("variant")["effective_params"] * runs["tokens"].iloc[0])
    assert not np.allclose(xs, six_nd, rtol=0.05)  # not 6 N D: the LM head and attention count at this size
    assert "model accounting" in fig.axes[1].get_xlabel()
    with pytest.raises(ValueError, match="no stored training config"):  # published rows: no FLOPs to plot
        plots.plot_scaling_fit(runs.assign(config_json=None), eval_rows(evals, step=50), x="flops")


# -- the seed-noise training-loss figure: smoothed, per domain when the log says which ----------------------------
def _domain_log(per_domain: bool):
    """Two variants x two seeds, 200 steps whose batches alternate between a 'code' domain (loss ~1)
    and a 'prose' domain (loss ~8): the raw per-step loss zig-zags between 1 and 8."""
    rng = np.random.default_rng(0)
    runs, rows = [], []
    for variant, shift in (("a", 0.0), ("b", 0.3)):
        for seed in (0, 1):
            rid = f"{variant}-s{seed}"
            runs.append(run_row(rid, seed=seed, variant=variant, variant_label=f"cart {variant}"))
            for step in range(1, 201):
                domain = "code" if step % 2 else "prose"
                loss = (1.0 if domain == "code" else 8.0) + shift + 2.0 / step + rng.normal(0, 0.05)
                rows.append({"run_id": rid, "step": step, "loss": loss, **({"domain": domain} if per_domain else {})})
    log = pd.DataFrame(rows)
    for c in ("grad_norm", "lr", "rho_max", "rho_mean", "tokens_per_s", "mfu"):
        log[c] = np.nan
    return pd.DataFrame(runs), log


def test_train_loss_figure_is_per_domain_and_smoothed_when_the_log_names_domains():
    from cartlab.analysis import stats

    runs, log = _domain_log(per_domain=True)
    curve = stats.smoothed_train_loss(runs, log, window=10)
    assert set(curve["domain"]) == {"code", "prose"} and curve.attrs["window"] == 10
    assert "per domain" in curve.attrs["how"]
    fig = plots.plot_train_loss(runs, log, window=10)
    assert [ax.get_title() for ax in fig.axes] == ["code", "prose"]
    for ax, level in zip(fig.axes, (1.0, 8.0)):
        assert len(ax.lines) == 2  # one line per variant
        for line in ax.lines:
            y = np.asarray(line.get_ydata(), float)
            assert abs(np.median(y) - level) < 0.5  # the domain's own loss, no zig-zag to the other domain
            assert np.abs(np.diff(y[20:])).max() < 0.05  # smoothed: raw noise sd 0.05 would jump by ~0.1


def test_train_loss_figure_smooths_the_mixture_and_says_so_when_domains_are_not_logged():
    from cartlab.analysis import stats

    runs, log = _domain_log(per_domain=False)
    raw_jump = np.abs(np.diff(log[log.run_id == "a-s0"].sort_values("step")["loss"])).mean()  # ~7: the zig-zag
    curve = stats.smoothed_train_loss(runs, log, window=20)
    assert set(curve["domain"]) == {stats.MIXED} and "does not record which domain" in curve.attrs["how"]
    fig = plots.plot_train_loss(runs, log, window=20)
    (ax,) = fig.axes
    assert len(ax.lines) == 2
    for line in ax.lines:
        y = np.asarray(line.get_ydata(), float)[20:]
        assert np.abs(np.diff(y)).max() < raw_jump / 20  # the running mean removes the zig-zag
    assert "running mean over 20 logged steps" in fig.texts[0].get_text()
    with pytest.raises(ValueError, match="window"):
        stats.smoothed_train_loss(runs, log, window=0)
