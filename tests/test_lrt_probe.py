"""LRT's approximation probe (`lrt_gap`, cartlab/measures/lrt.py) and the measured training cost.

Guards:
1. `trace` returns what the model's own forward returns, plus the source states;
2. the probe at S = T measures no gap (loss and source states equal the exact recurrence's up to
   float error), and from S = 2 on the gap and the source distance shrink as S doubles;
3. through a tiny training run: the measure is picked for LRT models only, stores its rows in
   `probes` once (after the last evaluation), its exact loss is the final validation loss (same
   batches, same schedule), `forward_cost` is logged at every log step, and the FLOPs the
   analyses account for an older database equal the ones the loop logged.
Run: pytest tests/test_lrt_probe.py -q
"""
import json
import math

import pandas as pd
import pytest
import torch

from cartlab.measures import MeasureContext, measures_for
from cartlab.measures.lrt import lrt_gap, subset_grid
from cartlab.model import DenseConfig, LRTConfig, build_model
from cartlab.model.memory import trace
from test_model_lrt import lively, tokens

HOOKS = ("lrt_kv", "lrt_residual")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


class Fixed(MeasureContext):
    """A measure context whose validation batches are given, not read from a data build."""

    def batches(self, split, n=None):
        return self.val_bins[split][: n]


def context(model, T, batches):
    cfg = type("Cfg", (), {"seq_len": T, "eval_batches": len(batches)})()
    val = {"a": batches, "b": batches[::-1]}
    return Fixed(model, model.config, cfg, val, step=10, device=torch.device("cpu"))


def test_subset_grid_has_powers_of_two_the_trained_S_and_T():
    assert subset_grid(16, 4) == [1, 2, 4, 8, 16]
    assert subset_grid(12, 3) == [1, 2, 3, 4, 8, 12]
    assert subset_grid(8, 20) == [1, 2, 4, 8] and subset_grid(1, 4) == [1]


@pytest.mark.parametrize("hooks", [("lrt_kv",), ("lrt_residual",), HOOKS], ids="+".join)
def test_trace_is_the_forward_with_the_source_states(hooks):
    model = lively(hooks)
    idx, y = tokens(10), tokens(10, seed=5)
    with torch.no_grad():
        for S in (None, 3):
            logits, loss, source = trace(model, idx, y, S)
            ref_logits, ref_loss = model(idx, y, subsets=S)
            assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss) and source.shape == (2, 10, 32)
    with pytest.raises(ValueError, match="trace needs a model with the LRT memory"):
        trace(build_model(DenseConfig.tiny()), idx)


@pytest.mark.parametrize("hooks", [("lrt_kv",), ("lrt_residual",), HOOKS], ids="+".join)
def test_the_probe_is_exact_at_S_equal_T_and_the_gap_shrinks_with_S(hooks):
    T = 16
    model = lively(hooks)
    ctx = context(model, T, [(tokens(T, seed=s), tokens(T, seed=s + 10)) for s in range(2)])
    with torch.no_grad():
        rows = lrt_gap(ctx)
    frame = pd.DataFrame(rows)
    # splits x (S in (1, 2, 4, 8, 16) x 5 metrics + S in (1, 2, 4, 8) at 2 sweeps x 4 metrics)
    assert len(frame) == 2 * (5 * 5 + 4 * 4)
    for split, g in frame.groupby("split"):
        m = g.pivot(index="x", columns="metric", values="value")
        assert list(m["loss_abs_gap_sweeps2"].dropna().index) == [1, 2, 4, 8]
        # on this untrained, scaled-up model a second sweep helps from S = 2 on (not at S = 1,
        # a Jacobi step on every position at once; the trained case: tests/test_lrt_paper.py)
        for metric in ("loss_abs_gap", "source_dist"):
            assert (m[f"{metric}_sweeps2"][[2, 4, 8]] < m[metric][[2, 4, 8]]).all(), m
        assert m.loc[T, "loss_abs_gap"] < 1e-5 and m.loc[8, "loss_abs_gap"] > 1e-4
        assert list(m.index) == [1, 2, 4, 8, 16]
        assert abs(m.loc[T, "loss_gap"]) < 1e-5 and m.loc[T, "source_dist"] < 1e-5, (split, m.loc[T])
        assert (m["loss"] - m["loss_exact"] - m["loss_gap"]).abs().max() < 1e-12
        assert m["loss_exact"].nunique() == 1
        dist = m["source_dist"]
        assert dist[2] > dist[4] > dist[8] > dist[16], dist
        assert m["loss_gap"].abs()[2] > 1e-4 and m["loss_gap"].abs()[8] > m["loss_gap"].abs()[16]
    # fewer batches: the parameter
    with torch.no_grad():
        one = pd.DataFrame(lrt_gap(ctx, batches=1))
    assert len(one) == len(frame) and not one["value"].equals(frame["value"])


