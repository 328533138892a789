"""Guards the paper-table loader and the derived figures the paper states (issue 5, acceptance 1).

Every expected number is read from the paper's prose or recomputed from its tables by the
formula the paper gives, never taken from the code under test.
Run: pytest tests/test_analysis_published.py -q
"""
import math

import numpy as np
import pandas as pd
import pytest

from cartlab.analysis import accounting, published, scaling, schema, screen, spectral, stats


@pytest.fixture(scope="module")
def res():
    return published.load_published()


@pytest.fixture(scope="module")
def final(res):
    return schema.final_eval(res.runs, res.eval_log)


def test_frames_follow_schema(res):
    for table, frame in zip(schema.Results._fields, res):
        assert list(frame.columns) == list(schema.TABLES[table])
    assert set(res.runs["source"]) == {"published"}
    assert res.runs["seed"].isna().all()
    # 16 Stage-1 cells (Table 6), 12 Stage-2 cells + P=4 spot check + Dense 7L (Table 9)
    assert (res.runs["stage"] == "stage1").sum() == 16
    assert (res.runs["stage"] == "stage2").sum() == 14
    assert set(res.eval_log["split"]) == {"wiki", "tinystories", "fineweb"}


def test_validate_names_missing_columns(res):
    with pytest.raises(ValueError, match=r"missing columns \['ppl'\]"):
        schema.validate(res.eval_log.drop(columns="ppl"), "eval_log")
    with pytest.raises(ValueError, match="allowed: \\['cart', 'dense'\\]"):
        schema.validate(res.runs.assign(model="mamba"), "runs")
    with pytest.raises(ValueError, match="runs.hooks"):
        schema.validate(res.runs.assign(hooks="no_lti,unshare_core,no_hyper"), "runs")
    with pytest.raises(ValueError, match="allowed"):
        schema.validate(res.runs, "results")


def test_paper_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("CARTLAB_PAPER_DIR", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="CARTLAB_PAPER_DIR"):
        published.load_table("table7")
    pd.DataFrame({"d_model": [1], "n_loops": [2], "ppl_wiki_3seed_mean": [3.0]}).to_csv(
        tmp_path / "table7_stage2_ppl_wiki_by_R.csv", index=False)
    monkeypatch.setenv("CARTLAB_PAPER_DIR", str(tmp_path))
    assert published.load_table("table7")["ppl_wiki_3seed_mean"].tolist() == [3.0]


def test_budgets_match_section_4():
    assert published.STAGE2_TOKENS == 30_500 * 32_768 and abs(published.STAGE2_TOKENS / 1e9 - 1) < 0.001
    assert round(published.STAGE1_TOKENS / 1e6) == 49  # "49M tokens"


def test_stage2_segment_exponents_table11(final):
    """Section 7.3: per-segment exponents about -0.60, -0.42, -0.40 on Stage-2 wiki ppl."""
    s2 = final[(final.stage == "stage2") & (final.model == "cart") & (final.prelude_layers == 6)
               & (final.n_loops == 6) & (final.split == "wiki")]
    seg = scaling.segment_exponents(s2["d_model"], s2["ppl"])
    assert seg["exponent"].round(2).tolist() == [-0.60, -0.42, -0.40]
    # the same from Table 11 as printed
    t11 = published.load_table("table11")
    seg11 = scaling.segment_exponents(t11["d_model"], t11["stage2_ppl_wiki_R6_3seed_mean"])
    assert seg11["exponent"].round(2).tolist() == [-0.60, -0.42, -0.40]
    # softening with scale (section 7.3's "soften progressively")
    assert np.all(np.diff(seg11["exponent"]) > 0)


def test_stage2_fit_is_steeper_than_stage1():
    """Section 7.3: the 4-point Stage-2 fit is steeper than the Stage-1 fit."""
    t11 = published.load_table("table11")
    b1 = scaling.fit_power_law(t11["d_model"], t11["stage1_ppl_wiki_R8"], n_boot=0).b
    b2 = scaling.fit_power_law(t11["d_model"], t11["stage2_ppl_wiki_R6_3seed_mean"], n_boot=0).b
    assert b2 < b1 < 0
    # Table 11's Stage-1 column is Table 6's R=8 column
    t6 = published.load_table("table6").query("n_loops == 8").set_index("d_model")["ppl_wiki"]
    np.testing.assert_allclose(t11.set_index("d_model")["stage1_ppl_wiki_R8"], t6, atol=0.05)


