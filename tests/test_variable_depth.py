"""Variable-depth training (issue 14): the hooks `random_loops` (R drawn per optimiser step) and
`truncated_bptt` (gradient through the last k loops only).

Guards: the R sequence is a function of (seed, step) alone (same seed, same sequence; resume
continues it exactly; two gloo ranks draw the same R at every step), the draws follow the
configured distribution and `expected()` is its mean, truncated BPTT takes gradient from the
last k loops and no other, the accounting counts the expected R and the shorter backward, a
compiled loop body does not recompile per R, the hooks compose with every paper ablation, and
bad variable-depth fields are refused in one line. Run: pytest tests/test_variable_depth.py
"""
import itertools
import multiprocessing as mp
import os
import socket

import numpy as np
import pytest
import torch
from scipy import stats

from cartlab import results
from cartlab.model import PAPER_ABLATIONS, CARTConfig, ConfigError, account, build_model
from cartlab.train import train
from cartlab.train.device import Capabilities, compile_scope, compiled, select
from cartlab.train.loops import LoopSampler, idle_parameters
from train_helpers import SIGTERM, TINY_MODEL, tiny_config, train_and_signal

RANDOM = ("random_loops",)


def sampler(seed=0, **kw) -> LoopSampler:
    return LoopSampler(CARTConfig.tiny(**{"n_loops": 6, "hooks": RANDOM, **kw}), seed)


# -- the sampler ------------------------------------------------------------------------------------------
def test_same_seed_same_sequence_in_any_order_other_seed_differs():
    a, b = sampler(seed=3), sampler(seed=3)
    steps = list(range(300))
    seq = [a(s) for s in steps]
    assert seq == [b(s) for s in reversed(steps)][::-1]  # stateless: the order of the calls does not matter
    assert seq != [sampler(seed=4)(s) for s in steps]
    assert set(seq) <= set(a.support()) and len(set(seq)) > 4


def test_fixed_loops_draw_n_loops_always():
    s = LoopSampler(CARTConfig.tiny(n_loops=5), seed=1)
    assert not s.varies and {s(i) for i in range(50)} == {5}
    assert s.distribution() == {5: 1.0} and s.expected() == 5.0


@pytest.mark.parametrize("kw", [
    {},  # poisson_lognormal on 1..11, Huginn's sigma
    {"loops_sigma": 1.2, "loops_max": 30, "n_loops": 5},
    {"loops_min": 3, "loops_max": 8, "n_loops": 4},
    {"train_loops": "uniform", "n_loops": 4},
    {"train_loops": "uniform", "loops_min": 2, "loops_max": 9, "n_loops": 3},
], ids=["poisson", "poisson-wide", "poisson-clipped", "uniform", "uniform-range"])
def test_draws_follow_the_distribution_and_expected_is_their_mean(kw):
    s = sampler(seed=7, **kw)
    dist = s.distribution()
    assert list(dist) == list(s.support()) and abs(sum(dist.values()) - 1.0) < 1e-12
    n = 20_000
    draws = np.array([s(i) for i in range(n)])
    assert draws.min() >= s.low and draws.max() <= s.high
    p = np.array([dist[r] for r in s.support()])
    freq = np.bincount(draws - s.low, minlength=len(p)) / n
    assert np.abs(freq - p).max() < 5 * np.sqrt(0.25 / n)  # every R's frequency within 5 standard errors
    spread = np.sqrt(sum(q * (r - s.expected()) ** 2 for r, q in dist.items()))
    assert abs(draws.mean() - s.expected()) < 5 * spread / np.sqrt(n)


