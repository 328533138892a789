"""LRT (Latent Recurrent Transformer, 2026) as hooks on the Dense model: `lrt_kv`, `lrt_residual`.

Guards, for each hook combination ({lrt_kv}, {lrt_residual}, both), with shared and unshared
memory projections:
1. cached decoding (prefill, a chunk, then one token at a time) and the eval forward equal a slow
   reference that runs the recurrence token by token with no cache;
2. the interleaved training forward approaches that recurrence as S grows (and is exact on the
   first S positions, and everywhere at S = T);
3. every forward is causal (the same check as CART's variants);
4. gradients reach the memory, through the interleaved buffer;
and, once: an untrained `lrt_residual` model equals its Dense backbone; plain Dense configs
serialise as before; bad memory configs fail with one line naming the field; `cartlab model
info` prints the shared projection's overhead (< 1% at d=512); the accounting's 2x training
cost; variable-length prompts through `generate` and lm-eval's right-padded batches.
Run: pytest tests/test_model_lrt.py
"""
import re

import pytest
from conftest import need
import torch
import torch.nn.functional as F

from cartlab.model import (LRT, ConfigError, DenseConfig, KVCache, LMConfig, LRTConfig, account, build_model,
                           exact_reference, memory_overhead)
from cartlab.model.config import model_overrides
from test_model_variants import cached_logits, causal_leak

HOOKS = [("lrt_kv",), ("lrt_residual",), ("lrt_kv", "lrt_residual")]
COMBOS = [(h, shared) for h in HOOKS for shared in (True, False)]
IDS = [f"{'+'.join(h)}-{'shared' if s else 'unshared'}" for h, s in COMBOS]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


