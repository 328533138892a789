"""The probes inside CART's loop (cartlab.model.probes, issue 15): the logit lens and the loop
map's contraction.

Guards: the Krylov power-iteration estimate of the per-token loop Jacobian's spectral radius and
norm equals what `torch.autograd.functional.jacobian` + `torch.linalg.eigvals` give on the explicit
matrix, for CART and the hook combinations that change the loop step; the per-token blocks carry the
whole spectrum of the loop step; the map that is differentiated is the forward pass's own; the lens
at the last loop is the model's own logits bit for bit, has one row at R=1, and works for every
combination of the paper's ablations; norm >= radius; a seed makes the estimate deterministic;
Dense models are refused. Run: pytest tests/test_model_probes.py (about 10 s).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cartlab.model import PAPER_ABLATIONS, CARTConfig, DenseConfig, build_model
from cartlab.model.probes import logit_lens, loop_contraction, loop_maps, mean_settle_loop

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


LOOP_HOOKS = [(), ("no_lti",), ("no_hyper",), ("no_lie",), ("unshare_core",), ("unfreeze_kv",), ("self_attn_core",),
              ("unfreeze_kv", "noncausal_cross_attn"), ("no_lti", "no_hyper", "unshare_core")]


def spread_model(hooks=(), d_model=32, n_loops=3, scale=3.0, seed=0):
    """A tiny CART whose loop Jacobian has a spread-out spectrum (at init it is ~0.9 I, a cluster
    every estimate gets right): per-channel gates drawn over (0, 1), core weights scaled up."""
    torch.manual_seed(seed)
    model = build_model(CARTConfig.tiny(hooks=hooks, d_model=d_model, n_loops=n_loops)).eval()
    with torch.no_grad():
        if hasattr(model.gate, "logit"):
            model.gate.logit.normal_(0.0, 2.0)
        for p in model.core.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def explicit_block(model, idx, r, b, t):
    """d h_{r+1}[b, t] / d h_r[b, t] as a d x d matrix, history held fixed."""
    h, f = loop_maps(model, idx)[r]

    def at_token(x):
        H = h.clone()
        H[b, t] = x
        return f(H)[b, t]

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.jacobian(at_token, h[b, t].clone()).double()


# -- acceptance 1: the estimate against the explicit Jacobian -------------------------------------------------
@pytest.mark.parametrize("hooks", LOOP_HOOKS, ids=lambda h: "+".join(h) or "cart")
def test_power_iteration_matches_the_explicit_jacobian(hooks):
    model = spread_model(hooks)
    idx = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    rows = loop_contraction(model, idx, n_tokens=4, n_iter=24, tol=0.0, per_token=True)  # 24 < d = 32
    assert [row["loop"] for row in rows] == [1, 2, 3]
    for r, row in enumerate(rows):
        for k, (b, t) in enumerate(row["tokens"].tolist()):
            J = explicit_block(model, idx, r, b, t)
            rho = torch.linalg.eigvals(J).abs().max().item()
            norm = torch.linalg.matrix_norm(J, ord=2).item()
            assert row["radius"][k].item() == pytest.approx(rho, rel=2e-3), (r, b, t)
            assert row["norm"][k].item() == pytest.approx(norm, rel=1e-4), (r, b, t)
            assert row["norm"][k] >= row["radius"][k] * (1 - 1e-6)
        assert row["radius_max"] == row["radius"].max().item()
        assert row["norm_mean"] == pytest.approx(row["norm"].mean().item())


@pytest.mark.parametrize("hooks", [(), ("unfreeze_kv",), ("self_attn_core",)], ids=lambda h: "+".join(h) or "cart")
def test_the_loop_steps_whole_spectrum_is_the_union_of_the_per_token_blocks(hooks):
    """The claim the estimate rests on: over all positions the Jacobian is block diagonal (frozen
    anchor) or block lower triangular (causal state-dependent K, V), so its eigenvalues are those of
    the diagonal blocks."""
    model = spread_model(hooks)
    idx = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(2))
    h, f = loop_maps(model, idx)[1]
    with sdpa_kernel(SDPBackend.MATH):
        full = torch.autograd.functional.jacobian(f, h).reshape(4 * 32, 4 * 32).double()  # (T d, T d)
    blocks = [full[t * 32:(t + 1) * 32, s * 32:(s + 1) * 32] for t in range(4) for s in range(4) if s > t]
    assert all(torch.count_nonzero(blk) == 0 for blk in blocks)  # nothing reads a later position
    diagonal = torch.cat([torch.linalg.eigvals(full[t * 32:(t + 1) * 32, t * 32:(t + 1) * 32]) for t in range(4)])
    whole = torch.linalg.eigvals(full)
    assert whole.abs().max().item() == pytest.approx(diagonal.abs().max().item(), rel=1e-9)
    rows = loop_contraction(model, idx, n_tokens=4, n_iter=32, tol=0.0)
    assert rows[1]["radius_max"] == pytest.approx(whole.abs().max().item(), rel=1e-5)
    assert rows[1]["cross_token"] == (hooks != ())


@pytest.mark.parametrize("hooks", LOOP_HOOKS, ids=lambda h: "+".join(h) or "cart")
def test_the_map_differentiated_is_the_forward_passs_own_step(hooks):
    model = spread_model(hooks, scale=1.0)
    idx = torch.randint(0, 64, (2, 7))
    seen = []
    with torch.no_grad():
        e, rope = model.encode(idx)
        last = model.recur(e, rope, observe=lambda r, h, prev: seen.append((prev, h)))
        maps = loop_maps(model, idx)
        for (h_in, f), (prev, h_out) in zip(maps, seen):
            assert torch.equal(h_in, prev) and torch.equal(f(h_in), h_out)
    assert torch.equal(f(h_in), last)


def test_the_gate_radius_sits_next_to_the_loop_radius():
    model = spread_model()
    idx = torch.randint(0, 64, (2, 6))
    rows = loop_contraction(model, idx, n_tokens=6, n_iter=8)
    assert {row["gate_radius"] for row in rows} == {model.spectral_radius()["max"]}
    assert all(1 <= row["iters"] <= 8 for row in rows)
    plain = spread_model(("no_lti",))
    assert {row["gate_radius"] for row in loop_contraction(plain, idx, n_tokens=2, n_iter=4)} == {1.0}


def test_norm_is_at_least_the_radius_at_the_default_settings():
    model = spread_model(d_model=64, n_loops=2, scale=2.0)
    rows = loop_contraction(model, torch.randint(0, 64, (2, 16)), n_tokens=16, per_token=True)
    for row in rows:
        assert (row["norm"] >= row["radius"] * (1 - 1e-3)).all()
        assert row["norm_max"] >= row["radius_max"] * (1 - 1e-3)


def test_a_seed_makes_the_estimate_deterministic():
    model = spread_model()
    idx = torch.randint(0, 64, (3, 10))
    a = loop_contraction(model, idx, n_tokens=5, n_iter=6, seed=7, per_token=True)
    b = loop_contraction(model, idx, n_tokens=5, n_iter=6, seed=7, per_token=True)
    c = loop_contraction(model, idx, n_tokens=5, n_iter=6, seed=8, per_token=True)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]) if torch.is_tensor(x[key]) else x[key] == y[key]
    assert not torch.equal(a[0]["tokens"], c[0]["tokens"])


# -- acceptance 2: the logit lens -------------------------------------------------------------------------------
def test_lens_at_the_last_loop_is_the_models_own_output_exactly():
    torch.manual_seed(0)
    model = build_model(CARTConfig.tiny(n_loops=4)).eval()
    idx, targets = torch.randint(0, 64, (2, 2, 9)).unbind(0)
    targets[0, :3] = -1  # ignored positions are ignored by both
    rows = logit_lens(model, idx, targets)
    with torch.no_grad():
        logits, loss = model(idx, targets)
    assert [row["loop"] for row in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] == loss.item()
    assert rows[-1]["kl_to_final"] == 0.0 and rows[-1]["top1_agree"] == 1.0 and rows[-1]["settled"] == 1.0
    # the lens decodes the last state by the same calls: the same logits bit for bit
    captured = []
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: captured.append(out))
    try:
        logit_lens(model, idx, targets)
    finally:
        handle.remove()
    assert len(captured) == 4 and torch.equal(captured[0], logits)  # loop R is decoded first


def test_lens_at_R1_has_one_row():
    torch.manual_seed(0)
    model = build_model(CARTConfig.tiny(n_loops=3)).eval()
    idx = torch.randint(0, 64, (2, 8))
    rows = logit_lens(model, idx, idx, n_loops=1)
    assert len(rows) == 1 and rows[0]["loop"] == 1
    with torch.no_grad():
        assert rows[0]["loss"] == model(idx, idx, n_loops=1)[1].item()
    single = build_model(CARTConfig.tiny(hooks=("single_loop",))).eval()
    assert len(logit_lens(single, idx)) == 1 and mean_settle_loop(logit_lens(single, idx)) == 1.0


def test_lens_columns_mean_what_they_say():
    """KL(p_R || p_r), top-1 agreement and the settle loop recomputed token by token."""
    model = spread_model(scale=1.0, n_loops=5)
    idx = torch.randint(0, 64, (3, 12))
    rows = logit_lens(model, idx)
    assert "loss" not in rows[0]
    states = []
    with torch.no_grad():
        e, rope = model.encode(idx)
        model.recur(e, rope, observe=lambda r, h, prev: states.append(h))
        logits = [model.head(model.coda(h, rope, None), None)[0].float() for h in states]
    final = logits[-1].log_softmax(-1)
    top1 = torch.stack([lg.argmax(-1) for lg in logits])  # (R, B, T)
    for r, row in enumerate(rows):
        kl = F.kl_div(logits[r].log_softmax(-1), final, log_target=True, reduction="none").sum(-1).mean()
        assert row["kl_to_final"] == pytest.approx(kl.item(), rel=1e-5, abs=1e-7)
        assert row["top1_agree"] == pytest.approx((top1[r] == top1[-1]).float().mean().item())
    settle = torch.full(top1.shape[1:], len(rows))
    for r in range(len(rows) - 1, -1, -1):
        same = (top1[r:] == top1[-1]).all(0)
        settle = torch.where(same, torch.full_like(settle, r + 1), settle)
    assert mean_settle_loop(rows) == pytest.approx(settle.float().mean().item())
    settled = [row["settled"] for row in rows]
    assert settled == sorted(settled) and all(row["settled"] <= row["top1_agree"] for row in rows)


def _paper_hook_sets():
    for n in range(len(PAPER_ABLATIONS) + 1):
        for hooks in itertools.combinations(PAPER_ABLATIONS, n):
            try:
                cfg = CARTConfig.tiny(hooks=hooks, n_loops=2)
            except ValueError:  # ConfigError
                continue  # refused combinations (unfreeze_kv with self_attn_core)
            yield cfg


def test_lens_and_contraction_work_for_every_combination_of_the_paper_ablations():
    idx = torch.randint(0, 64, (2, 6))
    n = 0
    for cfg in _paper_hook_sets():
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        R = cfg.n_loops
        rows = logit_lens(model, idx, idx)
        with torch.no_grad():
            assert rows[-1]["loss"] == model(idx, idx)[1].item(), cfg.hooks
        assert len(rows) == R and rows[-1]["kl_to_final"] == 0.0, cfg.hooks
        assert all(row["kl_to_final"] >= 0 for row in rows)
        contraction = loop_contraction(model, idx, n_tokens=2, n_iter=4)
        assert len(contraction) == R and all(row["radius_max"] > 0 for row in contraction), cfg.hooks
        n += 1
    assert n == 96  # 2^7 subsets minus the 32 that hold both unfreeze_kv and self_attn_core


def test_dense_models_have_no_loops_to_probe():
    dense = build_model(DenseConfig.tiny())
    idx = torch.randint(0, 64, (1, 4))
    for probe in (logit_lens, loop_contraction, loop_maps):
        with pytest.raises(ValueError, match="needs a CART model.*Dense, which has no loops"):
            probe(dense, idx)
