"""The loop measures of issue 15 (cartlab.measures.loops) from training to the notebook.

Guards: a tiny training run stores the per-loop logit lens and the loop map's contraction per
domain and loop at every evaluation; the lens at the last loop is the evaluation's own loss on the
same batches; the stored rows are what the measure computes on the checkpointed model; runs
without loops store none and runs without a gate store no gate radius; the frame and plot helpers
(cartlab.analysis.spectral, cartlab.analysis.plots) on synthetic probes with known values, never
pooling two variants and labelling gateless runs "no gate"; the spectral_radius notebook runs
headlessly through papermill with the new views, and its widget offers every loop measure.
Run: pytest tests/test_loop_measures.py (25 s on an idle 2-core machine, several minutes under load).
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from cartlab import results  # noqa: E402
from cartlab.analysis import loops as loop_analysis  # noqa: E402
from cartlab.analysis import plots, schema, spectral  # noqa: E402
from cartlab.analysis.synthetic import run_row, train_curves  # noqa: E402
from cartlab.config import ConfigError  # noqa: E402
from cartlab.measures import known  # noqa: E402
from cartlab.measures.loops import LENS_BATCHES  # noqa: E402
from cartlab.model import CARTConfig, DenseConfig  # noqa: E402
from train_helpers import TINY_MODEL  # noqa: E402

LENS = ("loss", "kl_to_final", "top1_agree", "settled")
CONTRACTION = ("radius_mean", "radius_max", "norm_mean", "norm_max", "iters")
STEPS = (4, 8, 12)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


def test_the_loop_measures_run_at_every_eval_on_cart_with_loops_only():
    lens, contraction = known()["logit_lens"], known()["loop_contraction"]
    assert lens.when == contraction.when == "eval"
    for m in (lens, contraction):
        assert m.applies(CARTConfig.tiny(n_loops=3))
        assert not m.applies(CARTConfig.tiny(n_loops=1))
        assert not m.applies(CARTConfig.tiny(hooks=("single_loop",)))
        assert not m.applies(DenseConfig.tiny())


def test_asking_for_the_lens_of_a_single_loop_run_names_the_field(tmp_path):
    from train_helpers import tiny_config

    with pytest.raises(ConfigError, match=r"measures.*'logit_lens' does not apply"):
        tiny_config(tmp_path, tmp_path, model={**TINY_MODEL, "hooks": ["single_loop"]}, measures=["logit_lens"])


def test_the_measures_read_the_first_eval_batches_and_the_first_sequences(tiny_data, tmp_path):
    """With more evaluation batches than the lens decodes, its last-loop loss is the model's loss
    on the first LENS_BATCHES of them; the contraction is the probe's on the first sequences of
    the first batch, with the module's settings."""
    from cartlab.data import load_meta, open_bin
    from cartlab.measures import MeasureContext, loops, measures_for, run_measures
    from cartlab.model import build_model
    from cartlab.model.probes import loop_contraction
    from cartlab.train.loop import _val_bins
    from train_helpers import tiny_config

    cfg = tiny_config(tiny_data, tmp_path, eval_batches=loops.LENS_BATCHES + 2)
    torch.manual_seed(0)
    model = build_model(cfg.model_config()).eval()
    bins = {s: open_bin(p) for s, p in _val_bins(load_meta(tiny_data)).items()}
    ctx = MeasureContext(model, cfg.model_config(), cfg, bins, 0, torch.device("cpu"))
    rows = pd.DataFrame(run_measures(measures_for(cfg.model_config(), ["logit_lens", "loop_contraction"]), ctx))
    for split in bins:
        batches = ctx.batches(split)
        assert len(batches) == loops.LENS_BATCHES + 2
        with torch.no_grad():
            losses = [model(x, y)[1].item() for x, y in batches]
        mine = rows[rows.split == split]
        lens = mine[(mine.probe == "logit_lens") & (mine.metric == "loss") & (mine.x == 3)].value.item()
        assert lens == pytest.approx(np.mean(losses[:loops.LENS_BATCHES]), abs=1e-6)
        direct = loop_contraction(model, batches[0][0][:loops.CONTRACTION_SEQUENCES], n_tokens=loops.CONTRACTION_TOKENS,
                                  n_iter=loops.CONTRACTION_ITERS, tol=loops.CONTRACTION_TOL, seed=loops.SEED)
        stored = mine[(mine.probe == "loop_contraction") & (mine.metric == "radius_max")].sort_values("x").value
        assert list(stored) == pytest.approx([r["radius_max"] for r in direct], rel=1e-12)