def lively(hooks, shared=True, seed=0, n_layers=3, scale=3.0, **kw):
    """A tiny LRT whose memory matters: at init the residual gain is 0 and attention is nearly
    uniform, so the memory barely moves the logits and every comparison would pass trivially.
    Backbone matrices are scaled up, the memory projection maps to unit scale, gains are 1."""
    torch.manual_seed(seed)
    model = build_model(LRTConfig.tiny(hooks=hooks, memory_shared=shared, n_layers=n_layers, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(("wte", "memory")):
                p.mul_(scale)
        for read in model.memory.read:
            read.proj.weight.normal_(0.0, model.config.d_model ** -0.5)
        if model.memory.gain is not None:
            model.memory.gain.fill_(1.0)
    return model.eval()


def tokens(T, B=2, seed=2):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


# -- configs -------------------------------------------------------------------------------------------------
def test_plain_dense_configs_serialise_as_before():
    """No new field appears in a plain Dense config's dict, so run names and hashes keep."""
    assert DenseConfig().to_dict() == {
        "kind": "dense", "vocab_size": 32000, "d_model": 1024, "n_heads": 16, "ffn_multiple_of": 256,
        "rope_theta": 10000.0, "norm_eps": 1e-05, "init_std": 0.02, "n_layers": 12}
    assert DenseConfig.tiny(hooks=()).to_dict() == DenseConfig.tiny().to_dict()
    assert not hasattr(build_model(DenseConfig.tiny()), "memory")  # plain Dense carries no memory plumbing


def test_hooks_set_the_memory_fields_and_the_config_rebuilds_the_model():
    cfg = LRTConfig.tiny(n_layers=6, hooks=("lrt_residual", "lrt_kv"))
    assert cfg.hooks == ("lrt_kv", "lrt_residual")  # registration order
    assert cfg.memory_kv and cfg.memory_residual and cfg.memory_shared and cfg.memory_subsets == 4
    assert cfg.memory_source_layer == 4 and cfg.memory_injection_layers == (0, 1, 2, 3, 4)
    assert model_overrides(cfg) == {}  # everything comes from the hooks
    assert model_overrides(cfg.replace(memory_subsets=8)) == {"memory_subsets": 8}
    again = LMConfig.from_dict(cfg.to_dict())
    assert again == cfg
    torch.manual_seed(0)
    model = build_model(cfg)
    build_model(again).load_state_dict(model.state_dict())  # strict: same modules, same shapes
    one = LRTConfig.tiny(n_layers=1, hooks=("lrt_kv",))
    assert one.memory_source_layer == 0 and one.memory_injection_layers == (0,)
    picked = LRTConfig.tiny(n_layers=4, hooks=("lrt_kv",), memory_source=3, memory_layers=[2, 0])
    assert picked.memory_layers == (0, 2) and picked.memory_injection_layers == (0, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hooks=("lrt_kv",), memory_source=3), r"^memory_source=3 is not allowed: it must be a layer index in 0\.\.2 \(n_layers=3\)$"),
    (dict(hooks=("lrt_kv",), memory_source=-1), r"^memory_source=-1 is not allowed: must be >= 0, or null for the second-to-last layer"),
    (dict(hooks=("lrt_kv",), memory_layers=[0, 3]), r"^memory_layers=\[0, 3\] is not allowed: \[3\] out of range; each entry must be a layer index in 0\.\.2"),
    (dict(hooks=("lrt_kv",), memory_layers=[1, 1]), r"^memory_layers=\[1, 1\] is not allowed: names a layer twice"),
    (dict(hooks=("lrt_kv",), memory_layers=[]), r"^memory_layers=\[\] is not allowed: name at least one injection layer"),
    (dict(hooks=("lrt_kv",), memory_subsets=0), r"^memory_subsets=0 is not allowed: must be >= 1$"),
    (dict(hooks=("lrt_kv",), memory_shared="yes"), r"^memory_shared='yes' is not allowed: must be true or false$"),
    (dict(hooks=()), r"^hooks=\[\] is not allowed: an LRTConfig needs lrt_kv and/or lrt_residual, or lrt_paper; a Dense model without memory is a DenseConfig$"),
    # the memory fields without a hook would build, but read back as a Dense with unknown fields
    (dict(hooks=(), memory_kv=True), r"^hooks=\[\] is not allowed: an LRTConfig needs lrt_kv and/or lrt_residual, or lrt_paper"),
    (dict(hooks=(), memory_residual=True, memory_kv_feedback=True), r"^hooks=\[\] is not allowed: an LRTConfig needs lrt_kv"),
    (dict(hooks=("lrt_kv", "lrt_kv")), r"^hooks=\['lrt_kv', 'lrt_kv'\] is not allowed: names a hook twice"),
    (dict(hooks=("no_lti",)), r"^hooks=\['no_lti'\] is not allowed: 'no_lti' is a hook of the cart family.*; lrt hooks: lrt_kv, lrt_residual, lrt_paper$"),
    (dict(hooks=("lrt_kv",), memory_kv_refresh=True), r"^memory_kv_refresh=true is not allowed: it re-mixes the gated K/V feedback of lrt_paper"),
    (dict(hooks=("lrt_kv",), memory_gamma=0.1), r"^memory_gamma=0\.1 is not allowed: it scales the residual injection; add the hook lrt_residual or lrt_paper$"),
    (dict(hooks=("lrt_paper",), memory_loss="all"), r"^memory_loss='all' is not allowed: .*refined.*all_passes"),
    (dict(hooks=("lrt_paper",), memory_read="final"), r"^memory_read='final' is not allowed: .*projection.*norm"),
    (dict(hooks=("lrt_paper",), memory_sweeps=0), r"^memory_sweeps=0 is not allowed: must be >= 1$"),
    (dict(hooks=("lrt",)), r"^hooks=\['lrt'\] is not allowed: unknown hook\(s\) \['lrt'\]; choose from lrt_kv, lrt_residual, lrt_paper$"),
])
def test_bad_memory_config_is_one_line_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        LRTConfig.tiny(**kwargs)
    assert "\n" not in str(err.value)


