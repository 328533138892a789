"""LRT as its authors built it: the hook `lrt_paper` (final normed state into every layer,
per-layer gamma, gated per-layer K/V feedback, all-passes loss, optional K/V refresh) and
`memory_sweeps` (the S-subset sweep repeated).

Guards:
1. (issue acceptance 1) for `lrt_paper`, with and without the K/V refresh: cached token-by-token
   decoding and the eval forward equal the slow exact recurrence (every position recomputed from
   the memories found so far) to 1e-5; the interleaved forward at S >= T equals it too, with any
   number of sweeps; a sequential pass with zero feedback equals the parallel full pass;
2. the all-passes loss is the plain mean of the passes' losses (checked at S = T, where each pass
   is one exact position), and gradients reach every parameter through it;
3. each difference from our recipe is one field on top of the hook, and the config round-trips;
4. (issue acceptance 2) on a small trained model, for the paper recipe and ours, the
   interleaved-vs-exact loss gap shrinks with S and with sweeps;
5. the accounting counts the feedback, the sweeps, the refresh and the extra LM head.
Run: pytest tests/test_lrt_paper.py
"""
import pytest
import torch
import torch.nn.functional as F

from cartlab.model import LMConfig, LRTConfig, account, build_model, exact_reference, memory_overhead
from cartlab.model.config import model_overrides
from cartlab.model.layers import KVCache
from cartlab.model.memory import trace
from test_model_variants import cached_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def lively_paper(seed=0, n_layers=3, scale=3.0, **kw):
    """A tiny `lrt_paper` model whose memory matters: backbone matrices scaled up, the feedback
    projections at unit scale, gates drawn away from their zero init, gamma 1."""
    torch.manual_seed(seed)
    model = build_model(LRTConfig.tiny(hooks=("lrt_paper",), n_layers=n_layers, **kw)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(("wte", "memory")):
                p.mul_(scale)
        for fb in model.memory.feedback:
            fb.proj.weight.normal_(0.0, model.config.d_model ** -0.5)
            fb.gate.weight.normal_(0.0, 0.5)
        model.memory.gain.fill_(1.0)
    return model.eval()


def tokens(T, B=2, seed=2):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


# -- the recipe as fields ---------------------------------------------------------------------------------------
def test_lrt_paper_sets_the_published_recipe_and_each_difference_is_one_field():
    cfg = LRTConfig.tiny(hooks=("lrt_paper",), n_layers=4)
    assert (cfg.memory_source_layer, cfg.memory_injection_layers) == (3, (0, 1, 2, 3))
    assert cfg.memory_residual and cfg.memory_kv_feedback and not cfg.memory_kv
    assert (cfg.memory_read, cfg.memory_gamma, cfg.memory_loss) == ("norm", 0.1, "all_passes")
    assert model_overrides(cfg) == {} and LMConfig.from_dict(cfg.to_dict()) == cfg
    model = build_model(cfg)
    assert len(model.memory.read) == 0 and model.memory.gain.shape == (4, 1)
    assert torch.equal(model.memory.gain, torch.full((4, 1), 0.1))
    assert all(f.gate.weight.abs().sum() == 0 for f in model.memory.feedback)  # both gates start at 1
    # each difference from ours, on top of the hook
    ours = LRTConfig.tiny(hooks=("lrt_paper",), n_layers=4, memory_source=2, memory_loss="refined",
                          memory_read="projection")
    assert model_overrides(ours) == {"memory_source": 2, "memory_loss": "refined", "memory_read": "projection"}
    assert (ours.memory_source_layer, ours.memory_loss_rule, len(build_model(ours).memory.read)) == (2, "refined", 1)
    assert LMConfig.from_dict(ours.to_dict()) == ours
    both = LRTConfig.tiny(hooks=("lrt_kv", "lrt_paper"), memory_kv_refresh=True, memory_sweeps=2)
    assert both.memory_kv and both.memory_kv_feedback and LMConfig.from_dict(both.to_dict()) == both
    # the defaults of our recipe are unchanged
    default = LRTConfig.tiny()
    assert (default.memory_read_rule, default.memory_loss_rule, default.memory_gamma, default.memory_sweeps) == (
        "projection", "refined", None, 1)


# -- acceptance 1: exact recurrence, S >= T, and the zero-feedback check ------------------------------------------
@pytest.mark.parametrize("refresh", [False, True], ids=["plain", "kv_refresh"])
def test_lrt_paper_decoding_and_S_at_least_T_equal_the_slow_recurrence(refresh):
    model = lively_paper(memory_kv_refresh=refresh)
    idx = tokens(10)
    with torch.no_grad():
        reference = exact_reference(model, idx)
        torch.testing.assert_close(cached_logits(model, idx, prefix=3, chunk=2), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(idx)[0], reference, atol=1e-5, rtol=1e-5)  # eval forward, no cache
        for S, sweeps in ((10, 1), (10, 2), (25, 1)):
            torch.testing.assert_close(model(idx, subsets=S, sweeps=sweeps)[0], reference, atol=1e-5, rtol=1e-5)
        gap = (model(idx, subsets=2)[0] - reference).abs()
        assert gap[:, :2].max() < 1e-5 and gap.max() > 1e-3  # the first S positions only are exact


def test_the_zero_feedback_sequential_pass_equals_the_parallel_full_pass():
    """Token by token through a cache, every position reading a zero memory (the gates still mix
    each layer's keys and values), gives the interleaved forward's memory-free full pass."""
    model = lively_paper()
    idx = tokens(9)
    with torch.no_grad():
        x = model.wte(idx)
        full = model.memory.interleaved(model, x, 3).passes[0][1]  # (B, T, d)
        cache, outs = KVCache(), []
        for t in range(idx.size(1)):
            zero = model.memory.recall(model, torch.zeros_like(x[:, :1]), None)
            outs.append(model.run(x[:, t: t + 1], cache, zero)[0])
        sequential = torch.cat(outs, dim=1)
    torch.testing.assert_close(model.head(sequential, None)[0], model.head(full, None)[0], atol=1e-5, rtol=1e-5)
    assert (model.head(full, None)[0] - exact_reference(model, idx)).abs().max() > 1e-3  # the memory matters


def test_kv_refresh_changes_the_approximation_and_keeps_gradients():
    plain, fresh = lively_paper(), lively_paper(memory_kv_refresh=True)
    idx = tokens(12)
    with torch.no_grad():
        assert (plain(idx, subsets=3)[0] - fresh(idx, subsets=3)[0]).abs().max() > 1e-4
    fresh.train()
    fresh(idx, idx.roll(-1, 1))[1].backward()
    for name, p in fresh.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -- the all-passes loss -----------------------------------------------------------------------------------------
def test_all_passes_loss_is_the_mean_over_the_passes():
    """At S = T each interleaved pass is one position, computed exactly; the full pass is the
    memory-free forward. The loss is (full-pass loss + the T one-position losses) / (T + 1)."""
    model = lively_paper()
    T = 6
    idx, targets = tokens(T), tokens(T, seed=5)
    model.train()
    model.memory.subsets = T
    logits, loss = model(idx, targets)
    with torch.no_grad():
        reference = exact_reference(model, idx)
        full = model.head(model.memory.interleaved(model, model.wte(idx), T).passes[0][1], None)[0]
    ce = [F.cross_entropy(reference[:, t], targets[:, t]) for t in range(T)]
    expected = (F.cross_entropy(full.flatten(0, 1), targets.flatten()) + sum(ce)) / (T + 1)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)  # the logits are the refined ones
    refined = build_model(model.config.replace(memory_loss="refined")).double().train()
    refined.load_state_dict(model.state_dict())
    refined.memory.subsets = T
    torch.testing.assert_close(refined(idx, targets)[1].double(), sum(ce) / T, atol=1e-5, rtol=1e-5)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the refined logits come from the passes' heads: at S = 3 with 2 sweeps as the merged outputs give them
    model.memory.subsets, model.memory.sweeps = 3, 2
    with torch.no_grad():
        logits = model(idx, targets)[0]
        merged = model.head(model.memory.interleaved(model, model.wte(idx), 3, 2).out, None)[0]
    torch.testing.assert_close(logits, merged, atol=1e-12, rtol=0)