def _cells(final, stage):
    f = final[(final.stage == stage) & (final.model == "cart") & (final.prelude_layers == 6) & (final.split == "wiki")]
    return f[["d_model", "n_loops", "ppl"]]


def test_stage1_best_R_differs_from_stage2_at_every_width(final):
    """Sections 5.2 / 9.5: Stage 1 picks R=6 at d=256 and R=8 above; Stage 2 reverses both."""
    s1, s2 = _cells(final, "stage1"), _cells(final, "stage2")
    for shared_only in (False, True):
        agree = screen.best_setting_agreement(s1, s2, shared_only=shared_only).set_index("d_model")
        assert agree.index.tolist() == [256, 512, 768, 1024]
        assert not agree["agree"].any()
    agree = screen.best_setting_agreement(s1, s2, shared_only=True).set_index("d_model")
    assert agree["best_screen"].tolist() == [6, 8, 8, 8]
    assert agree["best_full"].tolist() == [8, 6, 6, 6]
    rev = screen.detect_reversals(s1, s2)
    assert len(rev) == 4 and rev["reversed"].all()  # R=6 vs R=8 flips at all four widths


def test_screen_spearman_section_9_5(final):
    """Section 9.5: Spearman over the 8 shared cells d in {256..1024} x R in {6, 8}. Ranking by
    hand, each width's two cells swap places, so sum d_i^2 = 8 and rho = 1 - 6*8/(8*63)."""
    res = screen.screen_correlation(_cells(final, "stage1"), _cells(final, "stage2"))
    assert res.n == 8
    assert res.rho == pytest.approx(1 - 6 * 8 / (8 * 63))


def test_radius_band_and_monotone_rise_table8(res):
    """Section 6: rho settles in 0.79-0.83 and rises with d at every R and with R at every d."""
    tab = spectral.radius_table(res.runs, res.train_log, step=published.STAGE2_STEPS, where={"stage": "stage2"})
    assert tab.shape == (4, 3)
    lo, hi = spectral.radius_band(tab)
    assert (round(lo, 2), round(hi, 2)) == (0.79, 0.83)
    assert spectral.is_monotone(tab, along="d_model").all()
    assert spectral.is_monotone(tab, along="n_loops").all()
    assert not spectral.is_monotone(tab, along="d_model", increasing=False).any()
    # Stage 1 (Table 5, step 3,000) sat near 0.89, above every Stage-2 value
    s1 = spectral.radius_table(res.runs, res.train_log, where={"stage": "stage1"})
    assert spectral.radius_band(s1)[0] > hi


def test_residual_persistence_range(res):
    """Section 6: 0.79^6 ~ 0.24 at (256, 6) and 0.83^10 ~ 0.155 at (1024, 10): 76-85% discarded."""
    tab = spectral.radius_table(res.runs, res.train_log, step=published.STAGE2_STEPS, where={"stage": "stage2"})
    pers = spectral.persistence(tab)
    assert pers.loc[256, 6] == pytest.approx(0.79 ** 6) and round(pers.loc[256, 6], 2) == 0.24
    assert pers.loc[1024, 10] == pytest.approx(0.83 ** 10) and round(pers.loc[1024, 10], 3) == 0.155
    # "76-85% discarded": 1 - 0.243 and 1 - 0.155 (the paper rounds 84.5% up)
    assert abs((1 - pers.loc[256, 6]) - 0.76) < 0.005 and abs((1 - pers.loc[1024, 10]) - 0.85) < 0.006
    assert pers.min().min() == pytest.approx(0.799 ** 10)  # the full table spans more than the two corners
    assert spectral.persistence(0.83, 10) == pytest.approx(0.83 ** 10)
    with pytest.raises(ValueError, match="rho"):
        spectral.persistence(1.2, 6)