# -- a tiny study, trained -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_data):
    """Baseline (2 seeds), no_lti and single_loop, 12 steps with an evaluation every 4 (of as many
    batches as the lens decodes), trained directly (no notebook per run) into one results
    database, as `cartlab ablate` would."""
    from cartlab.studies import load_study
    from cartlab.train.loop import train

    root = tmp_path_factory.mktemp("loops")
    model = {f"model.{k}": v for k, v in TINY_MODEL.items() if k != "kind"}
    spec = {
        "name": "loops", "preset": "smoke", "seeds": [1],
        "set": {**model, "data.dir": str(tiny_data), "steps": 12, "seq_len": 32, "batch_size": 4,
                "eval_every": 4, "eval_batches": LENS_BATCHES, "eval_batch_size": 2, "log_every": 2,
                "checkpoint_every": 12,
                "out_dir": str(root / "runs"), "results_db": str(root / "results.db"), "device": "cpu",
                "quiet": True, "measures": ["logit_lens", "loop_contraction"]},
        "runs": [{"label": "baseline", "seeds": [1, 2]}, {"label": "no_lti", "hooks": ["no_lti"]},
                 {"label": "single_loop", "hooks": ["single_loop"], "set": {"measures": []}}],
    }
    path = root / "loops.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = load_study(path).expand()
    for run in runs:
        train(run.config)
    ids = {run.label + ("" if run.label != "baseline" else f"-{run.seed}"): run.run_id for run in runs}
    return {"path": path, "db": root / "results.db", "ids": ids, "runs": {r.run_id: r for r in runs}}


def test_the_measures_store_one_row_per_domain_loop_metric_and_eval(study):
    probes = results.probes(study["db"])
    domains = set(results.eval_log(study["db"]).split)
    assert len(domains) == 3
    for label in ("baseline-1", "baseline-2", "no_lti"):
        mine = probes[probes.run_id == study["ids"][label]]
        lens = mine[mine.probe == "logit_lens"]
        want = {(s, d, float(x), m) for s in STEPS for d in domains for x in (1, 2, 3) for m in LENS}
        want |= {(s, d, 0.0, "settle_loop") for s in STEPS for d in domains}
        assert set(zip(lens.step, lens.split, lens.x, lens.metric)) == want and len(lens) == len(want)
        con = mine[mine.probe == "loop_contraction"]
        metrics = CONTRACTION + (("gate_radius",) if label != "no_lti" else ())  # no gate, no gate radius
        want = {(s, d, float(x), m) for s in STEPS for d in domains for x in (1, 2, 3) for m in metrics}
        assert set(zip(con.step, con.split, con.x, con.metric)) == want and len(con) == len(want)
        assert con.value.notna().all() and lens.value.notna().all()
    assert probes[probes.run_id == study["ids"]["single_loop"]].empty  # R = 1: nothing inside a loop


def test_the_lens_at_the_last_loop_is_the_eval_loss_on_the_same_batches(study):
    probes = results.probes(study["db"], probe="logit_lens")
    evals = results.eval_log(study["db"]).set_index(["run_id", "step", "split"])["loss"]
    lens = probes.pivot_table(index=["run_id", "step", "split"], columns=["metric", "x"], values="value")
    assert len(lens) == 3 * 3 * 3  # runs x evaluations x domains
    for key, row in lens.iterrows():
        assert row[("loss", 3.0)] == pytest.approx(evals[key], abs=1e-5), key
        assert row[("kl_to_final", 3.0)] == pytest.approx(0.0, abs=1e-6)
        assert row[("settled", 3.0)] == row[("top1_agree", 3.0)] == 1.0
        # E[settle loop] = 1 + sum_{r < R} (1 - settled_r), and settling is monotone in r
        assert row[("settle_loop", 0.0)] == pytest.approx(1 + (1 - row[("settled", 1.0)]) + (1 - row[("settled", 2.0)]))
        assert row[("settled", 1.0)] <= row[("settled", 2.0)] <= 1.0
        assert row[("settled", 1.0)] <= row[("top1_agree", 1.0)]
    # the lens is not the eval loss at earlier loops: it looks at different states
    assert (lens[("loss", 1.0)] != lens[("loss", 3.0)]).all()


