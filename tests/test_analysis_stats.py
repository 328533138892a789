"""Guards seed-noise bands, single-seed signal calls and screen-vs-full rank statistics
(issue 5, acceptance 3; paper sections 4.4, 8, 9.5).
Run: pytest tests/test_analysis_stats.py -q
"""
import numpy as np
import pandas as pd
import pytest

from cartlab.analysis import screen as agreement
from cartlab.analysis import stats, synthetic

BASE = [20.2, 20.35, 20.5]  # sample sd 0.15


def test_seed_band_is_mean_and_sample_sd():
    band = stats.seed_band(BASE, k=2)
    assert band.mean == pytest.approx(20.35) and band.sd == pytest.approx(0.15) and band.n == 3
    assert (band.lo, band.hi) == (pytest.approx(20.05), pytest.approx(20.65))


@pytest.mark.parametrize("z,label", [(5.0, "signal"), (-5.0, "signal"), (0.5, "within noise"), (-0.5, "within noise")])
def test_single_seed_delta_labels(z, label):
    band = stats.seed_band(BASE)
    res = stats.compare_to_band(band.mean + z * band.sd, band)
    assert res.label == label and res.signal == (label == "signal")
    assert res.z == pytest.approx(z)
    assert "n=3" in res.caveat and "variant n=1" in res.caveat


def test_band_width_k_decides():
    band = stats.seed_band(BASE, k=3)
    assert stats.compare_to_band(band.mean + 2.5 * band.sd, band).label == "within noise"
    assert stats.compare_to_band(band.mean + 2.5 * band.sd, stats.seed_band(BASE, k=2)).label == "signal"


@pytest.mark.parametrize("values,k,field", [([20.0], 2, "values"), ([1, np.nan], 2, "values"), ([1, 2], 0, "k")])
def test_seed_band_rejects_bad_input(values, k, field):
    with pytest.raises(ValueError, match=field):
        stats.seed_band(values, k=k)


def test_seed_summary_groups_seeds():
    runs = pd.DataFrame([synthetic.run_row(f"b{s}", seed=s) for s in range(3)]
                        + [synthetic.run_row("lti", hooks="no_lti")])
    ev = synthetic.eval_rows({"b0": {"wiki": 20.2}, "b1": {"wiki": 20.35}, "b2": {"wiki": 20.5},
                              "lti": {"wiki": 21.0}}, step=100)
    out = stats.seed_summary(runs, ev).set_index("hooks")
    assert out.loc["", "n"] == 3 and out.loc["", "sd"] == pytest.approx(0.15)
    assert out.loc["no_lti", "n"] == 1 and np.isnan(out.loc["no_lti", "sd"])


def test_spearman_matches_rank_formula_and_detects_reversal():
    screen = pd.DataFrame({"d_model": [1, 1, 2, 2, 3, 3], "n_loops": [6, 8] * 3, "ppl": [10, 9, 8, 7, 6, 5]})
    full = screen.assign(ppl=[9, 10, 7, 8, 5, 6])  # each pair swapped: sum d^2 = 6
    res = agreement.screen_correlation(screen, full)
    assert res.rho == pytest.approx(1 - 6 * 6 / (6 * 35))
    rev = agreement.detect_reversals(screen, full)
    assert rev["reversed"].all()
    same = agreement.detect_reversals(screen, screen)
    assert not same["reversed"].any()
    assert agreement.best_setting_agreement(screen, screen)["agree"].all()


def test_screen_correlation_needs_shared_cells():
    a = pd.DataFrame({"d_model": [1, 2], "n_loops": [6, 6], "ppl": [3, 2]})
    with pytest.raises(ValueError, match="need >= 3 shared cells"):
        agreement.screen_correlation(a, a)
    with pytest.raises(ValueError, match="average seeds first"):
        agreement.screen_correlation(pd.concat([a, a]), a)


def test_band_comparisons_cover_every_validation_split():
    """The seed-noise table compares on every domain, not one default split: a variant can be a
    signal on one domain and within noise on another."""
    runs = pd.DataFrame([synthetic.run_row(f"b{s}", seed=s) for s in range(3)]
                        + [synthetic.run_row("lti", hooks="no_lti")])
    ev = synthetic.eval_rows({"b0": {"wiki": 20.2, "code": 5.0}, "b1": {"wiki": 20.35, "code": 5.1},
                              "b2": {"wiki": 20.5, "code": 5.2}, "lti": {"wiki": 20.3, "code": 6.0}}, step=100)
    out = stats.band_comparisons(runs, ev)
    assert list(out.columns[:2]) == ["split", "baseline"]
    assert sorted(out["split"]) == ["code", "wiki"]
    labels = out.set_index("split")["label"]
    assert labels["code"] == "signal" and labels["wiki"] == "within noise"
    assert list(stats.band_comparisons(runs, ev, split="wiki")["split"]) == ["wiki"]
    with pytest.raises(ValueError, match="not evaluated"):
        stats.band_comparisons(runs, ev, split="math")