def test_poisson_lognormal_has_mean_n_loops_before_clipping_and_matches_a_poisson_at_small_sigma():
    # a range too wide to clip: the mean is n_loops, as the docstring says (Huginn's r_bar = n_loops - 1)
    assert abs(sampler(n_loops=6, loops_max=200).expected() - 6.0) < 1e-9
    # sigma -> 0: R = 1 + Poisson(n_loops - 1), clipped to the range
    s = sampler(n_loops=4, loops_sigma=1e-3, loops_min=2, loops_max=7)
    pois = stats.poisson(3)
    want = {2: pois.cdf(1), **{r: pois.pmf(r - 1) for r in range(3, 7)}, 7: pois.sf(5)}
    assert max(abs(s.distribution()[r] - want[r]) for r in want) < 1e-4
    assert sampler(train_loops="uniform", n_loops=5).expected() == 5.0  # default range centred on n_loops


# -- the model config -------------------------------------------------------------------------------------
def test_hooks_set_the_fields_and_round_trip():
    cfg = CARTConfig.tiny(n_loops=5, hooks=("truncated_bptt", "random_loops"))
    assert cfg.hooks == ("random_loops", "truncated_bptt")
    assert (cfg.train_loops, cfg.bptt_loops, cfg.loop_range) == ("poisson_lognormal", 3, (1, 9))
    assert CARTConfig.from_dict(cfg.to_dict()) == cfg
    uniform = CARTConfig.tiny(hooks=RANDOM, train_loops="uniform", bptt_loops=None)
    assert uniform.train_loops == "uniform"
    plain = CARTConfig.tiny().to_dict()  # fixed R, full BPTT: no new keys, so names and hashes are unchanged
    assert not {"train_loops", "loops_min", "loops_max", "loops_sigma", "bptt_loops"} & set(plain)


def test_unshared_core_stores_one_block_per_reachable_loop():
    cfg = CARTConfig.tiny(n_loops=3, hooks=("unshare_core", "random_loops"))
    model = build_model(cfg)
    assert len(model.core) == cfg.loop_range[1] == 5
    model(torch.randint(0, 64, (1, 4)), n_loops=5)
    assert idle_parameters(cfg) and not idle_parameters(CARTConfig.tiny(hooks=RANDOM))


@pytest.mark.parametrize("kw, message", [
    ({"train_loops": "uniform"}, "train_loops='uniform' is not allowed: a random loop count is the hook random_loops"),
    ({"bptt_loops": 2}, "bptt_loops=2 is not allowed: truncated backpropagation is the hook truncated_bptt"),
    ({"loops_max": 8}, "loops_max=8 is not allowed: loops_max shapes the random loop count"),
    ({"hooks": RANDOM, "loops_max": 2}, "loops_max=2 is not allowed: it must be >= n_loops=3"),
    ({"hooks": RANDOM, "loops_min": 4}, "n_loops=3 is not allowed: with random loops n_loops is the mean R"),
    ({"hooks": ("single_loop", "random_loops")}, "R from 1..1, i.e. R=1 at every step (n_loops=1, set by single_loop)"),
    ({"hooks": RANDOM, "n_loops": 1, "loops_max": 4}, "poisson_lognormal draws R = 1 + Poisson with mean n_loops - 1"),
    ({"hooks": RANDOM, "train_loops": "uniform", "loops_sigma": 1.0}, "loops_sigma shapes train_loops=poisson_lognormal"),
    ({"hooks": ("single_loop", "truncated_bptt")}, "truncated_bptt through the last 2 loops truncates nothing"),
    ({"hooks": ("truncated_bptt",), "bptt_loops": 3}, "bptt_loops=3 is not allowed: truncated_bptt through the last 3"),
], ids=["uniform-no-hook", "bptt-no-hook", "range-no-hook", "max-below-mean", "min-above-mean",
        "single-loop-random", "poisson-n1", "sigma-uniform", "single-loop-bptt", "bptt-k-too-big"])
def test_bad_variable_depth_fields_are_refused_in_one_line(kw, message):
    with pytest.raises(ConfigError) as err:
        CARTConfig.tiny(**kw)
    assert message in str(err.value) and "\n" not in str(err.value)


