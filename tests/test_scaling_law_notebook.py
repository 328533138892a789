"""Guards the joint-law analysis of a study (issue 16): `scaling_study.scaling_points` turns a results
database's runs into (N stored/effective non-embedding, D tokens, final loss) points with the
accounting of each run's own model, refuses to pool two variants into one point, and the
`scaling_law` notebook runs headlessly on a width x token-budget grid (acceptance 4) without
training it: the grid's runs are written straight into a database with losses from a known law
L = E + A N^-alpha + B D^-beta, which the notebook's fit must recover. The paper's tables (no
token-budget grid, no training configs) give a note, not a crash.
Run: pytest tests/test_scaling_law_notebook.py -q   (two notebook kernels: about 1 min on 2 idle cores,
3 min at load average ~20)
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from cartlab.analysis import joint_law, scaling_study
from cartlab.model import account
from cartlab.results import ResultsDB
from cartlab.studies import load_study

LAW = dict(E=1.5, A=60.0, alpha=0.35, B=90.0, beta=0.3)
WIDTHS, TOKENS = [32, 48, 64, 96], [2.0e4, 4.0e4, 8.0e4, 1.6e5]


def _law(n, d):
    return LAW["E"] + LAW["A"] * n ** -LAW["alpha"] + LAW["B"] * d ** -LAW["beta"]


def synthetic_grid(root, *, widths=WIDTHS, tokens=TOKENS, seeds=(1,), noise=0.0, extra_set=None):
    """A width x token-budget study (smoke preset) whose runs are written into root/results.db as
    completed, each with its real training config and a final eval on two domains: prose at the
    law's loss (times exp(N(0, noise))) and stories 0.2 nats above. Returns (study path, db)."""
    spec = {"name": "synth", "preset": "smoke", "seeds": list(seeds), "set": dict(extra_set or {}),
            "grid": {"model.d_model": list(widths), "tokens": list(tokens)}, "runs": [{"label": "cart"}]}
    study, db_path = root / "synth.yaml", root / "results.db"
    study.write_text(yaml.safe_dump(spec))
    rng = np.random.default_rng(0)
    db = ResultsDB(db_path)
    try:
        for run in load_study(study).expand():
            cfg, m = run.config, run.config.model_config()
            acc = account(m, cfg.seq_len)
            d = cfg.steps * cfg.tokens_per_step
            loss = _law(acc.non_embedding_stored, d) * np.exp(rng.normal(0, noise))
            db.upsert_run(run.run_id, name=run.run_id, source="local", model=m.kind, d_model=m.d_model,
                          prelude_layers=m.prelude_layers, n_loops=m.n_loops, hooks="", seed=cfg.seed, n_seeds=1,
                          stage=cfg.stage, **cfg.variant_fields(), stored_params=acc.stored_params,
                          effective_params=acc.effective_params, tokens=d, status="completed", step=cfg.steps,
                          config_json={"train": cfg.to_dict(), "model": m.to_dict(), "identity": cfg.identity()})
            db.log_eval(run.run_id, cfg.steps, {"prose": {"loss": loss, "ppl": float(np.exp(loss))},
                                                "stories": {"loss": loss + 0.2, "ppl": float(np.exp(loss + 0.2))}})
    finally:
        db.close()
    return study, db_path


def _points(study, db, split="prose"):
    from cartlab.report import load_results

    res = load_results(str(study), db)
    return res, scaling_study.scaling_points(res.runs, res.eval_log, split=split)


def test_points_carry_each_runs_own_accounting_and_budgeted_tokens(tmp_path):
    study, db = synthetic_grid(tmp_path, widths=[32, 64], tokens=[2.0e4, 4.0e4])
    res, pts = _points(study, db)
    assert len(pts) == 4 and set(pts["family"]) == {"cart P=2 R=3"}
    for row in pts.itertuples():
        run = next(r for r in load_study(study).expand() if r.run_id == row.run_id)
        acc = account(run.config.model_config(), run.config.seq_len)
        assert (row.n_stored, row.n_effective) == (acc.non_embedding_stored, acc.non_embedding_effective)
        assert row.n_effective > row.n_stored  # the core counted R times
        assert row.tokens == run.config.steps * run.config.tokens_per_step >= 2.0e4
        assert row.flops == pytest.approx(acc.train_flops_per_token() * row.tokens)
    mean = scaling_study.scaling_points(res.runs, res.eval_log, split="mean")
    np.testing.assert_allclose(mean.sort_values("run_id")["loss"], pts.sort_values("run_id")["loss"] + 0.1)
    with pytest.raises(ValueError, match="split: 'wiki' not among the runs' evaluated splits"):
        scaling_study.scaling_points(res.runs, res.eval_log, split="wiki")


