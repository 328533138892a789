"""Per-token exit rules (`cartlab.model.exits`, issue 27 acceptance 1): KV-cached decoding with
exits equals the uncached forward with the same exits on random combinations of the paper's
ablation hooks; exit='fixed' is today's forward bit for bit; bad rules and thresholds are refused.
Run: pytest tests/test_exits.py
"""
import itertools
import random

import pytest
import torch

from cartlab.model import PAPER_ABLATIONS, CARTConfig, ConfigError, KVCache, build_model
from cartlab.model.exits import EXITS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread

THRESHOLDS = {  # candidates, tried in order until loop counts differ between tokens
    "kl": (1e-2, 3e-3, 3e-2), "entropy": (3.8, 3.7, 3.9, 3.5), "latent": (0.2, 0.3, 0.4, 0.15),
    "argmax": (3, 2, 4), "learned": (0.5, 0.45, 0.55, 0.4, 0.6),
}


def combos(n=6, seed=0):
    """`n` random hook combinations of the paper ablations (refused ones skipped), plus none."""
    rng = random.Random(seed)
    allc = [c for k in range(len(PAPER_ABLATIONS) + 1) for c in itertools.combinations(PAPER_ABLATIONS, k)]
    ok = [c for c in allc if not {"unfreeze_kv", "self_attn_core"} <= set(c) and "single_loop" not in c]
    return [()] + rng.sample(ok, n)


def make(hooks, **kw):
    torch.manual_seed(0)
    return build_model(CARTConfig.tiny(n_loops=5, init_std=0.1, hooks=hooks, **kw)).eval()


def cached(model, idx, prefix=4, chunk=3, **kw):
    """Logits and loop counts of idx through one KVCache: a prefill, a chunk, then one token at a time."""
    cache = KVCache()
    with torch.no_grad():
        parts = [model(idx[:, :prefix], cache=cache, **kw)[0], model(idx[:, prefix: prefix + chunk], cache=cache, **kw)[0]]
        for j in range(prefix + chunk, idx.size(1)):
            parts.append(model(idx[:, j: j + 1], cache=cache, **kw)[0])
    return torch.cat(parts, dim=1), cache.states["loops"]


def varied_threshold(model, idx, rule):
    """A threshold of `rule` under which not every token runs the same number of loops."""
    for t in THRESHOLDS[rule]:
        with torch.no_grad():
            model(idx, exit=rule, exit_threshold=t)
        if model.loops_per_token.min() < model.loops_per_token.max():
            return t
    pytest.fail(f"no candidate threshold of {rule} makes loop counts differ")


@pytest.mark.parametrize("hooks", combos(), ids=lambda c: "+".join(c) or "paper")
def test_cached_decoding_equals_uncached_forward_with_the_same_exits(hooks):
    model = make(hooks)
    idx = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    for rule in ("kl", "entropy", "latent", "argmax"):
        t = varied_threshold(model, idx, rule)
        with torch.no_grad():
            full, _ = model(idx, exit=rule, exit_threshold=t)
        loops = model.loops_per_token
        step, step_loops = cached(model, idx, exit=rule, exit_threshold=t)
        assert (step - full).abs().max().item() <= 1e-5, (rule, t)
        assert torch.equal(step_loops, loops), rule
        assert 1 <= loops.min() and loops.max() <= 5


@pytest.mark.parametrize("hooks", combos(3, seed=1), ids=lambda c: "+".join(c) or "paper")
def test_fixed_exit_is_todays_forward_bit_for_bit(hooks):
    model = make(hooks)
    idx = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        today, _ = model(idx)
        fixed, _ = model(idx, exit="fixed")
        assert torch.equal(today, fixed)
        assert torch.equal(model.loops_per_token, torch.full((2, 9), 5))
        assert torch.equal(cached(model, idx)[1], torch.full((2, 9), 5))


def test_generate_with_exits_cached_equals_uncached():
    model = make(())
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(exit="latent", exit_threshold=varied_threshold(model, prompt, "latent"))
    fast = model.generate(prompt, 8, temperature=0, use_cache=True, **kw)
    slow = model.generate(prompt, 8, temperature=0, use_cache=False, **kw)
    assert torch.equal(fast, slow)