COMBOS = [c for k in range(len(PAPER_ABLATIONS) + 1) for c in itertools.combinations(PAPER_ABLATIONS, k)]
SINGLES = [()] + [(h,) for h in PAPER_ABLATIONS]


@pytest.mark.slow
@pytest.mark.parametrize("extra, combos, n_built", [
    (("random_loops", "truncated_bptt"), COMBOS, 48), (RANDOM, SINGLES, 7), (("truncated_bptt",), SINGLES, 7),
], ids=["both-with-every-combination", "random-with-each", "bptt-with-each"])
def test_composes_with_the_paper_ablations(extra, combos, n_built):
    """The two hooks together with every combination of the paper ablations, and each alone
    with each ablation: single_loop (R = 1, nothing to draw or truncate) and unfreeze_kv +
    self_attn_core are refused, the rest train a step at the largest R they can draw (every
    unshared block in use)."""
    built = 0
    for ablations in combos:
        hooks = ablations + extra
        if "single_loop" in ablations or {"unfreeze_kv", "self_attn_core"} <= set(ablations):
            with pytest.raises(ConfigError):
                CARTConfig.tiny(hooks=hooks)
            continue
        torch.manual_seed(0)
        model = build_model(CARTConfig.tiny(hooks=hooks))
        idx = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
        _, loss = model(idx, idx.roll(-1, 1), n_loops=model.config.loop_range[1])
        loss.backward()
        assert torch.isfinite(loss), hooks
        grads = [p.grad for p in model.core[-1].parameters()]  # the last loop's block is always graded
        assert all(g is not None and torch.isfinite(g).all() for g in grads), hooks
        built += 1
    assert built == n_built


# -- truncated BPTT ---------------------------------------------------------------------------------------
def _batch():
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 64, (2, 8), generator=g)
    return idx, idx.roll(-1, 1)


@pytest.mark.parametrize("hooks", [("truncated_bptt",), ("unfreeze_kv", "truncated_bptt"),
                                   ("no_hyper", "truncated_bptt")], ids=["anchor", "unfrozen", "no_hyper"])
def test_only_the_last_k_loops_contribute_gradient(hooks):
    R, k = 5, 2
    torch.manual_seed(0)
    model = build_model(CARTConfig.tiny(n_loops=R, hooks=hooks, bptt_loops=k))
    updates = []  # u_r, the core's output at loop r
    handle = model.core[0].register_forward_hook(lambda mod, args, out: updates.append(out))
    idx, targets = _batch()
    _, loss = model(idx, targets)
    handle.remove()
    for u in updates:
        if u.requires_grad:
            u.retain_grad()
    loss.backward()
    assert len(updates) == R
    assert [u.requires_grad for u in updates] == [False] * (R - k) + [True] * k
    assert all(u.grad.abs().sum() > 0 for u in updates[R - k:])

    # the same weights without truncation: the same loss, a different core gradient
    full = build_model(CARTConfig.tiny(n_loops=R, hooks=tuple(h for h in hooks if h != "truncated_bptt")))
    full.load_state_dict(model.state_dict())
    _, full_loss = full(idx, targets)
    full_loss.backward()
    assert full_loss.item() == loss.item()
    core_grad = [p.grad for p in model.core.parameters()]
    assert not all(torch.allclose(a, p.grad) for a, p in zip(core_grad, full.core.parameters()))


def test_unshared_blocks_of_truncated_loops_get_no_gradient():
    """With one block per loop the per-loop contribution is visible in the weights: blocks of the
    first R - k loops get none, the last k get some, blocks beyond the drawn R are unused."""
    torch.manual_seed(0)
    model = build_model(CARTConfig.tiny(n_loops=4, hooks=("unshare_core", "random_loops", "truncated_bptt"),
                                        bptt_loops=2))
    assert len(model.core) == 7
    idx, targets = _batch()
    _, loss = model(idx, targets, n_loops=5)
    loss.backward()
    graded = [all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()) for block in model.core]
    untouched = [all(p.grad is None for p in block.parameters()) for block in model.core]
    assert graded == [False, False, False, True, True, False, False]
    assert untouched == [True, True, True, False, False, True, True]


