"""Guards `cartlab.analysis.compute` (loss against training compute, LRT's probe tables) on
synthetic results frames with known answers:
1. FLOPs: logged values are kept, rows without them are accounted from the run's config (schema-2
   databases), rows without a config stay unknown; eval steps read FLOPs off the training log;
2. matched compute: two variants whose loss is one function of FLOPs but whose steps cost 1x and
   2x differ at matched steps and agree at the matched budget; seeds are averaged, two variants
   sharing a label are never pooled;
3. the LRT tables and figures: the measured forward cost per variant next to the accounted ratio,
   the probe's final rows averaged over seeds, the trained S read from the config.
(That the accounted fallback equals what the training loop logs is checked on a real run in
tests/test_lrt_probe.py.)
Run: pytest tests/test_analysis_compute.py -q
"""
import json
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from cartlab.analysis import compute  # noqa: E402
from cartlab.analysis.synthetic import run_row  # noqa: E402
from cartlab.model import DenseConfig, LRTConfig, account, memory_overhead  # noqa: E402

LRT = LRTConfig.tiny(n_layers=4, hooks=("lrt_kv", "lrt_residual"), memory_subsets=2)
TRAIN = {"batch_size": 4, "grad_accum": 2, "seq_len": 32, "steps": 100}


def config_json(model, **train) -> str:
    return json.dumps({"model": model.to_dict(), "train": {**TRAIN, **train}})


def store():
    """cheap (2 seeds, 1 FLOP-unit per step) and costly (2 units per step), 100 steps each, both
    with loss = 2 + 1 / (1 + flops / 50): one curve against compute, seeds +/- 0.01. The cheap
    runs are evaluated every 20 steps, the costly ones every 10 (at FLOPs 20, 40, ...)."""
    runs, train, evals = [], [], []
    for name, per_step, seeds in (("cheap", 1.0, (0, 1)), ("costly", 2.0, (0,))):
        for seed in seeds:
            rid = f"{name}-s{seed}"
            runs.append(run_row(rid, model="dense", n_layers=2 if name == "cheap" else 4, seed=seed, tokens=100 * 256,
                                variant=name, variant_label=f"dense {name}"))
            for step in range(10, 101, 10):
                flops = per_step * step
                loss = 2 + 1 / (1 + flops / 50) + (0.01 if seed else -0.01) * (name == "cheap")
                train.append({"run_id": rid, "step": step, "loss": loss, "flops": flops,
                              "tokens_per_s": 100.0 / per_step,
                              "forward_cost": 2.0 + seed if name == "costly" else None})
                if step % 20 == 0 or name == "costly":  # the costly runs are evaluated every 10 steps
                    evals += [{"run_id": rid, "step": step, "split": s, "loss": loss + d, "ppl": math.exp(loss + d)}
                              for s, d in (("prose", 0.5), ("stories", 0.0))]
    full = ("grad_norm", "lr", "rho_max", "rho_mean", "mfu")
    return pd.DataFrame(runs), pd.DataFrame(train).assign(**{c: np.nan for c in full}), pd.DataFrame(evals)


# -- FLOPs -------------------------------------------------------------------------------------------------
def test_flops_are_logged_or_accounted_from_the_config_or_unknown():
    runs = pd.DataFrame([run_row("new", model="dense", n_layers=4), run_row("old", model="dense", n_layers=4),
                         run_row("published", model="dense", n_layers=4)])
    runs["config_json"] = [config_json(LRT), config_json(LRT, grad_accum=1), None]
    runs["hardware_json"] = [json.dumps({"world_size": 2}), json.dumps({"world_size": 2}), None]
    log = pd.DataFrame({"run_id": ["new", "new", "old", "old", "published"], "step": [1, 2, 1, 3, 5],
                        "loss": 1.0, "flops": [7.0, 14.0, None, None, None]})
    for c in ("grad_norm", "lr", "rho_max", "rho_mean", "tokens_per_s", "mfu"):
        log[c] = np.nan
    out = compute.with_flops(runs, log)
    per_token = account(LRT, 32).train_flops_per_token(include_lm_head=True)
    assert list(out.flops[:2]) == [7.0, 14.0]  # logged values win over the accounting
    assert out.flops[3] == pytest.approx(3 * 4 * 1 * 32 * 2 * per_token)  # step x batch x accum x seq x ranks
    assert out.flops[2] == pytest.approx(out.flops[3] / 3)
    assert math.isnan(out.flops[4])
    assert list(out.flops_source[:4]) == ["logged", "logged", "accounted", "accounted"]
    assert pd.isna(out.flops_source[4])
    # a frame without the column at all (the paper's tables)
    assert compute.with_flops(runs, log.drop(columns="flops")).flops_source[0] == "accounted"