def test_the_stored_rows_are_what_the_measures_compute_on_the_checkpointed_model(study):
    """The last evaluation's rows, recomputed from the final checkpoint (written after it): the
    contraction samples the same tokens with the same seed, the lens reads the same batches."""
    from cartlab import checkpoint
    from cartlab.data import load_meta, open_bin
    from cartlab.measures import MeasureContext, measures_for, run_measures
    from cartlab.train.loop import _val_bins

    rid = study["ids"]["baseline-1"]
    cfg = study["runs"][rid].config
    model, _ = checkpoint.build(checkpoint.latest(Path(cfg.out_dir) / rid / "checkpoints"))
    bins = {s: open_bin(p) for s, p in _val_bins(load_meta(cfg.data.dir)).items()}
    ctx = MeasureContext(model, cfg.model_config(), cfg, bins, 12, torch.device("cpu"))
    fresh = pd.DataFrame(run_measures(measures_for(cfg.model_config(), ["logit_lens", "loop_contraction"]), ctx))
    stored = results.probes(study["db"], [rid])
    stored = stored[stored.step == 12]
    key = ["probe", "split", "x", "metric"]
    both = stored.merge(fresh.assign(x=fresh.x.astype(float)), on=key, suffixes=("_db", "_now"))
    assert len(both) == len(stored) == len(fresh)
    np.testing.assert_allclose(both.value_db, both.value_now, rtol=1e-5, atol=1e-6)


# -- frames and figures on synthetic probes ----------------------------------------------------------------------
def synthetic_store():
    """Baseline d=64 R=3 (seeds 0, 1), its no_lti variant (seed 0) and the same model with the
    gate removed by hand (state_gate=residual); lens loss = 3 + seed/10 - r/10 + step/1000,
    radius = 0.8 + r/100 + seed/100, gate 0.9, settle loop = 1.5 + seed."""
    runs = pd.DataFrame([run_row("base-0", d_model=64, n_loops=3, seed=0),
                         run_row("base-1", d_model=64, n_loops=3, seed=1),
                         run_row("nolti", d_model=64, n_loops=3, hooks="no_lti"),
                         run_row("hand", d_model=64, n_loops=3, overrides="state_gate=residual")])
    seeds = {"base-0": 0, "base-1": 1, "nolti": 0, "hand": 0}
    rows = []
    for rid, seed in seeds.items():
        gated = rid.startswith("base")
        for step in (100, 200):
            for split in ("prose", "code"):
                rows.append((rid, "logit_lens", step, split, 0.0, "settle_loop", 1.5 + seed))
                for r in (1, 2, 3):
                    loss = 3 + seed / 10 - r / 10 + step / 1000
                    rows.append((rid, "logit_lens", step, split, float(r), "loss", loss))
                    rows.append((rid, "logit_lens", step, split, float(r), "kl_to_final", (3 - r) / 10))
                    radius = 0.8 + r / 100 + seed / 100
                    rows.append((rid, "loop_contraction", step, split, float(r), "radius_mean", radius))
                    rows.append((rid, "loop_contraction", step, split, float(r), "norm_mean", 1.1 + r / 100))
                    if gated:
                        rows.append((rid, "loop_contraction", step, split, float(r), "gate_radius", 0.9))
    return runs, pd.DataFrame(rows, columns=list(schema.PROBES_COLUMNS))


def test_gateless_finds_runs_without_an_lti_gate_by_hook_or_by_hand():
    runs, _ = synthetic_store()
    dense = pd.DataFrame([run_row("dense", model="dense", n_layers=4)])
    assert list(spectral.gateless(runs)) == [False, False, True, True]
    assert not spectral.gateless(dense).any()


