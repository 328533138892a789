"""Padding masks (issue 29 acceptance 1, cartlab side): left-padded batched generation of 4
prompts of different lengths equals unbatched generation token for token, for CART at every
loop count 1..2R and under hooks that change where the core's K, V come from, for Dense, and for
LRT under each injection path (its memory skips the pads); logits of real positions equal the
unpadded forward (and are finite everywhere); no later token changes an earlier logit.
Run: pytest tests/test_padding.py
"""
import pytest
import torch
from test_lrt_paper import lively_paper
from test_model_lrt import lively

from cartlab.model import CARTConfig, DenseConfig, KVCache, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread

LENGTHS = (5, 2, 7, 4)  # prompt lengths of the batch (the longest is unpadded)


def prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (n,), generator=g) for n in LENGTHS]


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, T) batch of rows left-padded with token 0, and its attention mask (B, T)."""
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return idx, mask


def make(cfg):
    torch.manual_seed(0)
    return build_model(cfg).double().eval()


def assert_batched_equals_single(model, new_tokens=6, use_cache=True, **kw):
    rows = prompts()
    idx, mask = left_pad(rows)
    out = model.generate(idx, new_tokens, temperature=0, attention_mask=mask, use_cache=use_cache, **kw)
    for i, r in enumerate(rows):
        single = model.generate(r[None], new_tokens, temperature=0, use_cache=use_cache, **kw)
        assert torch.equal(out[i, -new_tokens:], single[0, -new_tokens:]), f"row {i} (length {len(r)})"


def assert_real_logits_equal(model, **kw):
    rows = prompts()
    idx, mask = left_pad(rows)
    with torch.no_grad():
        batched = model(idx, attention_mask=mask, **kw)[0]  # (B, T, V)
        for i, r in enumerate(rows):
            single = model(r[None], **kw)[0][0]  # (n, V)
            torch.testing.assert_close(batched[i, -len(r):], single, atol=1e-5, rtol=0)
    assert torch.isfinite(batched).all()  # the pads' logits too: nothing they feed turns NaN


CART_HOOKS = [(), ("unfreeze_kv",), ("self_attn_core",), ("unshare_core", "no_hyper")]


@pytest.mark.parametrize("hooks", CART_HOOKS, ids=lambda c: "+".join(c) or "paper")
def test_cart_batched_generation_equals_single_at_every_loop_count(hooks):
    R = 2
    model = make(CARTConfig.tiny(n_loops=R, init_std=0.1, hooks=hooks))
    for n_loops in range(1, (R if "unshare_core" in hooks else 2 * R) + 1):
        assert_real_logits_equal(model, n_loops=n_loops)
        assert_batched_equals_single(model, n_loops=n_loops)


def test_dense_batched_generation_equals_single_cached_and_uncached():
    model = make(DenseConfig.tiny(init_std=0.1))
    assert_real_logits_equal(model)
    assert_batched_equals_single(model)
    assert_batched_equals_single(model, use_cache=False)


def test_cart_uncached_batched_generation_and_exit_rule():
    model = make(CARTConfig.tiny(n_loops=3, init_std=0.1))
    assert_batched_equals_single(model, new_tokens=3, use_cache=False)
    assert_batched_equals_single(model, new_tokens=3, exit="kl", exit_threshold=1e-2)


LRT_HOOKS = [("lrt_kv", "lrt_residual"), ("lrt_kv",), ("lrt_residual",), ("lrt_paper",), ("lrt_paper", "kv_refresh")]
"""Each LRT injection path, and the published recipe with and without its K/V refresh."""


def make_lrt(hooks=("lrt_kv", "lrt_residual")):
    """A tiny float64 LRT whose memory matters (gains and gates away from their zero init);
    `kv_refresh` after lrt_paper sets memory_kv_refresh."""
    if hooks[0] == "lrt_paper":
        return lively_paper(memory_kv_refresh="kv_refresh" in hooks)
    return lively(hooks).double()


@pytest.mark.parametrize("hooks", LRT_HOOKS, ids="+".join)
def test_lrt_batched_generation_equals_single_cached_and_uncached(hooks):
    """A row's first real token reads no memory although a pad ran before it; the rest read their own."""
    model = make_lrt(hooks)
    assert_real_logits_equal(model)
    assert_batched_equals_single(model)
    assert_batched_equals_single(model, use_cache=False)


@pytest.mark.parametrize("hooks", [("lrt_kv", "lrt_residual"), ("lrt_paper",), ("lrt_paper", "kv_refresh")],
                         ids="+".join)
def test_lrt_eval_forward_with_gradients_pads_as_without(hooks):
    """With autograd the eval forward runs the interleaved schedule at S = T, which takes the mask
    too; the approximate schedule (S < T) refuses it in one line."""
    model = make_lrt(hooks)
    idx, mask = left_pad(prompts())
    real = mask.bool()
    with torch.no_grad():
        exact = model(idx, attention_mask=mask)[0]
    for kw in ({}, {"subsets": idx.size(1), "sweeps": 2}):
        logits = model(idx, attention_mask=mask, **kw)[0]
        assert logits.requires_grad and torch.isfinite(logits).all()
        torch.testing.assert_close(logits[real], exact[real], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"^attention_mask is not allowed with subsets=4 < T=7"):
        model(idx, attention_mask=mask, subsets=4)


@pytest.mark.parametrize("family", ["cart", "lrt"])
def test_a_later_token_never_changes_an_earlier_logit_under_padding(family):
    model = make(CARTConfig.tiny(n_loops=3, init_std=0.1)) if family == "cart" else make_lrt()
    idx, mask = left_pad(prompts())
    other = idx.clone()
    other[:, -1] = (other[:, -1] + 1) % 64
    with torch.no_grad():
        a = model(idx, attention_mask=mask)[0]
        b = model(other, attention_mask=mask)[0]
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


@pytest.mark.parametrize("family", ["cart", "lrt"])
def test_cached_prefill_then_tokens_keep_the_mask(family):
    """A padded prefill, then one token at a time through the cache, equals the padded full forward."""
    model = make(CARTConfig.tiny(n_loops=2, init_std=0.1, hooks=("unfreeze_kv",))) if family == "cart" else make_lrt()
    idx, mask = left_pad(prompts())
    cache = KVCache()
    with torch.no_grad():
        full = model(idx, attention_mask=mask)[0]
        parts = [model(idx[:, :4], cache=cache, attention_mask=mask[:, :4])[0]]
        parts += [model(idx[:, j: j + 1], cache=cache, attention_mask=mask[:, j: j + 1])[0] for j in range(4, idx.size(1))]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, dim=1)[real], full[real], atol=1e-5, rtol=0)  # rotary runs in fp32


@pytest.mark.parametrize("family", ["dense", "lrt"])
def test_a_mask_of_the_wrong_shape_is_refused(family):
    model = make(DenseConfig.tiny()) if family == "dense" else make_lrt()
    for grad in (True, False):  # LRT: the interleaved schedule, then the sequential one
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=r"^attention_mask has shape \(2, 4\); "
                                                                          r"allowed: \(B, T\) = \(2, 5\)"):
            model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