def test_eval_steps_read_flops_off_the_training_log():
    log = pd.DataFrame({"run_id": "a", "step": [10, 20, 40], "flops": [100.0, 200.0, 500.0]})
    ev = pd.DataFrame({"run_id": ["a"] * 4 + ["b"], "step": [5, 20, 30, 50, 10]})
    got = compute.flops_at(log, ev)
    assert list(got[:3]) == [50.0, 200.0, 350.0]  # from (0, 0), equal at a logged step, linear between
    assert math.isnan(got[3]) and math.isnan(got[4])  # past the log; a run without one


# -- matched compute -------------------------------------------------------------------------------------
def test_matched_compute_agrees_where_matched_steps_differ():
    runs, train, evals = store()
    assert compute.budget(runs, train) == 100.0  # the cheap runs' total
    table = compute.matched_compute(runs, train, evals, split="stories")
    assert table.attrs["budget"] == 100.0
    row = table.set_index("config")
    assert (row.loc["dense cheap", "seeds"], row.loc["dense costly", "seeds"]) == (2, 1)
    cheap, costly = row.loc["dense cheap"], row.loc["dense costly"]
    # matched steps: the costly variant has computed twice as much and is lower
    assert costly["final stories"] < cheap["final stories"] - 0.1
    # matched compute: the same curve, the same loss (seeds +/- 0.01 average out)
    assert costly["stories at budget"] == pytest.approx(cheap["stories at budget"], abs=1e-9)
    assert (cheap["step at budget"], costly["step at budget"]) == (100, 50)
    assert (cheap["training FLOPs"], costly["training FLOPs"]) == (100, 200)
    assert costly["FLOPs/token"] == pytest.approx(2 * cheap["FLOPs/token"]) == pytest.approx(200 / 25600)
    refused = r"split: 'wiki' is not a validation domain of these runs; available: \['prose', 'stories'\]"
    with pytest.raises(ValueError, match=refused):
        compute.matched_compute(runs, train, evals, split="wiki")


def test_two_variants_sharing_a_label_are_never_pooled():
    runs, train, evals = store()
    runs.loc[runs.run_id == "costly-s0", "variant_label"] = "dense cheap"
    table = compute.matched_compute(runs, train, evals)
    assert len(table) == 2 and table["config"].str.startswith("dense cheap").all() and table["config"].nunique() == 2
    curves = compute.compute_curves(runs, train, evals)
    assert curves.groupby(["curve", "variant", "step"]).size().max() == 1


def test_curves_average_seeds_and_carry_the_eval_flops():
    runs, train, evals = store()
    curves = compute.compute_curves(runs, train, evals)
    assert set(curves.curve) == {"train", "prose", "stories"}
    cheap = curves[(curves.curve == "train") & (curves.variant == "cheap")].set_index("step")
    assert cheap.loc[50, "n"] == 2 and cheap.loc[50, "mean"] == pytest.approx(2 + 1 / 2)
    assert cheap.loc[50, "sd"] == pytest.approx(0.02 / math.sqrt(2))
    stories = curves[(curves.curve == "stories") & (curves.variant == "costly")].set_index("step")
    assert stories.loc[40, "flops"] == 80.0


def test_the_training_curve_can_be_smoothed_per_run():
    runs, train, evals = store()
    raw = compute.compute_curves(runs, train).set_index(["variant", "step"])["mean"]
    smooth = compute.compute_curves(runs, train, smooth=3).set_index(["variant", "step"])["mean"]
    assert smooth["costly", 10] == raw["costly", 10]  # the first log has nothing before it
    assert smooth["costly", 30] == pytest.approx(raw["costly"][[10, 20, 30]].mean())
    with pytest.raises(ValueError, match="smooth: 0 is not allowed"):
        compute.compute_curves(runs, train, smooth=0)


def test_the_loss_figure_has_a_panel_per_curve_against_flops():
    runs, train, evals = store()
    fig = compute.plot_loss_vs_flops(runs, train, evals, smooth=1)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["training loss", "validation loss (prose)", "validation loss (stories)"]
    assert all(ax.get_xlabel() == "training FLOPs (cumulative)" and ax.get_ylabel() for ax in axes)
    x, y = axes[2].lines[1].get_data()  # the costly variant's stories curve: every 10 steps, 2 FLOPs per step
    assert list(x) == list(range(20, 201, 20)) and y[4] == pytest.approx(2 + 1 / 3)
    assert axes[0].lines[-1].get_xdata()[0] == 100.0  # the matched budget, dashed
    assert compute.plot_loss_vs_flops(runs, train, evals).axes[0].get_title() == "training loss (mean of 5 logs)"
    assert fig._suptitle.get_text() and len(axes[0].get_legend().get_texts()) == 2
    assert len(axes[0].collections) == 1  # the seed band of the variant with two seeds only