def test_truncation_is_for_training_with_autograd_only():
    model = build_model(CARTConfig.tiny(n_loops=5, hooks=("truncated_bptt",), bptt_loops=2))
    assert model.frozen_loops(5) == 3 and model.frozen_loops(2) == 0
    with torch.no_grad():
        assert model.frozen_loops(5) == 0
    assert model.eval().frozen_loops(5) == 0


# -- accounting -------------------------------------------------------------------------------------------
def test_accounting_counts_the_expected_R():
    cfg = CARTConfig.tiny(n_loops=4, hooks=RANDOM)
    s, acc = LoopSampler(cfg), account(cfg, seq_len=32)
    low, high = cfg.loop_range
    at_low, at_high = (account(CARTConfig.tiny(n_loops=r), seq_len=32) for r in (low, high))
    assert acc.mean_loops == pytest.approx(s.expected()) and low < acc.mean_loops < high
    assert at_low.forward_flops < acc.forward_flops < at_high.forward_flops
    assert at_low.train_flops_per_token() < acc.train_flops_per_token() < at_high.train_flops_per_token()
    fixed = account(CARTConfig.tiny(n_loops=4), seq_len=32)
    model = build_model(cfg)
    per_loop = sum(p.numel() for part in (model.core, model.mixer, model.loop_embedding, model.gate)
                   for p in part.parameters())  # what runs once per loop
    assert acc.stored_params == fixed.stored_params
    assert acc.effective_params == pytest.approx(fixed.effective_params + (acc.mean_loops - 4) * per_loop)
    # one step at its drawn R costs what a fixed-R model of that R costs
    for r in s.support():
        fixed_r = account(CARTConfig.tiny(n_loops=r), seq_len=32).train_flops_per_token()
        assert acc.train_flops_per_token(n_loops=r) == pytest.approx(fixed_r, rel=1e-12)


def test_truncated_backward_is_cheaper_and_averaged_exactly():
    cfg = CARTConfig.tiny(n_loops=4, hooks=("random_loops", "truncated_bptt"), bptt_loops=2)
    acc, full = account(cfg, seq_len=32), account(cfg.replace(hooks=["random_loops"], bptt_loops=None), seq_len=32)
    assert acc.forward_flops == full.forward_flops and acc.effective_params == full.effective_params
    assert acc.train_flops_per_token() < full.train_flops_per_token()
    dist = LoopSampler(cfg).distribution()
    assert acc.train_flops_per_token() == pytest.approx(sum(p * acc.train_flops_per_token(n_loops=r)
                                                            for r, p in dist.items()), rel=1e-12)
    assert acc.train_flops_per_token(n_loops=2) == full.train_flops_per_token(n_loops=2)  # R <= k: nothing skipped
    saved = full.train_flops_per_token(n_loops=6) - acc.train_flops_per_token(n_loops=6)
    assert saved == pytest.approx(2 * (6 - 2) * acc.loop_flops / 32)  # the backward of 4 loops