def test_lrt_is_its_own_family_stored_as_dense():
    """LRT hooks on a plain DenseConfig are refused in one line naming LRTConfig; a stored
    `kind: dense` dict with LRT hooks reads back as an LRTConfig and writes the same dict; a Dense
    dict with a memory field and no LRT hook is a Dense with an unknown field."""
    with pytest.raises(ConfigError, match=r"^hooks=\['lrt_kv'\] is not allowed: 'lrt_kv' is a hook of the lrt family.*; dense hooks: "
                                          r"none; use LRTConfig \(or kind 'dense' through LMConfig.from_dict\)$"):
        DenseConfig.tiny(hooks=("lrt_kv",))
    stored = {**DenseConfig.tiny().to_dict(), "hooks": ["lrt_kv"], "memory_kv": True, "memory_subsets": 2}
    cfg = LMConfig.from_dict(stored)
    assert type(cfg) is LRTConfig and cfg.to_dict() == stored and cfg.kind == "dense"
    assert type(DenseConfig.from_dict(stored)) is LRTConfig  # an LRTConfig is a DenseConfig
    assert type(build_model(cfg)) is LRT
    assert type(LMConfig.from_dict(DenseConfig.tiny().to_dict())) is DenseConfig
    with pytest.raises(ConfigError, match=r"memory_subsets is not a field"):
        LMConfig.from_dict({**DenseConfig.tiny().to_dict(), "memory_subsets": 8})


def test_lrt_hooks_are_refused_on_cart():
    from cartlab.model import CARTConfig

    with pytest.raises(ConfigError, match=r"^hooks=\['lrt_kv'\] is not allowed: 'lrt_kv' is a hook of the lrt family"):
        CARTConfig.tiny(hooks=("lrt_kv",))


