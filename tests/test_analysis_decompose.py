"""Guards the CART-Dense gap (section 7.6) and its ablation decomposition (section 8) on a
synthetic results store whose every number is set here, so expected values are plain arithmetic.
Run: pytest tests/test_analysis_decompose.py -q
"""
import numpy as np
import pandas as pd
import pytest

from cartlab.analysis import decompose, published
from cartlab.analysis.synthetic import eval_rows, run_row

STEP = 30_500
BASE_SEEDS = [19.9, 20.0, 20.1]  # mean 20.0, sd 0.1 -> 2-sd band 0.2
ABLATIONS = {  # hooks -> single-seed wiki ppl
    "single_loop": 20.15,
    "unshare_core": 19.0,
    "self_attn_core,unshare_core": 19.02,
    "no_hyper": 20.05,
    "no_lti": 19.97,
    "no_lie": 20.0,
    "unfreeze_kv": 20.08,
}
DENSE = {7: ([19.65, 19.7, 19.75], 123e6), 12: ([18.45, 18.5, 18.55], 180e6)}


def store(ablations=ABLATIONS):
    runs, ppl = [], {}
    for s, v in enumerate(BASE_SEEDS):
        runs.append(run_row(f"base-s{s}", seed=s, stored_params=125e6, effective_params=178.8e6))
        ppl[f"base-s{s}"] = {"wiki": v, "fineweb": v * 1.02}
    for hooks, v in ablations.items():
        rid = f"abl-{hooks}"
        runs.append(run_row(rid, hooks=hooks, n_loops=1 if hooks == "single_loop" else 6, stored_params=np.nan))
        ppl[rid] = {"wiki": v, "fineweb": v * 1.02}
    for L, (vals, n) in DENSE.items():
        for s, v in enumerate(vals):
            rid = f"dense{L}-s{s}"
            runs.append(run_row(rid, model="dense", n_layers=L, seed=s, stored_params=n, effective_params=n))
            ppl[rid] = {"wiki": v, "fineweb": v}
    return pd.DataFrame(runs), eval_rows(ppl, step=STEP)


CART = {"d_model": 1024, "n_loops": 6}


def test_relative_gap():
    assert decompose.relative_gap(20.35, 20.13) == pytest.approx(0.22 / 20.13)
    with pytest.raises(ValueError, match="reference"):
        decompose.relative_gap(1.0, 0.0)


def test_dense_gaps_match_by_stored_and_effective_params():
    runs, ev = store()
    g = decompose.dense_gaps(runs, ev, cart=CART).set_index("split")
    assert g.loc["wiki", "dense_stored_run"] == "dense7-s0" and g.loc["wiki", "dense_effective_run"] == "dense12-s0"
    assert g.loc["wiki", "gap_stored"] == pytest.approx((20.0 - 19.7) / 19.7)
    assert g.loc["wiki", "gap_effective"] == pytest.approx((20.0 - 18.5) / 18.5)
    assert g.loc["fineweb", "gap_effective"] == pytest.approx((20.4 - 18.5) / 18.5)
    assert g.loc["wiki", "cart_n"] == 3 and g.loc["wiki", "cart_sd"] == pytest.approx(0.1)


def test_dense_gap_on_published_table9():
    """Section 7.6: Dense 7L (stored-matched, 123M vs 125.1M) beats CART d=1024 R=6 on all three
    sets; no effective-matched Dense survived extraction (Dense 12L numbers were lost)."""
    res = published.load_published()
    g = decompose.dense_gaps(res.runs, res.eval_log,
                             cart={"d_model": 1024, "n_loops": 6, "prelude_layers": 6, "stage": "stage2"})
    g = g.set_index("split")
    assert g.loc["wiki", "gap_stored"] == pytest.approx((20.354 - 20.13) / 20.13)
    assert g.loc["tinystories", "gap_stored"] == pytest.approx((2.798 - 2.746) / 2.746)
    assert g.loc["fineweb", "gap_stored"] == pytest.approx((20.67 - 20.26) / 20.26)
    assert (g["gap_stored"] > 0).all() and g["gap_effective"].isna().all()