# -- torch.compile ----------------------------------------------------------------------------------------
class GraphCounter:
    """A torch.compile backend that runs graphs eagerly and counts how many were traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.slow
def test_compiled_loop_body_does_not_recompile_per_R():
    torch._dynamo.reset()
    cpu = select(Capabilities(cuda=False, device_name="cpu", bf16=True, bitsandbytes=False, triton=False),
                 device="cpu", compile=True)
    assert compile_scope(cpu, loops_vary=True) == "loop" and compile_scope(cpu) == "model"
    cfg = CARTConfig.tiny(n_loops=4, hooks=("random_loops", "truncated_bptt"), bptt_loops=2)
    torch.manual_seed(0)
    model, eager = build_model(cfg), build_model(cfg)
    eager.load_state_dict(model.state_dict())
    counter = GraphCounter()
    step = compiled(model, cpu, loops_vary=True, backend=counter)
    idx, targets = _batch()
    for R in (2, 3, 4, 5, 6, 3):
        _, loss = step(idx, targets, n_loops=R)
        loss.backward()
        assert loss.item() == pytest.approx(eager(idx, targets, n_loops=R)[1].item(), rel=1e-6)
    assert counter.graphs <= 2  # one core-block graph with gradient, one without (truncated loops)
    torch._dynamo.reset()


# -- training: resume, DDP --------------------------------------------------------------------------------
def random_model(**kw) -> dict:
    return {**TINY_MODEL, "hooks": ["random_loops", "truncated_bptt"], **kw}


def run_config(data, out, **kw):
    """A tiny run without measures (they are not what these tests are about, and cost 4x the run)."""
    return tiny_config(data, out, measures=[], **kw)


@pytest.mark.slow
def test_resume_continues_the_R_sequence_exactly(tiny_data, tmp_path):
    straight = run_config(tiny_data, tmp_path / "straight", model=random_model(), steps=6)
    run_id = train(straight)
    cfg = run_config(tiny_data, tmp_path / "stopped", model=random_model(), steps=6)
    child = mp.get_context("spawn").Process(target=train_and_signal, args=(cfg.to_dict(), 3, SIGTERM))
    child.start()
    child.join(300)
    assert child.exitcode == 130
    assert train(cfg, resume=run_id) == run_id
    a = results.train_log(straight.results_db, [run_id])
    b = results.train_log(cfg.results_db, [run_id])
    assert results.runs(cfg.results_db).step.tolist() == [6]
    want = [LoopSampler(cfg.model_config(), cfg.seed)(s) for s in range(6)]
    assert a.n_loops.tolist() == b.n_loops.tolist() == want and len(set(want)) > 1
    assert a.loss.tolist() == b.loss.tolist() and a.flops.tolist() == b.flops.tolist()
    assert (np.diff([0.0, *a.flops]) > 0).all()


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _rank_trains(rank: int, config: dict, port: str, out: str) -> None:
    """Spawned gloo rank: train `config` and write the R of every training forward to `out`."""
    import json

    import torch.distributed as dist

    from cartlab.model.cart import CART
    from cartlab.train import TrainConfig
    from cartlab.train import train as run

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    seen, forward = [], CART.forward

    def spy(self, idx, targets=None, n_loops=None, cache=None):
        if self.training:
            seen.append(self.check_loops(n_loops))
        return forward(self, idx, targets, n_loops, cache)

    CART.forward = spy
    try:
        run(TrainConfig.from_dict(config))
    finally:
        dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(seen, f)


@pytest.mark.slow
def test_two_gloo_ranks_draw_the_same_R_at_every_step(tiny_data, tmp_path):
    """Two DDP ranks train an unshared core with random loops and truncated BPTT (so DDP must
    look for unused parameters); both run the sampler's R at every micro-batch of every step."""
    import json

    cfg = run_config(tiny_data, tmp_path, model=random_model(hooks=["unshare_core", "random_loops", "truncated_bptt"]),
                      steps=4, batch_size=2, grad_accum=2, checkpoint_every=4, eval_every=4, name="ddp-loops")
    port, ctx = _free_port(), mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_trains, args=(r, cfg.to_dict(), port, str(tmp_path / f"rank{r}.json")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    want = [LoopSampler(cfg.model_config(), cfg.seed)(s) for s in range(4)]
    assert ranks[0] == ranks[1] == [r for r in want for _ in range(2)]  # 2 micro-batches per step
    assert results.train_log(cfg.results_db).n_loops.tolist() == want and len(set(want)) > 1
