"""Guards the scaling fits: power-law CIs cover the truth, the saturating fit and Schwethelm's phi
are recovered from synthetic data with known parameters (issue 5, acceptance 2).
Run: pytest tests/test_analysis_scaling.py -q
"""
import numpy as np
import pandas as pd
import pytest

from cartlab.analysis import joint_law, scaling

TRUE_A, TRUE_B, SIGMA = 3.0, -0.3, 0.05


def _synthetic(seed, n):
    rng = np.random.default_rng(seed)
    x = np.geomspace(1e6, 1e9, n)
    return x, TRUE_A * x ** TRUE_B * np.exp(rng.normal(0, SIGMA, n))


def test_power_law_exact_on_noiseless_data():
    x = np.array([256, 512, 768, 1024.0])
    fit = scaling.fit_power_law(x, 700 * x ** -0.5, n_boot=0)
    assert fit.a == pytest.approx(700) and fit.b == pytest.approx(-0.5)
    assert fit.r2 == pytest.approx(1.0)
    np.testing.assert_allclose(fit.predict([2048]), 700 * 2048 ** -0.5)


def test_ci_covers_true_exponent_in_90_of_100_trials():
    covered = sum(lo <= TRUE_B <= hi for lo, hi in (scaling.fit_power_law(*_synthetic(s, 8), n_boot=0).ci
                                                    for s in range(100)))
    assert covered >= 90


def test_bootstrap_ci_covers_at_moderate_n():
    """The bootstrap interval is asymptotic; at n=20 it should still cover in >= 85 of 100."""
    covered = 0
    for s in range(100):
        fit = scaling.fit_power_law(*_synthetic(s, 20), n_boot=400, seed=s)
        covered += fit.boot_ci[0] <= TRUE_B <= fit.boot_ci[1]
    assert covered >= 85


def test_standard_error_matches_noise_level():
    """se(b) = sigma / sqrt(S_xx) in expectation: the spread of b over trials matches it."""
    bs, ses = zip(*((f.b, f.se_b) for f in (scaling.fit_power_law(*_synthetic(s, 8), n_boot=0) for s in range(200))))
    lx = np.log(np.geomspace(1e6, 1e9, 8))
    expected = SIGMA / np.sqrt(((lx - lx.mean()) ** 2).sum())
    assert np.std(bs) == pytest.approx(expected, rel=0.15)
    assert np.mean(ses) == pytest.approx(expected, rel=0.15)


def test_pairs_bootstrap_runs_on_four_points():
    fit = scaling.fit_power_law([256, 512, 768, 1024], [41.17, 27.10, 22.85, 20.35], bootstrap="pairs", n_boot=300)
    assert fit.boot_ci[0] <= fit.b <= fit.boot_ci[1]


def test_doubling_reduction():
    """1 - 2^b: b = -1 halves y per doubling; b = log2(0.7) gives 30%."""
    assert scaling.doubling_reduction(-1.0) == pytest.approx(0.5)
    assert scaling.doubling_reduction(np.log2(0.7)) == pytest.approx(0.3)


def test_segment_exponents_recover_piecewise_law():
    x = np.array([1.0, 2.0, 4.0])
    y = np.array([1.0, 2.0 ** -0.6, 2.0 ** -0.6 * 2.0 ** -0.4])
    seg = scaling.segment_exponents(x[::-1], y[::-1])  # order does not matter
    np.testing.assert_allclose(seg["exponent"], [-0.6, -0.4])


@pytest.mark.parametrize("x,y,field", [
    ([1, 2, 3], [1, 2], "lengths"),
    ([1, 2, 2, 2], [1, 2, 3, 4], "x:"),
    ([1, 2, 3], [1, -2, 3], "y:"),
])
def test_power_law_rejects_bad_input(x, y, field):
    with pytest.raises(ValueError, match=field):
        scaling.fit_power_law(x, y)


def test_power_law_rejects_bad_bootstrap_name():
    with pytest.raises(ValueError, match="allowed: \\['residuals', 'pairs'\\]"):
        scaling.fit_power_law([1, 2, 3], [3, 2, 1], bootstrap="wild")