# -- accounting -------------------------------------------------------------------------------------------------
def test_accounting_counts_feedback_sweeps_refresh_and_the_second_head():
    d, L, T, V = 32, 3, 64, 64
    paper = LRTConfig.tiny(hooks=("lrt_paper",), n_layers=L)
    base = account(LRTConfig.tiny(hooks=("lrt_paper",), n_layers=L, memory_loss="refined"), T)
    acc = account(paper, T)
    H = paper.n_heads
    fb = L * (2 * d * d + 32 * 2 * H)  # per layer: the K/V feedback projection and the gate
    assert memory_overhead(paper, T)["params"] == fb + L  # plus one gamma per layer
    assert acc.forward_flops - account(LRTConfig.tiny(hooks=("lrt_residual",), n_layers=L, memory_source=2,
                                                       memory_layers=[0, 1, 2]), T).forward_flops == pytest.approx(
        2 * T * fb - 2 * T * (d * d))  # feedback and gates instead of the shared projection
    assert acc.train_forward_flops - base.train_forward_flops == pytest.approx(2 * T * d * V)  # the second head
    two = account(paper.replace(memory_sweeps=2), T)
    assert two.train_forward_flops - acc.train_forward_flops == pytest.approx(
        acc.forward_flops + 2 * T * d * V)  # one more sweep, and its passes' heads
    fresh = account(paper.replace(memory_kv_refresh=True), T)
    assert fresh.train_forward_flops - acc.train_forward_flops == pytest.approx(4 * 2 * T * L * 2 * d * d)  # S = 4