def test_points_refuse_two_variants_in_one_cell(tmp_path):
    """Two learning rates at the same (width, tokens) are two configurations, not seeds."""
    study, db = synthetic_grid(tmp_path, widths=[32], tokens=[2.0e4])
    other = tmp_path / "lr"
    other.mkdir()
    _, db2 = synthetic_grid(other, widths=[32], tokens=[2.0e4], extra_set={"optim.lr": 1e-3})
    res1, _ = _points(study, db)
    res2, _ = _points(other / "synth.yaml", db2)
    runs = pd.concat([res1.runs, res2.runs], ignore_index=True)
    evals = pd.concat([res1.eval_log, res2.eval_log], ignore_index=True)
    with pytest.raises(ValueError, match="holds several variants, not seeds of one configuration"):
        scaling_study.scaling_points(runs, evals, split="prose")


def test_published_rows_without_a_config_are_refused_by_name():
    from cartlab.analysis.published import load_published

    pub = load_published()
    with pytest.raises(ValueError, match="has no stored training config"):
        scaling_study.scaling_points(pub.runs, pub.eval_log, split="wiki")


def test_families_short_of_sizes_or_budgets_are_named_not_fitted(tmp_path):
    study, db = synthetic_grid(tmp_path, widths=[32, 48, 64], tokens=[2.0e4, 4.0e4])
    _, pts = _points(study, db)
    ready, short = scaling_study.law_families(pts)
    assert ready == {} and "3 model size(s) and 2 token budget(s)" in short["cart P=2 R=3"]


def test_joint_fits_recover_the_law_in_stored_parameters(tmp_path):
    study, db = synthetic_grid(tmp_path)
    _, pts = _points(study, db)
    ready, _ = scaling_study.law_families(pts)
    fits = scaling_study.joint_fits(ready["cart P=2 R=3"], n_boot=0)
    for name, value in LAW.items():
        assert getattr(fits["stored"], name) == pytest.approx(value, rel=0.02), name
    assert fits["effective"].alpha != pytest.approx(fits["stored"].alpha, rel=0.02)  # another N, another law
    table = scaling_study.law_table(fits)
    assert list(table["parameter"]) == ["E", "A", "B", "alpha", "beta", "a"]
    assert table.loc[table.parameter == "a", "stored"].item() == pytest.approx(0.3 / 0.65, rel=0.03)


def test_flops_per_token_curve_is_exact_for_a_power_and_needs_two_sizes():
    n = np.array([1e5, 3e5, 1e6])
    curve = joint_law.flops_per_token_curve(n, 6.0 * n)
    assert (curve.c, curve.k) == (pytest.approx(6.0), pytest.approx(1.0))
    np.testing.assert_allclose(curve(2e6), 1.2e7)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        joint_law.flops_per_token_curve([1e5, 1e5], [6e5, 6e5])


def test_frontier_table_follows_the_closed_form_for_6nd(tmp_path):
    study, db = synthetic_grid(tmp_path)
    _, pts = _points(study, db)
    fits = scaling_study.joint_fits(pts, n_boot=0)
    table = scaling_study.frontier_table({"stored": fits["stored"]}, {"stored": 6.0}, [1e12, 1e14])
    n_opt, d_opt = fits["stored"].optimal_allocation(np.array([1e12, 1e14]))
    np.testing.assert_allclose(table["N_opt"], n_opt)
    np.testing.assert_allclose(table["N_opt"] * table["D_opt"] * 6.0, [1e12, 1e14])


@pytest.mark.slow
def test_notebook_fits_the_grid_headlessly(tmp_path):
    from cartlab.notebooks import execute

    study, db = synthetic_grid(tmp_path, seeds=(1, 2), noise=0.003)
    report = tmp_path / "report"
    execute("scaling_law", tmp_path / "grid.ipynb",
            {"study": str(study), "db": str(db), "report_dir": str(report), "n_boot": 30})
    section = json.loads((report / "sections" / "scaling_law.json").read_text())
    paths = [i.get("path", "") for i in section["items"]]
    for name in ("iso-loss", "frontier", "residuals"):
        assert f"figures/scaling_law-cart-P2-R3-{name}.png" in paths, name
    for name in ("runs", "cart-P2-R3-parameters", "cart-P2-R3-frontier", "cart-P2-R3-diagnostics",
                 "cart-P2-R3-loo"):
        assert f"tables/scaling_law-{name}.csv" in paths, name
    params = pd.read_csv(report / "tables" / "scaling_law-cart-P2-R3-parameters.csv").set_index("parameter")
    for name in ("E", "alpha", "beta"):  # the truth inside an interval that is not vacuous
        lo, hi = params.loc[name, "stored lo"], params.loc[name, "stored hi"]
        assert lo < LAW[name] < hi and hi - lo < 1.5 * LAW[name], (name, lo, hi)
    loo = pd.read_csv(report / "tables" / "scaling_law-cart-P2-R3-loo.csv")
    assert set(loo["N"]) == {"stored", "effective"} and loo["rel_error"].abs().max() < 0.05
    # (on the paper's numbers it fits nothing and says so in one line: test_notebooks.assert_paper_report)