@pytest.mark.parametrize("E,A,alpha", [(1.7, 400.0, 0.34), (2.5, 1e3, 0.5), (0.5, 20.0, 0.1)])
def test_saturating_fit_recovers_parameters_within_5_percent(E, A, alpha):
    x = np.geomspace(1e7, 1e10, 8)
    fit = joint_law.fit_saturating(x, E + A * x ** -alpha)
    assert fit.E == pytest.approx(E, rel=0.05)
    assert fit.A == pytest.approx(A, rel=0.05)
    assert fit.alpha == pytest.approx(alpha, rel=0.05)


def test_saturating_fit_is_robust_to_one_outlier():
    """Huber loss on log residuals: one point 30% off moves alpha far less than least squares would."""
    x = np.geomspace(1e7, 1e10, 10)
    y = 1.7 + 400 * x ** -0.34
    y[4] *= 1.3
    assert joint_law.fit_saturating(x, y).alpha == pytest.approx(0.34, rel=0.05)
    # a huge Huber delta is plain least squares on log residuals, which the outlier drags away
    assert abs(joint_law.fit_saturating(x, y, delta=10.0).alpha - 0.34) > 0.05


def _phi_frame(E=2.0, A=300.0, alpha=0.3, phi=0.6):
    rows = [dict(model="dense", n_layers=L, n_loops=np.nan, n_once=N, n_rec=0.0)
            for L, N in zip([4, 7, 12, 17], [60e6, 100e6, 160e6, 220e6])]
    rows += [dict(model="cart", n_layers=np.nan, n_loops=R, n_once=80e6, n_rec=12e6) for R in [1, 2, 4, 6, 10]]
    f = pd.DataFrame(rows)
    f["loss"] = E + A * (f["n_once"] + f["n_loops"].fillna(1) ** phi * f["n_rec"]) ** -alpha
    return f


@pytest.mark.parametrize("phi", [0.3, 0.6, 1.0])
def test_recurrence_exponent_recovered(phi):
    fit = joint_law.fit_recurrence_exponent(_phi_frame(phi=phi))
    assert fit.phi == pytest.approx(phi, abs=0.02)
    assert fit.alpha == pytest.approx(0.3, rel=0.05)
    assert fit.E == pytest.approx(2.0, rel=0.05)


def test_recurrence_exponent_with_noise_stays_close():
    f = _phi_frame()
    f["loss"] *= np.exp(np.random.default_rng(0).normal(0, 0.001, len(f)))
    assert joint_law.fit_recurrence_exponent(f).phi == pytest.approx(0.6, abs=0.1)


def test_recurrence_exponent_not_enough_data():
    """Section 9.2: two Dense depths (7L, 12L) and one R are not enough; the error says what is missing."""
    f = _phi_frame()
    f = f[(f.model == "cart") & (f.n_loops == 6) | f.n_layers.isin([7, 12])]
    with pytest.raises(ValueError, match=r"not enough data: need Dense runs at >= 3 depths .*have 2: \[7, 12\].*"
                                         r"CART runs at >= 2 loop counts .*have 1: \[6\]"):
        joint_law.fit_recurrence_exponent(f)
    with pytest.raises(ValueError, match="missing columns \\['n_rec'\\]"):
        joint_law.fit_recurrence_exponent(_phi_frame().drop(columns="n_rec"))


def test_fit_groups_recovers_each_groups_exponent_and_skips_thin_groups():
    import pandas as pd

    from cartlab.analysis.scaling import fit_groups

    d = np.array([256, 512, 768, 1024], float)
    frame = pd.concat([
        pd.DataFrame({"stage": "s2", "n_loops": 6, "d_model": d, "ppl": 3e3 * d ** -0.6}),
        pd.DataFrame({"stage": "s2", "n_loops": 8, "d_model": d, "ppl": 5e2 * d ** -0.3}),
        pd.DataFrame({"stage": "s1", "n_loops": 6, "d_model": d[:2], "ppl": [10.0, 9.0]}),  # 2 points: skipped
    ])
    out = fit_groups(frame, by=["stage", "n_loops"]).set_index("n_loops")
    assert list(out.index) == [6, 8]
    assert out.loc[6, "b"] == pytest.approx(-0.6) and out.loc[8, "b"] == pytest.approx(-0.3)
    assert out.loc[6, "per_doubling"] == pytest.approx(1 - 2 ** -0.6)
    with pytest.raises(ValueError, match="not enough data: need >= 3 distinct d_model"):
        fit_groups(frame[frame.stage == "s1"], by=["stage", "n_loops"])