# -- acceptance 2: the parallel-vs-sequential gap shrinks with S and with sweeps, on a trained model ----------------
def markov(n, T, seed):
    """Sequences of a fixed random 2-successor Markov chain over 64 tokens: inputs, targets (n, T)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, 64, (64, 2), generator=torch.Generator().manual_seed(0))
    x = torch.zeros(n, T + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, 64, (n,), generator=g)
    for t in range(T):
        x[:, t + 1] = successors[x[:, t], torch.randint(0, 2, (n,), generator=g)]
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("hooks", [("lrt_paper",), ("lrt_kv", "lrt_residual")], ids=["paper", "ours"])
def test_the_gap_shrinks_with_S_and_with_sweeps_on_a_trained_model(hooks):
    """30 AdamW steps of a 2-layer d=32 model on T=32 Markov sequences, then the probe's
    `loss_abs_gap` (mean |per-token loss, interleaved - exact|) on held-out sequences: it falls as S
    doubles from 1 to 16, two sweeps beat one at every S below T, and n sweeps of S subsets are
    exact once n S >= T. (The signed loss gap is within +-0.01 nats of 0 here at every S.)"""
    from cartlab.measures.lrt import abs_gap

    T = 32
    torch.manual_seed(0)
    model = build_model(LRTConfig.tiny(hooks=hooks, n_layers=2)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(30):
        loss = model(*markov(8, T, step))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = markov(16, T, 999)
    with torch.no_grad():
        exact = trace(model, x, y)[0]
        gap = {(S, n): abs_gap(trace(model, x, y, S, n)[0], exact, y) for S in (1, 2, 4, 8, 16) for n in (1, 2)}
    ones = [gap[S, 1] for S in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(ones, ones[1:])), ones
    assert all(gap[S, 2] < gap[S, 1] for S in (1, 2, 4, 8, 16)), gap
    assert gap[16, 1] > 1e-4 and gap[16, 2] < 1e-6, gap


def test_model_info_prints_every_lrt_variants_overhead(capsys):
    """`cartlab model info dense ... --lrt-variants`: one row per variant, with the parameter
    overhead the README quotes for our default (0.55% at d=768, 12 layers)."""
    import re

    from cartlab.cli import main
    from cartlab.model.lrt import LRT_VARIANTS

    assert main(["model", "info", "dense", "d_model=768", "n_layers=12", "--lrt-variants"]) == 0
    out = capsys.readouterr().out
    rows = {name: re.search(re.escape(name) + r"\s+\+([0-9.]+)%\s+\+([0-9.]+)%\s+x([0-9.]+)", out) for name in LRT_VARIANTS}
    assert all(rows.values()), out
    pct = {name: float(m.group(1)) for name, m in rows.items()}
    assert pct["ours: lrt_kv+lrt_residual, shared projection"] == 0.55
    assert pct["lrt_paper"] > 10 * pct["ours: lrt_kv+lrt_residual, shared projection"]  # 2 d^2 per layer
    train = {name: float(m.group(3)) for name, m in rows.items()}
    assert train["ours, 2 sweeps"] > train["ours: lrt_kv+lrt_residual, shared projection"] + 0.8
    assert main(["model", "info", "dense", "d_model=768", "n_layers=12", "--hooks", "lrt_paper"]) == 0
    assert "final norm, residual+gated K/V feedback, source layer 11" in capsys.readouterr().out
    assert main(["model", "info", "cart", "--lrt-variants"]) != 0
    assert "--lrt-variants is not allowed with kind 'cart'" in capsys.readouterr().err


# -- the report's tables and figure (cartlab.analysis.lrt_eval) ----------------------------------------------------
def test_the_report_reads_bpb_per_pass_and_the_gap_over_sweeps():
    import pandas as pd

    from cartlab.analysis import lrt_eval
    from test_analysis_compute import lrt_store

    runs, probes = lrt_store()
    rows = []
    for rid, shift in (("lrt-s1", 0.0), ("lrt-s2", 0.2)):
        for split in ("prose", "stories"):
            values = [("bpb_pass", 0, 2.0 + shift), ("bpb_pass", 1, 1.5), ("bpb_pass", 2, 1.7), ("bpb_merged", 2, 1.6),
                      ("bpb_sequential", 2, 1.5), ("bpb_gap", 2, 0.1), ("bytes_per_token", 0, 4.0),
                      ("bpb_sequential_bucket", 0, 3.0), ("bpb_sequential_bucket", 1, 2.0)]
            rows += [{"run_id": rid, "probe": "lrt_bpb", "step": 100, "split": split, "x": x, "metric": m, "value": v}
                     for m, x, v in values]
            rows.append({"run_id": rid, "probe": "lrt_bpb", "step": 50, "split": split, "x": 2, "metric": "bpb_merged",
                         "value": 99.0})  # an older evaluation: ignored
            for S in (1, 2, 4):
                rows += [{"run_id": rid, "probe": "lrt_gap", "step": 100, "split": split, "x": S, "metric": m, "value": v}
                         for m, v in (("loss_abs_gap", 1.0 / S), ("loss_abs_gap_sweeps2", 0.5 / S))]
    probes = pd.concat([probes, pd.DataFrame(rows)], ignore_index=True)
    table = lrt_eval.bpb_table(runs, probes).set_index("split")
    assert table.loc["prose", "full pass"] == pytest.approx(2.1)  # seeds averaged
    assert table.loc["prose", "refinement passes (mean)"] == pytest.approx(1.6)
    assert table.loc["prose", "merged"] == pytest.approx(1.6) and table.loc["prose", "sequential"] == 1.5
    buckets = lrt_eval.bpb_buckets(runs, probes)
    assert list(buckets.columns) == ["config", "split", "from 0", "from 1"]
    gap = lrt_eval.sweep_gap(runs, probes)
    two = gap[(gap.split == "prose") & (gap.sweeps == 2)].set_index("S")["loss_abs_gap"]
    assert list(two.index) == [1, 2, 4] and two[2] == pytest.approx(0.25)
    assert set(gap.sweeps) == {1, 2} and len(gap[gap.sweeps == 1].dropna(subset=["loss_abs_gap"])) == 6
    fig = lrt_eval.plot_sweep_gap(runs, probes)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2 and fig.axes[0].get_xscale() == "log"
    assert lrt_eval.bpb_table(runs, None).empty and lrt_eval.sweep_gap(runs, probes[probes.probe != "lrt_gap"]).empty


def test_a_compute_budget_picks_the_number_of_sweeps():
    """`memory_budget` in plain forwards: the memory-free pass is one, each sweep about one more."""
    for budget, sweeps in ((2, 1), (3.5, 2), (4, 3)):
        cfg = LRTConfig.tiny(hooks=("lrt_paper",), memory_budget=budget)
        assert cfg.memory_sweep_count == sweeps and build_model(cfg).memory.sweeps == sweeps
        assert LMConfig.from_dict(cfg.to_dict()) == cfg
    by_hand, by_budget = (account(LRTConfig.tiny(memory_sweeps=3), 32), account(LRTConfig.tiny(memory_budget=4), 32))
    assert by_hand.train_forward_flops == by_budget.train_forward_flops
    from cartlab.model import ConfigError

    with pytest.raises(ConfigError, match=r"^memory_budget=3\.0 is not allowed: it picks the number of sweeps, and "
                                          r"memory_sweeps=2 is set too; set one of them$"):
        LRTConfig.tiny(memory_budget=3, memory_sweeps=2)
    with pytest.raises(ConfigError, match=r"^memory_budget=1\.5 is not allowed: must be >= 2"):
        LRTConfig.tiny(memory_budget=1.5)
