"""Parameter and FLOP accounting against the paper's Tables 1 and 3 (read from data/paper/).

Guards: stored parameters within 1% of Table 1 at every width, effective parameters at R=6
within 1%, Dense 7L/17L and all five forward-GFLOP rows of Table 3 within 2%, and the matched
Dense helper. Run: pytest tests/test_model_accounting.py
"""
import csv

import pytest

from cartlab.model import CARTConfig, ConfigError, DenseConfig, account, matched_dense


def rows(paper_dir, name):
    with open(paper_dir / name) as f:
        return list(csv.DictReader(f))


def rel(a, b):
    return abs(a - b) / abs(b)


def test_stored_params_match_table1_at_every_width(paper_dir):
    for row in rows(paper_dir, "table1_params.csv"):
        cfg = CARTConfig.paper(d_model=int(row["d_model"]), n_loops=int(row["n_loops"]),
                               prelude_layers=int(row["prelude_layers"]))
        assert rel(account(cfg).stored_params / 1e6, float(row["stored_params_m"])) < 0.01, row


def test_effective_params_match_table1_at_R6(paper_dir):
    r6 = [r for r in rows(paper_dir, "table1_params.csv") if r["n_loops"] == "6"]
    assert {int(r["d_model"]) for r in r6} == {256, 512, 768, 1024}
    for row in r6:
        acc = account(CARTConfig.paper(d_model=int(row["d_model"]), n_loops=6))
        assert rel(acc.effective_params / 1e6, float(row["effective_params_m"])) < 0.01, row
        assert rel(acc.leverage, float(row["leverage"])) < 0.015, row


def test_effective_params_at_R10_hold_only_at_d1024(paper_dir):
    """The R=10 rows below d=1024 are not linear in R (see the accounting docstring)."""
    r10 = {int(r["d_model"]): float(r["effective_params_m"]) for r in rows(paper_dir, "table1_params.csv")
           if r["n_loops"] == "10"}
    assert rel(account(CARTConfig.paper(d_model=1024, n_loops=10)).effective_params / 1e6, r10[1024]) < 0.01
    assert rel(account(CARTConfig.paper(d_model=256, n_loops=10)).effective_params / 1e6, r10[256]) > 0.01


def test_table3_params_and_flops(paper_dir):
    for row in rows(paper_dir, "table3_flops.csv"):
        T = int(row["seq_len"])
        if row["model"] == "dense":
            cfg = DenseConfig(d_model=int(row["d_model"]), n_layers=int(row["n_layers"]))
        else:
            cfg = CARTConfig.paper(d_model=int(row["d_model"]), n_loops=int(row["n_loops"]),
                                   prelude_layers=int(row["prelude_layers"]))
        acc = account(cfg, seq_len=T)
        assert rel(acc.forward_flops / 1e9, float(row["forward_gflops_per_sequence"])) < 0.02, row
        assert rel(acc.stored_params / 1e6, float(row["stored_params_m"])) < 0.02, row
        assert abs(acc.effective_layers - float(row["effective_layers"])) < 0.1, row


def test_effective_params_count_core_applications_and_unfrozen_kv():
    base = CARTConfig.tiny(n_loops=4)
    acc = account(base)
    from cartlab.model.accounting import build_meta

    model = build_meta(base)
    core = sum(p.numel() for p in model.core.parameters())
    loop_parts = sum(p.numel() for m in (model.mixer, model.loop_embedding, model.gate) for p in m.parameters())
    assert acc.effective_params == acc.stored_params + 3 * (core + loop_parts)

    unfrozen = account(CARTConfig.tiny(n_loops=4, hooks=("unfreeze_kv",)))
    kv = sum(p.numel() for p in model.anchor.parameters())
    assert unfrozen.stored_params == acc.stored_params  # no new parameters (section 8.1)
    assert unfrozen.effective_params == acc.effective_params + 3 * kv
    assert unfrozen.forward_flops > acc.forward_flops

    unshared = account(CARTConfig.tiny(n_loops=4, hooks=("unshare_core",)))
    assert unshared.stored_params == acc.stored_params + 3 * core
    assert unshared.effective_params == acc.effective_params  # same compute, no leverage


def test_matched_dense_at_paper_corner():
    cfg = CARTConfig.paper(d_model=1024, n_loops=6)
    assert matched_dense(cfg, on="stored").n_layers == 7  # the paper's Dense 7L
    assert matched_dense(cfg, on="effective").n_layers == 12  # the paper's Dense 12L: at least CART's 178.8M
    assert matched_dense(cfg, on="effective", rounding="nearest").n_layers == 11  # 174.0M
    assert matched_dense(cfg, on="flops").n_layers == 12  # 355 GFLOPs = 11.6 Dense layers
    assert matched_dense(CARTConfig.paper(d_model=1024, n_loops=10), on="flops").n_layers == 15
    with pytest.raises(ConfigError, match=r"on='params'.*\['stored', 'effective', 'flops'\]"):
        matched_dense(cfg, on="params")


def test_a_step_r_for_a_model_without_loops_is_refused():
    acc = account(DenseConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=256))
    assert acc.train_flops_per_token(n_loops=None) == acc.train_flops_per_token()
    with pytest.raises(ValueError, match="n_loops=4 is not allowed: this model has no loops"):
        acc.train_flops_per_token(n_loops=4)