# -- acceptance 1: cached decoding is the exact recurrence ----------------------------------------------------
@pytest.mark.parametrize("hooks, shared", COMBOS, ids=IDS)
def test_cached_decoding_equals_the_slow_reference(hooks, shared):
    model = lively(hooks, shared)
    idx = tokens(12)
    with torch.no_grad():
        reference = exact_reference(model, idx)
    torch.testing.assert_close(cached_logits(model, idx, prefix=4, chunk=3), reference, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference, atol=1e-5, rtol=1e-4)  # eval forward, no cache
    # one new token is one step: the cache holds m_{t-1} and one position of keys per layer
    cache = KVCache()
    with torch.no_grad():
        model(idx[:, :5], cache=cache)
        model(idx[:, 5:6], cache=cache)
    assert cache.pos == 6 and cache["layer.0"].length == 6 and cache.states["memory"].shape == (2, 1, 32)
    # with gradients on, the eval forward is still exact (and differentiable)
    torch.testing.assert_close(model(idx)[0].detach(), reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("hooks, shared", COMBOS[::2] + COMBOS[1:2], ids=IDS[::2] + IDS[1:2])
def test_generate_with_and_without_cache_and_variable_length_prompts(hooks, shared):
    model = lively(hooks, shared)
    for T in (1, 2, 6):
        prompt = tokens(T, seed=T)
        fast = model.generate(prompt, 6, temperature=0, use_cache=True)
        slow = model.generate(prompt, 6, temperature=0, use_cache=False)
        assert torch.equal(fast, slow) and fast.shape == (2, T + 6)
        with torch.no_grad():
            assert torch.equal(exact_reference(model, fast)[:, T - 1: -1].argmax(-1), fast[:, T:])


def test_lm_eval_right_padded_batches_equal_each_sequence_alone():
    need("lm_eval")
    from cartlab.eval.lm import CartlabLM

    class Bytes:
        eos_id = 0

        def encode(self, s):
            return [1 + b % 63 for b in s.encode()]

        def decode(self, ids):
            return "".join(chr(96 + i % 26) for i in ids)

    model = lively(("lrt_kv", "lrt_residual"))
    lm = CartlabLM(model=model, tokenizer=Bytes(), max_length=16, batch_size=3)
    requests = [(None, [5, 6, 7], [8, 9]), (None, [3], [4]), (None, [1, 2, 3, 4, 5, 6], [7, 8, 9])]
    for (_, ctx, cont), (score, _) in zip(requests, lm._loglikelihood_tokens(requests)):
        seq = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(exact_reference(model, seq[:, :-1])[0, -len(cont):], -1)
        assert score == pytest.approx(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
    assert len(lm.generate_until([type("R", (), {"args": ("abc", {"max_gen_toks": 4})})()])) == 1


def test_a_cache_without_memory_is_refused_and_subsets_need_lrt():
    dense, lrt = build_model(DenseConfig.tiny()).eval(), lively(("lrt_kv",))
    cache = KVCache()
    dense(tokens(4), cache=cache)
    with pytest.raises(ValueError, match="this cache holds 4 positions but no LRT memory"):
        lrt(tokens(1), cache=cache)
    with pytest.raises(TypeError, match="subsets"):  # the interleaved schedule is LRT's; Dense has no such argument
        dense(tokens(4), subsets=2)
    with pytest.raises(ValueError, match="subsets=0 is not allowed; it must be an integer >= 1"):
        lrt(tokens(4), subsets=0)


# -- acceptance 2: interleaved training approaches the recurrence ---------------------------------------------
@pytest.mark.parametrize("hooks, shared", COMBOS, ids=IDS)
def test_interleaved_training_approaches_the_exact_recurrence(hooks, shared):
    """Subset k of S reads m_{t-1} and the other positions' keys from the buffer; the first S
    positions only ever read refined states, so they are exact, and S = T is exact everywhere.
    From S = 2 on the mean gap shrinks as S doubles. (S = 1 is not on that curve: its single
    refinement sees every other position refined once, where S = 2 sees half of them stale.)"""
    T = 16
    model = lively(hooks, shared)
    idx = tokens(T)
    with torch.no_grad():
        reference = exact_reference(model, idx)
    gaps = {}
    with torch.no_grad():
        for S in (1, 2, 4, 8, 16, 40):
            gap = (model(idx, subsets=S)[0] - reference).abs()  # (B, T, V)
            assert gap[:, : min(S, T)].max() < 1e-5, f"S={S}: the first S positions must be exact"
            gaps[S] = gap.mean().item()
    assert gaps[2] > gaps[4] > gaps[8] > gaps[16], gaps
    assert gaps[8] > 1e-4 and gaps[16] < 1e-6 and gaps[40] < 1e-6, gaps
    model.train()  # the training forward uses memory_subsets (4)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], model(idx, subsets=4)[0])


# -- acceptance 4: causality -------------------------------------------------------------------------------------
@pytest.mark.parametrize("hooks, shared", COMBOS, ids=IDS)
def test_every_schedule_is_causal(hooks, shared):
    model = lively(hooks, shared)
    assert causal_leak(model) < 1e-5  # exact (eval) forward
    for S in (1, 3):
        model.memory.subsets = S
        assert causal_leak(model.train()) < 1e-5, f"interleaved S={S}"
    model.eval()

    class Cached(torch.nn.Module):
        def forward(self, idx):
            return cached_logits(model, idx, prefix=3, chunk=2), None

    assert causal_leak(Cached()) < 1e-5


# -- gradients, init, measured cost ------------------------------------------------------------------------------
@pytest.mark.parametrize("hooks, shared", COMBOS, ids=IDS)
def test_training_gradients_reach_the_memory(hooks, shared):
    model = lively(hooks, shared).train()
    idx = tokens(10)
    logits, loss = model(idx, idx.roll(-1, 1))
    assert logits.shape == (2, 10, 64) and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} received a zero gradient"
    assert {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("memory.")} == (
        {"read", "gain"} if "lrt_residual" in hooks else {"read"})
    assert model.diagnostics()["lrt_forward_cost"] > 1.0  # measured wall time / init pass


@pytest.mark.parametrize("hooks", HOOKS, ids="+".join)
def test_interleaved_gradients_at_S_equal_T_are_the_exact_recurrences(hooks):
    """Nothing in the buffer is detached: at S = T the training forward's gradient is the exact
    recurrence's gradient, memory-of-memory paths included (against autograd through the slow
    reference). Detaching the buffer's memories would drop those paths and fail this."""
    model = lively(hooks, n_layers=2).train()
    model.memory.subsets = 8
    idx, targets = tokens(8), tokens(8, seed=3)
    params = list(model.parameters())
    _, loss = model(idx, targets)
    fast = torch.autograd.grad(loss, params)
    slow = torch.autograd.grad(F.cross_entropy(exact_reference(model, idx).flatten(0, 1), targets.flatten()), params)
    for (name, _), a, b in zip(model.named_parameters(), fast, slow):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)


