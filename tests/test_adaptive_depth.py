"""The compute-quality frontier (`cartlab.measures.adaptive`, issue 27): every point is the loss
and mean loops per token of the model's own forward (fixed R, each exit rule at each threshold,
the fixed-point mode at each iteration cap), stopping earlier as a threshold loosens; the measure
runs only when named and stores one loss and one loops row per point and domain; the opt-in
loop_residual stores each loop's relative state change when the loop runs on to 4R.
Run: pytest tests/test_adaptive_depth.py
"""
from __future__ import annotations

import pytest
import torch

from cartlab.measures import known, measures_for
from cartlab.measures.adaptive import THRESHOLDS, frontier
from cartlab.model import CARTConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")
G = torch.Generator().manual_seed(0)
X, Y = torch.randint(0, 64, (2, 12), generator=G), torch.randint(0, 64, (2, 12), generator=G)


def test_every_point_is_the_models_own_forward():
    torch.manual_seed(0)
    model = build_model(CARTConfig.tiny(n_loops=3, init_std=0.1, hooks=("exit_head",))).eval()
    with torch.no_grad():
        points = frontier(model, X, Y)
        assert {p[0] for p in points} == {"fixed", *THRESHOLDS}
        for curve, at, loss, loops in points:
            if curve == "fixed":
                assert loss == pytest.approx(model(X, Y, n_loops=int(at))[1].item(), abs=1e-6) and loops == at
                continue
            _, own = model(X, Y, n_loops=6, exit=curve, exit_threshold=at)
            assert loss == pytest.approx(own.item(), abs=1e-6), (curve, at)
            assert loops == pytest.approx(model.loops_per_token.double().mean().item())
            assert 1 <= loops <= 6
    for curve in ("kl", "entropy", "latent"):  # a larger threshold is looser: each token stops no later
        loops = [p[3] for p in points if p[0] == curve]
        assert loops == sorted(loops, reverse=True), curve
    for curve in ("argmax", "learned"):  # a larger threshold is stricter: more loops
        loops = [p[3] for p in points if p[0] == curve]
        assert loops == sorted(loops) and loops[0] < loops[-1], curve


def test_fixed_point_points_sweep_the_iteration_cap():
    torch.manual_seed(0)
    model = build_model(CARTConfig.tiny(hooks=("fixed_point",), solver="iteration", solver_max_iter=6)).eval()
    with torch.no_grad():
        points = frontier(model, X, Y)
    assert [p[1] for p in points] == [1, 2, 4, 6] and all(p[0] == "fixed_point" for p in points)
    assert [p[3] for p in points] == sorted(p[3] for p in points) and points[0][3] == 1
    assert model.config.solver_max_iter == 6  # restored


def test_the_frontier_runs_only_when_named(tiny_data, tmp_path):
    from cartlab.data import load_meta, open_bin
    from cartlab.measures import MeasureContext, run_measures
    from cartlab.train.loop import _val_bins
    from train_helpers import tiny_config

    cfg = tiny_config(tiny_data, tmp_path, measures=["adaptive_depth"])
    assert "adaptive_depth" not in [m.name for m in measures_for(cfg.model_config())]
    assert known()["adaptive_depth"].applies(cfg.model_config())
    torch.manual_seed(0)
    model = build_model(cfg.model_config()).eval()
    bins = {s: open_bin(p) for s, p in _val_bins(load_meta(tiny_data)).items()}
    rows = run_measures(measures_for(cfg.model_config(), ["adaptive_depth"]),
                        MeasureContext(model, cfg.model_config(), cfg, bins, 12, torch.device("cpu")))
    per_split = {s: [r for r in rows if r["split"] == s] for s in bins}
    n_points = 2 * 3 + sum(len(t) for rule, t in THRESHOLDS.items() if rule != "learned")
    assert all(len(r) == 2 * n_points for r in per_split.values())
    fixed = {r["x"]: r["value"] for r in rows if r["metric"] == "fixed_loops"}
    assert fixed == {float(r): float(r) for r in range(1, 7)}


def test_loop_residual_is_the_relative_state_change_of_each_loop(tiny_data, tmp_path):
    from cartlab.data import load_meta, open_bin
    from cartlab.measures import MeasureContext, run_measures
    from cartlab.train.loop import _val_bins
    from train_helpers import tiny_config

    cfg = tiny_config(tiny_data, tmp_path, measures=["loop_residual"])
    assert "loop_residual" not in [m.name for m in measures_for(cfg.model_config())]
    assert not known()["loop_residual"].applies(CARTConfig.tiny(hooks=("fixed_point",)))
    torch.manual_seed(0)
    model = build_model(cfg.model_config()).eval()
    bins = {s: open_bin(p) for s, p in _val_bins(load_meta(tiny_data)).items()}
    ctx = MeasureContext(model, cfg.model_config(), cfg, bins, 12, torch.device("cpu"))
    rows = run_measures(measures_for(cfg.model_config(), ["loop_residual"]), ctx)
    split = next(iter(bins))
    x, _ = ctx.batches(split, 1)[0]
    curve = {r["x"]: r["value"] for r in rows if r["split"] == split and r["metric"] == "residual_curve"}
    assert sorted(curve) == list(range(1, 13))  # R = 3, run on to 4R
    states = []
    with torch.no_grad():
        e, rope = model.encode(x)
        model.recur(e, rope, 12, observe=lambda r, h, prev: states.append((h - prev).norm(dim=-1) / h.norm(dim=-1)))
    assert [curve[r] for r in range(1, 13)] == pytest.approx([s.mean().item() for s in states], rel=1e-6)