def test_loop_profile_is_the_seed_mean_per_variant_domain_and_loop():
    runs, probes = synthetic_store()
    prof = loop_analysis.loop_profile(runs, probes, metric="loss")
    base = prof[(prof.variant_label == "cart d=64 P=6 R=6".replace("R=6", "R=3")) & (prof.split == "prose")]
    assert list(base.loop) == [1, 2, 3] and set(base.step) == {200} and set(base.n) == {2}
    np.testing.assert_allclose(base["mean"], [3 + 0.05 - r / 10 + 0.2 for r in (1, 2, 3)])
    np.testing.assert_allclose(base["sd"], np.std([0.0, 0.1], ddof=1))
    assert prof.groupby(["variant", "split", "loop"]).size().max() == 1  # no two variants pooled
    assert prof.variant.nunique() == 3 and set(prof[prof.hooks == "no_lti"].n) == {1}
    early = loop_analysis.loop_profile(runs, probes, metric="loss", step=100)
    assert set(early.step) == {100}
    with pytest.raises(ValueError, match="step: no loss measured at step 150"):
        loop_analysis.loop_profile(runs, probes, metric="loss", step=150)
    with pytest.raises(ValueError, match=r"metric: 'radius' not allowed; allowed: \['loss'"):
        loop_analysis.loop_profile(runs, probes, metric="radius")
    with pytest.raises(ValueError, match="no logit_lens rows; train with measures"):
        loop_analysis.loop_profile(runs, None, metric="loss")


def test_loop_profile_compares_seeds_at_the_last_step_they_all_reached():
    """A seed that stopped early (crashed, or still training) is not averaged at its step 100 with
    the other seed's step 200: both are taken at step 100."""
    runs, probes = synthetic_store()
    probes = probes[~((probes.run_id == "base-1") & (probes.step == 200))]
    prof = loop_analysis.loop_profile(runs, probes, metric="loss")
    base = prof[(prof.variant_label == "cart d=64 P=6 R=3") & (prof.split == "prose")]
    assert set(base.step) == {100} and set(base.n) == {2}
    np.testing.assert_allclose(base["mean"], [3 + 0.05 - r / 10 + 0.1 for r in (1, 2, 3)])
    assert set(prof[prof.hooks == "no_lti"].step) == {200}  # another variant keeps its own last step


def test_loop_trajectory_follows_the_last_loop_or_the_one_asked_for():
    runs, probes = synthetic_store()
    traj = loop_analysis.loop_trajectory(runs, probes, metric="radius_mean")
    base = traj[(traj.hooks == "") & (traj.overrides == "") & (traj.split == "code")]
    assert list(base.step) == [100, 200] and set(base.loop) == {3}
    np.testing.assert_allclose(base["mean"], 0.8 + 0.03 + 0.005)
    assert set(loop_analysis.loop_trajectory(runs, probes, metric="radius_mean", loop=1).loop) == {1}
    settle = loop_analysis.loop_trajectory(runs, probes, metric="settle_loop")
    assert set(settle[(settle.hooks == "") & (settle.overrides == "")]["mean"]) == {2.0}  # (1.5 + 2.5) / 2
    with pytest.raises(ValueError, match="one number per evaluation"):
        loop_analysis.loop_trajectory(runs, probes, metric="settle_loop", loop=2)
    with pytest.raises(ValueError, match="no run measured radius_mean at loop 7"):
        loop_analysis.loop_trajectory(runs, probes, metric="radius_mean", loop=7)


def test_loop_summary_has_one_row_per_variant_and_domain_and_says_no_gate():
    runs, probes = synthetic_store()
    table = loop_analysis.loop_summary(runs, probes)
    assert len(table) == 3 * 2 and not table.duplicated(["config", "split"]).any()
    assert list(table.columns) == ["config", "split", "R", "step", "lens loss at loop 1", "KL at loop 1", "settle loop",
                                   "radius at loop R", "gate radius"]
    gate = dict(zip(table.config + "/" + table.split, table["gate radius"]))
    assert gate["cart d=64 P=6 R=3/prose"] == 0.9
    assert gate["cart d=64 P=6 R=3 [no_lti]/prose"] == "no gate"
    assert gate["cart d=64 P=6 R=3 {state_gate=residual}/code"] == "no gate"


def _labelled(fig):
    assert fig._suptitle is not None and fig._suptitle.get_text()
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), ax


def test_loop_profile_plot_draws_each_metric_per_domain():
    runs, probes = synthetic_store()
    fig = plots.plot_loop_profiles(runs, probes)
    assert len(fig.axes) == 4  # (loss, KL) x (code, prose)
    _labelled(fig)
    assert all(len(ax.containers) == 3 for ax in fig.axes)  # one errorbar line per variant
    one = plots.plot_loop_profiles(runs, probes, metrics=("kl_to_final",), splits=["prose"], loops=[1, 2])
    assert len(one.axes) == 1 and all(len(c.lines[0].get_xdata()) == 2 for c in one.axes[0].containers)
    with pytest.raises(ValueError, match=r"splits: \['wiki'\] not measured"):
        plots.plot_loop_profiles(runs, probes, splits=["wiki"])
    with pytest.raises(ValueError, match="settle_loop is one number per evaluation"):
        plots.plot_loop_profiles(runs, probes, metrics=("settle_loop",))