def test_a_stopped_token_keeps_the_state_of_its_last_loop():
    """With the frozen anchor a token's trajectory is its own: its final state is the plain
    loop's state after as many loops as it ran."""
    model = make(())
    idx = torch.randint(0, 64, (1, 10))
    states = []
    with torch.no_grad():
        e, rope = model.encode(idx)
        model.recur(e, rope, observe=lambda r, h, prev: states.append(h))
        h = model.recur(e, rope, halt=EXITS["latent"](varied_threshold(model, idx, "latent")))
    loops = model.loops_per_token[0]
    assert loops.min() < loops.max()
    for t, k in enumerate(loops.tolist()):
        torch.testing.assert_close(h[0, t], states[k - 1][0, t], rtol=0, atol=1e-6)


def test_bad_exit_rules_are_refused():
    model = make(())
    idx = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match=r"exit='halt' is not allowed; choose one of fixed, kl"):
        model(idx, exit="halt")
    with pytest.raises(ValueError, match=r"exit_threshold=-1 is not allowed for exit='kl': it must be a finite"):
        model(idx, exit="kl", exit_threshold=-1)
    with pytest.raises(ValueError, match=r"exit_threshold=1.5 is not allowed for exit='argmax'.*integer >= 1"):
        model(idx, exit="argmax", exit_threshold=1.5)
    with pytest.raises(ValueError, match=r"exit_threshold=0.1 is not allowed without an exit rule"):
        model(idx, exit_threshold=0.1)
    with pytest.raises(ValueError, match=r"exit='learned' needs a model with an exit head \(hook exit_head\)"):
        model(idx, exit="learned")
    solver = build_model(CARTConfig.tiny(hooks=("fixed_point",)))
    with pytest.raises(ValueError, match=r"exit='kl' is not allowed in fixed-point mode"):
        solver(idx, exit="kl")


def test_learned_exit_cached_equals_uncached_on_random_hooks():
    for hooks in combos(3, seed=2):
        model = make(hooks + ("exit_head",))
        idx = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
        t = varied_threshold(model, idx, "learned")
        with torch.no_grad():
            full, _ = model(idx, exit="learned", exit_threshold=t)
        loops = model.loops_per_token
        step, step_loops = cached(model, idx, exit="learned", exit_threshold=t)
        assert (step - full).abs().max().item() <= 1e-5 and torch.equal(step_loops, loops), hooks


def test_settled_target_is_top1_unchanged_at_every_later_loop():
    from cartlab.model.exits import settled

    class Lens(torch.nn.Module):  # the head reads the state's first 3 channels as logits
        norm = torch.nn.Identity()

        def lm_head(self, h):
            return h[..., :3]

    tops = [[0, 1, 2, 0], [1, 1, 2, 2], [2, 1, 2, 2]]  # (R=3, T=4): top-1 of each loop, per token
    states = [torch.nn.functional.one_hot(torch.tensor([row]), 3).float() for row in tops]  # (1, T, 3) each
    assert settled(Lens(), states)[:, 0].tolist() == [[0, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]]


def test_exit_head_trains_the_head_only_and_learns_its_target():
    model = make(("exit_head",)).train()
    plain = make(()).train()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("exit_head.")})
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    _, with_head = model(idx, idx)
    _, without = plain(idx, idx)
    assert with_head > without and model.aux_loss is not None
    with_head.backward()
    without.backward()
    lm = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if not name.startswith("exit_head."):
            assert torch.equal(p.grad, lm[name].grad), name
    opt = torch.optim.Adam(model.exit_head.parameters(), lr=3e-2)
    first = model.aux_loss.item()
    for _ in range(30):
        opt.zero_grad()
        model(idx, idx)
        model.aux_loss.backward()
        opt.step()
    assert model.aux_loss.item() < 0.7 * first


def test_bad_exit_head_settings_are_refused():
    with pytest.raises(ConfigError, match=r"exit_head=true .*the hook exit_head: add it"):
        CARTConfig.tiny(exit_head=True)
    with pytest.raises(ConfigError, match=r"exit_loss_weight=0.5 .*add the hook exit_head"):
        CARTConfig.tiny(exit_loss_weight=0.5)
    with pytest.raises(ConfigError, match=r"'fixed_point' and 'exit_head' cannot be combined: fixed_point sets "
                                          r"solver='anderson' and exit_head sets exit_head=true: the exit head learns"):
        CARTConfig.tiny(hooks=("fixed_point", "exit_head"))
    assert "exit_head" not in CARTConfig.tiny().to_dict()