def test_untrained_residual_lrt_equals_its_dense_backbone():
    """The residual gain starts at zero and the memory is built after the backbone's init, so one
    seed gives the same backbone weights and the same logits, in every schedule. An lrt_kv slot
    takes attention mass from the start, except at position 0, which has no memory."""
    torch.manual_seed(0)
    dense = build_model(DenseConfig.tiny()).eval()
    idx = tokens(9)
    with torch.no_grad():
        expected = dense(idx)[0]
    for hooks in (("lrt_residual",), ("lrt_kv",), ("lrt_kv", "lrt_residual")):
        torch.manual_seed(0)
        lrt = build_model(LRTConfig.tiny(hooks=hooks, memory_shared=False)).eval()
        backbone = {k: v for k, v in lrt.state_dict().items() if not k.startswith("memory.")}
        assert all(torch.equal(v, dense.state_dict()[k]) for k, v in backbone.items())
        with torch.no_grad():
            for got in (lrt(idx)[0], lrt(idx, subsets=2)[0], cached_logits(lrt, idx)):
                if hooks == ("lrt_residual",):
                    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
                else:
                    torch.testing.assert_close(got[:, :1], expected[:, :1], atol=1e-6, rtol=1e-5)
                    assert (got[:, 1:] - expected[:, 1:]).abs().max() > 1e-6


# -- acceptance 3 and the accounting --------------------------------------------------------------------------
def test_model_info_prints_the_shared_overhead_under_one_percent_at_d512(capsys):
    from cartlab.cli import main

    assert main(["model", "info", "dense", "d_model=512", "n_layers=12", "--hooks", "lrt_kv,lrt_residual"]) == 0
    out = capsys.readouterr().out
    pct = float(re.search(r"LRT memory .*\(\+([0-9.]+)% parameters over the Dense backbone; shared", out).group(1))
    assert 0.1 < pct < 1.0, out
    assert re.search(r"training FLOPs x1\.\d\d the backbone's \(S=4\)", out), out
    assert main(["model", "info", "dense", "d_model=512", "n_layers=12", "--hooks", "lrt_kv,lrt_residual",
                 "memory_shared=false"]) == 0
    unshared = float(re.search(r"\(\+([0-9.]+)% parameters", capsys.readouterr().out).group(1))
    assert unshared > 1.0


def test_accounting_counts_the_memory_and_the_interleaved_training_pass():
    d, n_layers, T = 32, 4, 64
    base = account(DenseConfig.tiny(n_layers=n_layers), T)
    assert base.train_forward_flops == base.forward_flops
    for hooks in HOOKS:
        for shared in (True, False):
            cfg = LRTConfig.tiny(n_layers=n_layers, hooks=hooks, memory_shared=shared)
            acc, inj = account(cfg, T), len(cfg.memory_injection_layers)
            assert inj == 3 and cfg.memory_source_layer == 2
            proj = (d * d + d) * (1 if shared else inj)
            gains = inj * d if "lrt_residual" in hooks else 0
            assert acc.stored_params - base.stored_params == proj + gains == memory_overhead(cfg, T)["params"]
            memory = 2 * T * d * d * (1 if shared else inj)
            slots = inj * (2 * T * (2 * d * d) + 4 * T * d) if "lrt_kv" in hooks else 0
            assert acc.forward_flops == pytest.approx(base.forward_flops + memory + slots)
            assert acc.train_forward_flops == pytest.approx(acc.forward_flops + base.forward_flops)
            ratio = acc.train_flops_per_token(include_lm_head=False) / base.train_flops_per_token(include_lm_head=False)
            assert 2.0 < ratio < 2.5
            kv = inj * 2 * d * d if "lrt_kv" in hooks else 0  # K/V projections applied twice per token
            assert acc.effective_params == acc.stored_params + kv


def test_overrides_pick_the_lrt_family_whatever_their_order():
    """`memory_subsets` is an LRT field: named before the hook that makes the model LRT, it still
    lands on the LRT config (the family-selecting keys are applied first)."""
    base = {"kind": "dense", "vocab_size": 64, "d_model": 32, "n_heads": 4, "n_layers": 3, "ffn_multiple_of": 16}
    one = LMConfig.from_dict(base, ["memory_subsets=8", "hooks=lrt_kv"])
    other = LMConfig.from_dict(base, ["hooks=lrt_kv", "memory_subsets=8"])
    assert type(one) is LRTConfig and one == other and one.memory_subsets == 8
    with pytest.raises(ConfigError, match="memory_subsets is not a field"):
        LMConfig.from_dict(base, ["memory_subsets=8"])  # plain Dense has no memory