def test_contraction_plot_draws_the_gate_except_for_runs_without_one():
    runs, probes = synthetic_store()
    fig = plots.plot_loop_contraction(runs, probes, splits=["prose"])
    ax = fig.axes[0]
    _labelled(fig)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum("(no gate)" in t for t in legend) == 2 and "cart d=64 P=6 R=3" in legend
    gates = [ln for ln in ax.lines if ln.get_linestyle() == ":" and len(ln.get_ydata())]  # not the legend's key
    assert [tuple(ln.get_ydata()) for ln in gates] == [(0.9, 0.9)]  # the gated variant only, at its radius


def test_trajectory_plot_draws_one_line_per_variant_and_loop_and_the_gate():
    runs, probes = synthetic_store()
    fig = plots.plot_loop_trajectories(runs, probes, metric="radius_mean", loops=[1, 3], splits=["code"])
    ax = fig.axes[0]
    _labelled(fig)
    labels = [ln.get_label() for ln in ax.lines]
    assert sum(lb.endswith(("loop 1", "loop 3")) for lb in labels) == 3 * 2
    assert [lb for lb in labels if lb.endswith(", gate")] == ["cart d=64 P=6 R=3, gate"]
    assert sum("(no gate)" in lb for lb in labels) == 2 * 2
    settle = plots.plot_loop_trajectories(runs, probes, metric="settle_loop")
    assert len(settle.axes) == 2 and len(settle.axes[0].lines) == 3
    _labelled(settle)


def test_the_radius_trajectory_names_a_gateless_run_instead_of_drawing_it_at_one():
    runs, _ = synthetic_store()
    log = train_curves(runs.run_id, np.arange(0, 500, 100), loss=lambda t: 3 + 0 * t, rho=lambda t: 0.8 + 0 * t)
    log.loc[log.run_id.isin(["nolti", "hand"]), "rho_max"] = 1.0  # what the residual "gate" reports
    fig = plots.plot_radius_trajectories(runs, log)
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    drawn = [ln for ln in ax.lines if len(ln.get_ydata())]
    assert len(drawn) == 1 and np.allclose(drawn[0].get_ydata(), 0.8)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "cart d=64 P=6 R=3 [no_lti]: no gate" in legend
    assert "cart d=64 P=6 R=3 {state_gate=residual}: no gate" in legend


# -- the notebook, headless --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_spectral_radius_notebook_shows_the_loop_views_and_offers_every_measure(study, tmp_path):
    from cartlab.notebooks import execute

    report = tmp_path / "report"
    out = execute("spectral_radius", tmp_path / "sr.ipynb",
                  {"study": str(study["path"]), "db": str(study["db"]), "report_dir": str(report), "interactive": True},
                  timeout=600)  # per cell: a hung kernel fails the test instead of stalling the suite
    section = json.loads((report / "sections" / "spectral_radius.json").read_text())
    saved = {item["path"].split("/")[-1] for item in section["items"] if "path" in item}
    assert {"spectral_radius-logit-lens.png", "spectral_radius-contraction.png", "spectral_radius-settle-loop.png",
            "spectral_radius-contraction-trajectories.png", "spectral_radius-loop-summary.csv"} <= saved
    summary = pd.read_csv(report / "tables" / "spectral_radius-loop-summary.csv")
    assert len(summary) == 2 * 3  # baseline and no_lti (single_loop has no loops) x 3 domains
    assert set(summary.loc[summary.config.str.contains("no_lti"), "gate radius"]) == {"no gate"}
    nb = nbformat.read(out, as_version=4)
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    dropdowns = [w["state"] for w in state.values() if w["model_name"] == "DropdownModel"]
    assert len(dropdowns) == 1
    offered = dropdowns[0]["_options_labels"]
    assert [o.split(":")[0] for o in offered] == list(loop_analysis.LOOP_MEASURES)
    views = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 3  # the run picker and its figure area; the loop-measure explorer
    images = [w for w in state.values() if w["model_name"] == "ImageModel"]
    assert len(images) == 2 and all(w.get("buffers") for w in images), "both figure areas hold a drawn figure"
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
