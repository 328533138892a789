"""Variable-R inference (section 7.4), the per-loop trace, and the LTI gate's stability
guarantee (section 3.2: spectral radius < 1 by construction, in fp32 under bf16 autocast).
Run: pytest tests/test_model_inference.py
"""
import pytest
import torch

from cartlab.model import CARTConfig, build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(CARTConfig.tiny(n_loops=6)).eval()


def test_variable_R_from_1_to_16(model):
    idx = torch.randint(0, 64, (2, 9))
    outputs = []
    for R in range(1, 17):
        logits, _ = model(idx, n_loops=R)
        assert logits.shape == (2, 9, 64) and torch.isfinite(logits).all()
        trace = model.loop_trace(idx, n_loops=R)
        assert [row["loop"] for row in trace] == list(range(1, R + 1))
        assert all(row["state_norm"] > 0 and row["delta_norm"] > 0 for row in trace)
        outputs.append(logits)
    assert not torch.allclose(outputs[0], outputs[5])  # R changes the function
    torch.testing.assert_close(model(idx)[0], outputs[5])  # default is the trained R=6
    assert len(model.loop_trace(idx)) == 6


def test_bad_inference_R_is_refused(model):
    idx = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match=r"n_loops=0 is not allowed; it must be an integer >= 1"):
        model(idx, n_loops=0)
    unshared = build_model(CARTConfig.tiny(n_loops=3, hooks=("unshare_core",)))
    unshared(idx, n_loops=2)
    with pytest.raises(ValueError, match=r"n_loops=4 is not allowed for an unshared core with 3 blocks; allowed: 1..3"):
        unshared(idx, n_loops=4)


def test_spectral_radius_below_one_even_after_huge_step():
    torch.manual_seed(0)
    model = build_model(CARTConfig.tiny(gate_init=0.99))
    rho = model.spectral_radius()
    assert rho["max"] == pytest.approx(0.99, abs=1e-4) and rho["mean"] <= rho["max"] < 1
    opt = torch.optim.SGD(model.parameters(), lr=1e6)
    idx = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        model.gate.logit.grad.fill_(-1.0)  # push every channel's retention towards 1
        opt.step()
    assert model.gate.logit.min() > 100  # sigmoid is exactly 1.0 in fp32 here ...
    assert model.spectral_radius()["max"] < 1.0  # ... the radius still is not


def test_gate_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_model(CARTConfig.tiny())
    with torch.no_grad():
        model.gate.logit.copy_(torch.linspace(2.0, 9.0, model.gate.logit.numel()))  # A close to 1
    fp32 = model.gate.retention()
    x, u = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.gate.retention(), fp32)  # bf16 would round 0.9999 to 1.0
        assert torch.equal(model.gate(x, u), fp32 * x + u)
        logits, loss = model(torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 6)))
    assert torch.isfinite(loss)
    assert (fp32 < 1).all() and (fp32.bfloat16().float() == 1).any()  # the case bf16 gets wrong


def test_no_lti_reports_identity_radius():
    model = build_model(CARTConfig.tiny(hooks=("no_lti",)))
    assert model.spectral_radius() == {"max": 1.0, "mean": 1.0}


def test_decoding_head_copy_follows_in_place_weight_updates():
    """KVCache.head_t (the transposed LM head used for CPU decoding) is remade when the tied
    embedding changes in place, e.g. by an optimiser step between two generations on one cache."""
    from cartlab.model import KVCache

    model = build_model(CARTConfig.tiny()).eval()
    cache = KVCache()
    first = cache.head_t(model.lm_head.weight)
    assert torch.equal(first, model.wte.weight.t()) and cache.head_t(model.lm_head.weight) is first
    with torch.no_grad():
        model.wte.weight.mul_(2.0)
    assert torch.equal(cache.head_t(model.lm_head.weight), model.wte.weight.t())