# -- LRT --------------------------------------------------------------------------------------------------------
def lrt_store():
    runs = pd.DataFrame([run_row(f"lrt-s{s}", model="dense", n_layers=4, seed=s, variant="lrt",
                                 variant_label="dense L=4 [lrt]") for s in (1, 2)]
                        + [run_row("dense", model="dense", n_layers=4, variant="dense", variant_label="dense L=4")])
    runs["config_json"] = [config_json(LRT)] * 2 + [config_json(DenseConfig.tiny(n_layers=4))]
    rows = []
    for rid, shift in (("lrt-s1", 0.0), ("lrt-s2", 0.2)):
        for split in ("prose", "stories"):
            for S in (1, 2, 4, 8, 16, 32):
                gap = 0.0 if S == 32 else 1.0 / S + shift
                values = {"loss": 3 + gap, "loss_exact": 3.0, "loss_gap": gap, "source_dist": gap / 10}
                rows += [{"run_id": rid, "probe": "lrt_gap", "step": 100, "split": split, "x": S, "metric": m,
                          "value": v} for m, v in values.items()]
                # an older measurement of the same run is ignored
                rows.append({"run_id": rid, "probe": "lrt_gap", "step": 50, "split": split, "x": S,
                             "metric": "loss_gap", "value": 99.0})
    rows.append({"run_id": "lrt-s1", "probe": "depth_profile", "step": 100, "split": "prose", "x": 1, "metric": "loss",
                 "value": 5.0})
    return runs, pd.DataFrame(rows)


def test_the_probe_table_keeps_each_runs_final_rows_and_averages_seeds():
    runs, probes = lrt_store()
    gap = compute.lrt_gap(runs, probes)
    assert len(gap) == 2 * 6 and set(gap.config) == {"dense L=4 [lrt]"}
    at = gap[(gap.split == "prose")].set_index("S")
    assert at.loc[2, "loss_gap"] == pytest.approx(0.5 + 0.1) and at.loc[32, "loss_gap"] == 0.0
    summary = compute.gap_summary(runs, probes).set_index("split")
    assert summary.loc["prose", "trained S"] == 2 and summary.loc["prose", "T"] == 32
    assert summary.loc["prose", "gap trained S"] == pytest.approx(0.6)
    assert summary.loc["prose", "gap S=1"] == pytest.approx(1.1) and summary.loc["prose", "gap S=T"] == 0.0
    assert summary.loc["prose", "source dist trained S"] == pytest.approx(0.06)
    assert compute.lrt_gap(runs, probes[probes.probe != "lrt_gap"]).empty and compute.lrt_gap(runs, None).empty


def test_the_probe_figure_draws_each_metric_per_domain_against_log2_S():
    runs, probes = lrt_store()
    fig = compute.plot_lrt_gap(runs, probes)
    assert len(fig.axes) == 4  # (loss gap, source distance) x (prose, stories)
    assert all(ax.get_xscale() == "log" and ax.get_title() and ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    x, y = fig.axes[0].lines[0].get_data()
    assert list(x) == [1, 2, 4, 8, 16, 32] and y[-1] == 0.0
    with pytest.raises(ValueError, match="no 'lrt_gap' rows"):
        compute.plot_lrt_gap(runs, probes[probes.probe != "lrt_gap"])


def test_forward_cost_is_the_median_per_variant_beside_the_accounted_ratio():
    runs, _ = lrt_store()
    log = pd.DataFrame({"run_id": ["lrt-s1"] * 3 + ["lrt-s2"] * 2 + ["dense"] * 2, "step": [1, 2, 3, 1, 2, 1, 2],
                        "loss": 1.0, "tokens_per_s": [1, 2, 3, 4, 5, 10, 20],
                        "forward_cost": [2.0, 2.1, 2.5, 1.9, 3.0, None, None]})
    for c in ("grad_norm", "lr", "rho_max", "rho_mean", "mfu"):
        log[c] = np.nan
    table = compute.forward_cost(runs, log).set_index("config")
    assert table.loc["dense L=4 [lrt]", "measured forward cost (median)"] == 2.1
    assert table.loc["dense L=4 [lrt]", "seeds"] == 2 and table.loc["dense L=4 [lrt]", "tokens/s (median)"] == 3
    ratio = memory_overhead(LRT, 32)["train_flops_ratio"]
    assert 2.0 < ratio < 3.0
    assert table.loc["dense L=4 [lrt]", "accounted train FLOPs vs backbone"] == pytest.approx(ratio)
    assert math.isnan(table.loc["dense L=4", "measured forward cost (median)"])
    assert math.isnan(table.loc["dense L=4", "accounted train FLOPs vs backbone"])