def test_chinchilla_ratios_section_4_4():
    """Section 4.4 / Table 2: tokens per stored and effective parameter at 1B tokens (Table 1)."""
    t1 = published.load_table("table1")
    params = t1.assign(stored_params=t1.stored_params_m * 1e6, effective_params=t1.effective_params_m * 1e6)
    got = accounting.chinchilla_table(params, tokens=1e9)
    t2 = published.load_table("table2")
    m = got.merge(t2, on=["d_model", "n_loops"])
    assert len(m) == 8
    assert (m["stored_ratio"].round() == m["stored_tokens_per_param"]).all()
    assert (m["effective_ratio"].round() == m["effective_tokens_per_param"]).all()
    assert (m["pct_chinchilla_effective_x"].round() == m["pct_chinchilla_effective_y"]).all()
    pct = got.set_index(["d_model", "n_loops"])["pct_chinchilla_effective"].round()
    assert [pct[(d, 6)] for d in (256, 512, 768, 1024)] == [278, 90, 48, 28]
    assert [round(r) for r in got.query("n_loops == 6")["stored_ratio"]] == [69, 24, 13, 8]
    assert [round(r) for r in got.query("n_loops == 6")["effective_ratio"]] == [56, 18, 10, 6]


def test_mfu_table4():
    """Section 4.6: Table 4's MFU equals 6 * N_eff * tokens/s / 71 TFLOPS to within a point."""
    t4 = published.load_table("table4")
    got = accounting.mfu(t4["tokens_per_s"].to_numpy(), params=t4["effective_params_m"].to_numpy() * 1e6)
    assert np.all(np.abs(got - t4["mfu"].to_numpy()) <= 0.01)
    assert accounting.mfu(32393, params=178.8e6) == pytest.approx(6 * 178.8e6 * 32393 / 71e12)
    assert accounting.mfu(1000, flops_per_token=71e9) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="exactly one"):
        accounting.mfu(1000, params=1e6, flops_per_token=6e6)


def test_one_peak_flops_table():
    """MFU's denominators come from one table (`cartlab.hardware`): the analysis's default is the
    paper's RTX 3090 entry (section 4.6), and device names resolve to their dense bf16 peak."""
    from cartlab import hardware

    assert accounting.RTX3090_BF16_PEAK_FLOPS == hardware.PEAK_FLOPS["NVIDIA GeForce RTX 3090"] == 71e12
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3") == hardware.peak_flops("NVIDIA H200") == 989e12
    assert hardware.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and hardware.peak_flops("x86_64") is None


def test_leverage_table1():
    t1 = published.load_table("table1")
    lev = accounting.leverage(t1["stored_params_m"].to_numpy(), t1["effective_params_m"].to_numpy())
    np.testing.assert_allclose(lev, t1["leverage"], atol=0.006)


def test_bits_per_byte():
    """Section 7.2: BPB = log2(ppl) * tokens_per_byte. A uniform model over 256 bytes scoring one
    byte per token has ppl 256 and 8 bits per byte."""
    assert accounting.bits_per_byte(256.0, 1.0) == pytest.approx(8.0)
    assert accounting.bits_per_byte(20.35, 0.25) == pytest.approx(math.log2(20.35) / 4)
    with pytest.raises(ValueError, match="tokens_per_byte"):
        accounting.bits_per_byte(20.0, 0.0)


def test_downstream_rows(res):
    """Tables 12-14 land in lm-eval units; the variable-R run is d=1024 trained at R=6."""
    d = res.downstream
    rid = published.run_id("stage2", "cart", 1024, prelude_layers=6, n_loops=6)
    lam = d[(d.run_id == rid) & (d.task == "lambada_openai") & (d.metric == "perplexity") & (d.num_fewshot == 0)]
    assert sorted(lam["n_loops"]) == [2, 4, 6, 8, 10, 12, 14, 16]
    best = lam.loc[lam["value"].idxmin()]
    assert best["n_loops"] == 6 and best["value"] == pytest.approx(163.7)  # section 7.4: trained R is best
    acc = d[(d.metric == "acc")]["value"]
    assert acc.between(0, 1).all()
    five = d[(d.num_fewshot == 5) & (d.task == "lambada_openai") & (d.metric == "perplexity")]
    assert five["value"].tolist() == [pytest.approx(366.3)]