def test_the_probe_applies_to_lrt_models_only():
    names = lambda cfg: [m.name for m in measures_for(cfg)]  # noqa: E731
    assert "lrt_gap" in names(LRTConfig.tiny(hooks=("lrt_residual",)))
    assert "lrt_gap" not in names(DenseConfig.tiny())


def test_a_training_run_stores_the_probe_and_the_measured_cost(tiny_data, tmp_path):
    from cartlab import results
    from cartlab.analysis import compute
    from cartlab.train import train
    from train_helpers import tiny_config

    model = {"kind": "dense", "vocab_size": 512, "d_model": 32, "n_heads": 4, "n_layers": 3, "ffn_multiple_of": 16,
             "hooks": list(HOOKS), "memory_subsets": 2}
    cfg = tiny_config(tiny_data, tmp_path, model=model, steps=6, eval_every=3, log_every=2, checkpoint_every=6,
                      measures=["lrt_gap", "lrt_bpb"])
    run_id = train(cfg)
    db = cfg.results_db
    probes = results.probes(db, [run_id], probe="lrt_gap")
    evals = results.eval_log(db, [run_id])
    assert set(probes.step) == {6}  # "final": once, after the last evaluation
    assert set(probes.split) == set(evals.split) and len(set(evals.split)) == 3
    assert sorted(set(probes.x)) == [1, 2, 4, 8, 16, 32]  # seq_len 32
    final = evals[evals.step == 6].set_index("split").loss
    for split, g in probes.groupby("split"):
        m = g.pivot(index="x", columns="metric", values="value")
        assert m.loc[32, "loss_exact"] == pytest.approx(final[split], abs=1e-6)  # the eval's own batches and schedule
        assert abs(m.loc[32, "loss_gap"]) < 1e-4 and m.loc[32, "source_dist"] < 1e-4
        assert m.loc[1, "source_dist"] > 1e-3
    # bits per byte, the authors' way, at every evaluation
    bpb = results.probes(db, [run_id], probe="lrt_bpb")
    assert set(bpb.step) == {3, 6} and set(bpb.split) == set(evals.split)
    for (step, split), g in bpb.groupby(["step", "split"]):
        m = g.groupby("metric").apply(lambda r: dict(zip(r.x, r.value)), include_groups=False)
        assert sorted(m["bpb_pass"]) == [0, 1, 2]  # the full pass and S = 2 refinements
        assert sorted(m["bpb_sequential_bucket"]) == [0, 1, 2, 4, 8, 16]
        assert m["bpb_gap"][2] == pytest.approx(m["bpb_merged"][2] - m["bpb_sequential"][2])
        loss = evals[(evals.step == step) & (evals.split == split)].loss.item()  # the eval's 2 batches, in nats
        assert m["bpb_sequential"][2] * math.log(2) * m["bytes_per_token"][0] == pytest.approx(loss, rel=1e-5)
        assert 1.0 < m["bytes_per_token"][0] < 8.0
    from cartlab.analysis import lrt_eval  # the report's tables read the stored rows

    every = results.probes(db, [run_id])
    table = lrt_eval.bpb_table(results.runs(db), every)
    assert len(table) == 3 and table[["full pass", "merged", "sequential"]].notna().all().all(), table
    gap = lrt_eval.sweep_gap(results.runs(db), every)
    assert set(gap.sweeps) == {1, 2} and gap.loss_abs_gap.notna().all()
    log = results.train_log(db, [run_id])
    assert list(log.step) == [2, 4, 6] and (log.forward_cost > 1.0).all(), log.forward_cost
    # a database written before the loop logged FLOPs: the analyses account the same numbers
    runs = results.runs(db)
    accounted = compute.with_flops(runs, log.assign(flops=None))
    assert (accounted.flops_source == "accounted").all()
    assert list(accounted.flops) == pytest.approx(list(log.flops), rel=1e-9)
    assert json.loads(runs.config_json[0])["train"]["measures"] == ["lrt_gap", "lrt_bpb"]
    # a plain Dense run may not ask for it
    from cartlab.config import ConfigError

    refused = r"^measures=\['lrt_gap'\] is not allowed: 'lrt_gap' does not apply to a dense"
    with pytest.raises(ConfigError, match=refused):
        tiny_config(tiny_data, tmp_path, model={k: v for k, v in model.items() if not k.startswith("memory_")} | {"hooks": []},
                    measures=["lrt_gap"])
