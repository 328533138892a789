"""The analysis of adaptive depth (cartlab.analysis.adaptive, issue 27) on synthetic probes with a
known answer: the frontier frame pools seeds within a variant at each run's last step; the
cheapest point at equal loss (within the tolerance of the trained depth's loss) is found per exit
rule, a rule that needs more loops saves none and a rule never at equal loss is said so; the
fixed-point mode is measured against its own full solve; findings are made only where a rule saves
loops on every domain; the convergence verdict calls a geometric residual with a Jacobian radius
below 1 contracting and a levelled-off one not; and the study adaptive-depth expands into its four
arms with the measures they need, under run ids of their own.
Run: pytest tests/test_adaptive_analysis.py (a few seconds).
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from cartlab.analysis import adaptive  # noqa: E402
from cartlab.analysis.schema import Results  # noqa: E402
from cartlab.analysis.synthetic import run_row  # noqa: E402

R = 4
FIXED = [5.0, 4.6, 4.4, 4.3, 4.31, 4.35, 4.4, 4.5]  # loss at R = 1..8
CURVES = {  # curve: (x, loops, loss)
    "kl": ([1e-4, 1e-3, 1e-2, 1e-1], [7.5, 5.0, 3.0, 1.5], [4.29, 4.30, 4.31, 4.7]),   # saves: 3.0 loops at 1e-2
    "argmax": ([1, 2, 3], [6.0, 4.2, 3.9], [4.30, 4.35, 4.6]),                      # equal loss only at 6 loops
    "entropy": ([0.1, 0.5], [2.0, 1.0], [4.5, 4.8]),                                # never at equal loss
}
FP = ([1, 2, 4, 8, 16], [1, 2, 4, 8, 12.5], [5.0, 4.6, 4.35, 4.3, 4.3])              # cap 8 is enough


def _rows(run_id, split, curve, xs, loops, losses, offset, step=150):
    out = []
    for x, n, L in zip(xs, loops, losses):
        out += [{"run_id": run_id, "probe": "adaptive_depth", "step": step, "split": split, "x": float(x),
                 "metric": f"{curve}_loss", "value": L + offset},
                {"run_id": run_id, "probe": "adaptive_depth", "step": step, "split": split, "x": float(x),
                 "metric": f"{curve}_loops", "value": n}]
    return out


def _study():
    runs = pd.DataFrame([run_row(f"fixed-s{s}", seed=s, n_loops=R, variant="aaaaaaaaaaaa", variant_label="cart R=4")
                         for s in (1, 2)]
                        + [run_row(f"fp-s{s}", seed=s, n_loops=R, hooks="fixed_point", variant="bbbbbbbbbbbb",
                                   variant_label="cart R=4 [fixed_point]") for s in (1, 2)])
    rows = []
    for s, off in ((1, -0.005), (2, 0.005)):
        for split in ("prose", "iteration"):
            rows += _rows(f"fixed-s{s}", split, "fixed", range(1, 9), range(1, 9), FIXED, off)
            for curve, (xs, loops, losses) in CURVES.items():
                rows += _rows(f"fixed-s{s}", split, curve, xs, loops, losses, off)
            rows += _rows(f"fp-s{s}", split, "fixed_point", *FP, off)
        # seeds that disagree: +0.00 and +0.06 nats over fixed R=4, on prose only
        rows += _rows(f"fixed-s{s}", "prose", "latent", [0.1], [2.0], [4.3 + (s - 1) * 0.06], off)
        rows += _rows(f"fixed-s{s}", "prose", "kl", [1e-2], [1.0], [9.0], 0.0, step=50)  # an earlier step: ignored
    return runs, pd.DataFrame(rows)


def test_the_frontier_pools_seeds_within_a_variant_at_the_last_step():
    runs, probes = _study()
    pts = adaptive.frontier_points(probes, runs)
    assert set(pts["curve"]) == {"fixed", "kl", "argmax", "entropy", "latent", "fixed_point"}
    means = adaptive.frontier_means(pts)
    kl = means[(means["curve"] == "kl") & (means["split"] == "prose")].set_index("x")
    assert kl.loc[1e-2, "loss"] == pytest.approx(4.31) and kl.loc[1e-2, "loops"] == 3.0
    assert kl.loc[1e-2, "loss_sd"] == pytest.approx(0.01 / math.sqrt(2)) and kl.loc[1e-2, "n"] == 2
    assert adaptive.frontier_points(probes[probes.probe == "solver"], runs).empty


def test_the_cheapest_point_at_equal_loss_per_rule():
    runs, probes = _study()
    sav = adaptive.savings(adaptive.frontier_points(probes, runs)).set_index(["config", "split", "curve"])
    kl = sav.loc[("cart R=4", "prose", "kl")]
    assert kl["reference"] == "fixed R=4" and kl["ref_loss"] == pytest.approx(4.3) and kl["ref_loops"] == 4
    assert kl["tol"] == pytest.approx(0.005 * 4.3)  # both seeds 0.01 worse: no spread, 0.5% of the loss
    assert kl["excess"] == pytest.approx(0.01)
    assert (kl["x"], kl["loops"], kl["saved"], kl["saves"]) == (1e-2, 3.0, 1.0, True)
    argmax = sav.loc[("cart R=4", "prose", "argmax")]
    assert argmax["loops"] == 6.0 and not argmax["saves"]
    entropy = sav.loc[("cart R=4", "prose", "entropy")]
    assert math.isnan(entropy["loops"]) and not entropy["saves"] and entropy["best_loss"] == pytest.approx(4.5)
    assert sav.loc[("cart R=4", "prose", "fixed"), "loops"] == 4  # no fixed R below 4 reaches equal loss
    fp = sav.loc[("cart R=4 [fixed_point]", "prose", "fixed_point")]
    assert fp["reference"] == "fixed point, cap 16" and (fp["x"], fp["loops"], fp["saves"]) == (8, 8, True)
    latent = sav.loc[("cart R=4", "prose", "latent")]  # the seeds' disagreement widens the tolerance
    assert latent["excess"] == pytest.approx(0.03) and latent["tol"] == pytest.approx(2 * 0.03) and latent["saves"]
    strict = adaptive.savings(adaptive.frontier_points(probes, runs), k=0).set_index(["config", "split", "curve"])
    assert math.isnan(strict.loc[("cart R=4", "prose", "latent"), "loops"])
    capped = adaptive.equal_loss(adaptive.frontier_points(probes, runs), k=100)  # 2% of the loss at most
    assert capped["tol"].max() == pytest.approx(0.02 * 4.3)
    text = adaptive.describe_savings(sav.reset_index())
    assert "kl: saves, 3.00 loops at +0.010 nats" in text and "entropy: never at equal loss" in text and "argmax: no saving" in text


def test_findings_only_where_a_rule_saves_loops_on_every_domain():  # latent: on prose only
    runs, probes = _study()
    found = adaptive.findings(Results(runs, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), probes))
    claims = {(f.claim, f.split) for f in found}
    assert claims == {("cart R=4: kl exit at x=0.01 vs fixed R=4", "prose"),
                      ("cart R=4: kl exit at x=0.01 vs fixed R=4", "iteration"),
                      ("cart R=4 [fixed_point]: fixed_point exit at x=8 vs fixed point, cap 16", "prose"),
                      ("cart R=4 [fixed_point]: fixed_point exit at x=8 vs fixed point, cap 16", "iteration")}
    kl = next(f for f in found if "kl" in f.claim)
    assert kl.effect == pytest.approx(0.01) and kl.n_a == 2 and kl.verdict == "signal"  # 4.31 - 4.30 each seed
    assert "3.00 mean loops vs 4.00" in kl.note


def _convergence_probes():
    rows = []
    for run, res, jac in (("a-s1", lambda r: 0.5 ** r, 0.8), ("b-s1", lambda r: 0.05, 1.1)):
        for split in ("prose",):
            rows += [{"run_id": run, "probe": "loop_residual", "step": 150, "split": split, "x": r,
                      "metric": "residual_curve", "value": res(r)} for r in range(1, 17)]
            rows += [{"run_id": run, "probe": "loop_residual", "step": 150, "split": split, "x": r,
                      "metric": "converged", "value": float(res(r) < 1e-3)} for r in range(1, 17)]
            rows += [{"run_id": run, "probe": "loop_contraction", "step": 150, "split": split, "x": r,
                      "metric": m, "value": v} for r in range(1, R + 1)
                     for m, v in (("radius_mean", jac), ("norm_mean", 2 * jac))]
    return pd.DataFrame(rows)


def test_the_convergence_verdict():
    runs = pd.DataFrame([run_row("a-s1", n_loops=R, variant="aaaaaaaaaaaa", variant_label="contracting"),
                         run_row("b-s1", n_loops=R, variant="bbbbbbbbbbbb", variant_label="flat")])
    log = pd.DataFrame({"run_id": ["a-s1", "a-s1", "b-s1"], "step": [100, 150, 150], "rho_max": [0.5, 0.9, 0.95]})
    conv = adaptive.convergence(runs, _convergence_probes(), log)
    assert len(conv) == 2 * 16 and set(conv["source"]) == {"loop_residual"}
    a = conv[conv["config"] == "contracting"].set_index("loop")
    assert a.loc[4, "jac_radius"] == 0.8 and math.isnan(a.loc[5, "jac_radius"]) and a.loc[1, "gate_radius"] == 0.9
    ver = adaptive.verdicts(conv).set_index("config")
    assert ver.loc["contracting", "rate"] == pytest.approx(0.5) and ver.loc["contracting", "contracts"]
    assert ver.loc["flat", "rate"] == pytest.approx(1.0) and not ver.loc["flat", "contracts"]
    assert "levels off" in ver.loc["flat", "sentence"] and "Jacobian radius 1.10" in ver.loc["flat", "sentence"]
    assert "contracts on no domain" in adaptive.describe_convergence(ver.reset_index())
    assert adaptive.tail_rate([1.0, 2.0, 4.0]) == pytest.approx(2.0) and math.isnan(adaptive.tail_rate([1.0]))
    fig = adaptive.plot_convergence(conv, split="prose")
    assert len(fig.axes) == 2
    runs_f, probes_f = _study()
    assert len(adaptive.plot_frontier(adaptive.frontier_points(probes_f, runs_f), splits=["prose"]).axes) == 2
    with pytest.raises(ValueError, match="split: 'wiki'"):
        adaptive.plot_convergence(conv, split="wiki")


def test_the_study_trains_its_four_arms_with_their_measures_under_ids_of_their_own():
    from cartlab.studies import load_study

    runs = load_study("adaptive-depth").expand()
    assert sorted({r.label for r in runs}) == ["exit_head", "fixed-R", "fixed_point", "random_loops"]
    assert all(sorted(r.seed for r in runs if r.label == label) == [1, 2] for label in {r.label for r in runs})
    for r in runs:
        assert "adaptive_depth" in r.config.measures
        assert ("solver" if r.label == "fixed_point" else "loop_residual") in r.config.measures
    assert next(r for r in runs if r.label == "fixed_point").config.model_config().solver == "anderson"
    others = {r.run_id for name in ("cpu-demo", "variable_depth") for r in load_study(name).expand()}
    assert not others & {r.run_id for r in runs}  # a shared run would lack the opt-in measures