def test_decomposition_values_labels_and_sums():
    runs, ev = store()
    dec = decompose.decompose_gap(runs, ev, cart=CART, split="wiki", k=2.0)
    v = dec.set_index(["path", "component"])["value"]
    lab = dec.set_index(["path", "component"])["label"]
    expected = {
        ("effective", "shared_weights"): 20.0 - 19.0,
        ("effective", "attention_type"): 19.0 - 19.02,
        ("effective", "frozen_kv"): 20.0 - 20.08,
        ("effective", "hyperconnection"): 20.0 - 20.05,
        ("effective", "lti_gate"): 20.0 - 19.97,
        ("effective", "loop_index_embedding"): 0.0,
        ("effective", "total"): 20.0 - 18.5,
        ("stored", "recurrence_beyond_R1"): 20.0 - 20.15,
        ("stored", "cart_at_R1_vs_dense"): 20.15 - 19.7,
        ("stored", "total"): 20.0 - 19.7,
    }
    for key, val in expected.items():
        assert v[key] == pytest.approx(val, abs=1e-9), key
    residual = (20.0 - 18.5) - (1.0 - 0.02 - 0.08 - 0.05 + 0.03 + 0.0)
    assert v[("effective", "residual_framing")] == pytest.approx(residual)
    for path in ("effective", "stored"):
        parts = dec[(dec.path == path) & (dec.component != "total")]
        assert parts["value"].sum() == pytest.approx(v[(path, "total")])
        assert parts["rel"].sum() == pytest.approx(dec[(dec.path == path) & (dec.component == "total")]["rel"].iloc[0])
    # noise = k * sd * sqrt(sum w^2 / n), sd = 0.1, baseline and Dense means over 3 seeds, ablations 1 seed
    noise = dec.set_index(["path", "component"])["noise"]
    assert noise[("effective", "shared_weights")] == pytest.approx(0.2 * np.sqrt(1 / 3 + 1))  # B - U
    assert noise[("effective", "attention_type")] == pytest.approx(0.2 * np.sqrt(2))  # U - US
    assert noise[("effective", "total")] == pytest.approx(0.2 * np.sqrt(2 / 3))  # B - D_e
    # residual = (B - D) - (B - U) - (U - US) - (B - X) - (B - H) - (B - L) - (B - E)
    #          = -4 B + US + X + H + L + E - D
    assert noise[("effective", "residual_framing")] == pytest.approx(0.2 * np.sqrt(16 / 3 + 5 + 1 / 3))
    assert noise[("stored", "cart_at_R1_vs_dense")] == pytest.approx(0.2 * np.sqrt(1 + 1 / 3))  # S - D_s
    # shared weights (1.0 > 0.23), the gaps and R=1 vs Dense (0.45 > 0.23) are signal; the residual
    # framing (0.62) collects eight measurements' noise (0.65) and is not
    signal = {k for k, l in lab.items() if l == "signal"}
    assert signal == {("effective", "shared_weights"), ("effective", "total"),
                      ("stored", "cart_at_R1_vs_dense"), ("stored", "total")}
    assert "n=3" in dec.attrs["caveat"]


def test_decomposition_with_missing_ablation_names_it():
    ablations = {k: v for k, v in ABLATIONS.items() if k != "no_lie"}
    ablations["no_lti"] = 20.6  # now a signal: removing the gate costs 3 sd
    runs, ev = store(ablations)
    dec = decompose.decompose_gap(runs, ev, cart=CART)
    eff = dec[dec.path == "effective"].set_index("component")
    assert "loop_index_embedding" not in eff.index and "residual_framing" not in eff.index
    rest = eff.loc["unattributed (includes loop_index_embedding)"]
    assert "loop_index_embedding" in rest["note"] and rest["label"] == "unattributed"  # not judged as one component
    trained = set(dec["with"]) - {"baseline"}
    assert rest["with"] in {"baseline"} | {h for h in ablations}  # it starts from a configuration that was trained
    assert trained <= {"baseline", *ablations}
    assert eff.loc["lti_gate", "label"] == "signal" and eff.loc["lti_gate", "value"] == pytest.approx(-0.6)
    assert eff.drop("total")["value"].sum() == pytest.approx(eff.loc["total", "value"])


def test_decomposition_rejects_bad_input():
    runs, ev = store()
    with pytest.raises(ValueError, match="split"):
        decompose.decompose_gap(runs, ev, cart=CART, split="lambada")
    with pytest.raises(ValueError, match="metric"):
        decompose.decompose_gap(runs, ev, cart=CART, metric="acc")
    with pytest.raises(ValueError, match=">= 2 seeds"):
        one = runs[~runs.run_id.isin(["base-s1", "base-s2"])]
        decompose.decompose_gap(one, ev, cart=CART)
    with pytest.raises(ValueError, match="no CART baseline"):
        decompose.decompose_gap(runs, ev, cart={"d_model": 512})
