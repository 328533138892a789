"""lm-eval integration (issue 7): the registered `cartlab` model scores local tasks through
lm_eval.simple_evaluate exactly as the model does directly, a uniform model scores the
perplexity the maths says, and `cartlab eval` stores one row per metric and loop count.
Offline: the tasks are the jsonl files of data/tasks/."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
from conftest import copy_db, need
import torch
import torch.nn.functional as F

lm_eval = need("lm_eval")

from cartlab import results  # noqa: E402
from cartlab.cli import main  # noqa: E402
from cartlab.eval.lm import CartlabLM, load_checkpoint  # noqa: E402
from cartlab.eval.run import local_tasks, task_manager  # noqa: E402


pytestmark = pytest.mark.usefixtures("hf_offline")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_run):
    """The session's tiny trained run (conftest), with a copy of its results database that the
    evaluations here may write into."""
    db = tmp_path_factory.mktemp("eval_run") / "results.db"
    copy_db(tiny_run.db, db)
    return {"run_id": tiny_run.run_id, "db": db, "ckpt": tiny_run.run_dir, "seq_len": tiny_run.config.seq_len}


def _evaluate(lm, task, **kw):
    tasks = [local_tasks()[task]]
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(tasks), num_fewshot=0,
                                   log_samples=True, bootstrap_iters=0, **kw)


def _logprob(model, ids: list[int], n_target: int, **kw) -> float:
    """log p of the last n_target tokens of ids given what precedes them, by a plain forward."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]), **kw)
    logp = F.log_softmax(logits[0].float(), -1)[-n_target:]
    return float(logp.gather(1, torch.tensor(ids[-n_target:])[:, None]).sum())


@pytest.mark.slow
def test_multiple_choice_loglikelihoods_equal_the_models_own(tiny_run):
    lm = CartlabLM(checkpoint=str(tiny_run["ckpt"]), batch_size=3, n_loops=5)
    model, tok, _ = load_checkpoint(tiny_run["ckpt"])
    res = _evaluate(lm, "cartlab_mc")
    samples = res["samples"]["cartlab_mc"]
    assert len(samples) == 12
    for s in samples:
        context = s["doc"]["question"]
        for choice, resp in zip(s["doc"]["choices"], s["resps"]):
            ctx, whole = tok.encode(context), tok.encode(context + " " + choice)
            expected = _logprob(model, whole, len(whole) - len(ctx), n_loops=5)
            assert resp[0][0] == pytest.approx(expected, abs=1e-4)
    assert 0.0 <= res["results"]["cartlab_mc"]["acc,none"] <= 1.0


@pytest.mark.slow
def test_rolling_loglikelihood_equals_disjoint_windows_of_the_trained_length(tiny_run):
    lm = CartlabLM(checkpoint=str(tiny_run["ckpt"]), batch_size=2)
    model, tok, _ = load_checkpoint(tiny_run["ckpt"])
    L = tiny_run["seq_len"]
    assert lm.max_length == L
    samples = _evaluate(lm, "cartlab_ppl")["samples"]["cartlab_ppl"]
    assert len(samples) == 4
    for s in samples:
        ids = tok.encode(s["doc"]["text"])
        assert len(ids) > 2 * L  # several windows
        # chunks of L predicted tokens; each window is the L tokens before its last target, so a
        # short last chunk keeps a full window of context ([eos] conditions the first token)
        padded = [tok.eos_id] + ids
        expected = 0.0
        for j in range(0, len(ids), L):
            n = min(L, len(ids) - j)
            expected += _logprob(model, padded[max(0, j + n - L): j + n + 1], n)
        assert s["resps"][0][0] == pytest.approx(expected, abs=1e-3)


class Uniform(torch.nn.Module):
    """Puts probability 1/V on every token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.config = type("Config", (), {"kind": "uniform"})()

    def forward(self, idx, **kw):
        return torch.zeros(*idx.shape, self.vocab), None


@pytest.mark.slow
def test_a_uniform_model_scores_the_perplexity_the_maths_says(tiny_run):
    _, tok, _ = load_checkpoint(tiny_run["ckpt"])
    V = tok.vocab_size
    lm = CartlabLM(model=Uniform(V), tokenizer=tok, max_length=16, batch_size=4)
    res = _evaluate(lm, "cartlab_ppl")["results"]["cartlab_ppl"]
    texts = [s.strip() for s in open(local_tasks()["cartlab_ppl"]["dataset_kwargs"]["data_files"]["test"])]
    import json

    docs = [json.loads(t)["text"] for t in texts]
    nll = sum(len(tok.encode(d)) for d in docs) * math.log(V)  # every token costs ln V
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert res["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-4)
    assert res["byte_perplexity,none"] == pytest.approx(math.exp(nll / nbytes), rel=1e-4)
    assert res["bits_per_byte,none"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-4)


@pytest.mark.slow
def test_cartlab_eval_writes_one_row_per_metric_and_loop_count(tiny_run, capsys):
    args = ["eval", str(tiny_run["ckpt"]), "--tasks", "cartlab_mc", "--n-loops", "1,3,6", "--db",
            str(tiny_run["db"]), "--batch-size", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "0-shot R=1" in printed and "0-shot R=3" in printed and "0-shot R=6" in printed
    ds = results.downstream(tiny_run["db"])
    ds = ds[ds.task == "cartlab_mc"]
    assert sorted(ds.metric.unique()) == ["acc", "acc_norm"]
    assert ds.groupby("metric").n_loops.apply(sorted).tolist() == [[1, 3, 6], [1, 3, 6]]
    assert (ds.run_id == tiny_run["run_id"]).all() and ds.stderr.notna().all()


def test_generate_until_is_greedy_cached_decoding_cut_at_the_stop_string(tiny_run):
    from lm_eval.api.instance import Instance

    lm = CartlabLM(checkpoint=str(tiny_run["ckpt"]), n_loops=4)
    model, tok, _ = load_checkpoint(tiny_run["ckpt"])
    ids = tok.encode("Once upon a time")
    new = model.generate(torch.tensor([ids]), 24, temperature=0, use_cache=False, n_loops=4)[0, len(ids):].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    text = tok.decode(new)
    assert len(text) > 6, "the tiny model should say something before its end token"
    stop = text[4:6]

    def request(until):
        return Instance("generate_until", doc={}, arguments=("Once upon a time", {"until": until, "max_gen_toks": 24}),
                        idx=0)

    assert lm.generate_until([request(["\u2603"]), request([stop])]) == [text, text.split(stop)[0]]


@pytest.mark.slow
def test_lm_evals_own_cli_runs_the_cartlab_model(tiny_run, repo):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "cartlab.eval", "run", "--model", "cartlab", "--model_args",
                           f"checkpoint={tiny_run['ckpt']},n_loops=2", "--tasks", "cartlab_mc", "--include_path",
                           "data/tasks", "--limit", "3", "--batch_size", "3", "--device", "cpu"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"cartlab_mc\s*\|.*\|\s*acc\s*\|", proc.stdout), proc.stdout


def test_empty_and_overlong_continuations(tiny_run):
    lm = CartlabLM(checkpoint=str(tiny_run["ckpt"]), max_length=8)
    assert lm._loglikelihood_tokens([(None, [5, 6], [])]) == [(0.0, True)]
    with pytest.raises(ValueError, match="continuation: 9 tokens, longer than max_length=8"):
        lm._loglikelihood_tokens([(None, [5], list(range(10, 19)))])


def test_a_long_generation_budget_keeps_half_the_context(tiny_run):
    from lm_eval.api.instance import Instance

    lm = CartlabLM(checkpoint=str(tiny_run["ckpt"]), max_length=16)
    model, tok, _ = load_checkpoint(tiny_run["ckpt"])
    context = "Once upon a time there was a little fox who lived at the edge of a quiet forest"
    ids = tok.encode(context)
    assert len(ids) > 16
    new = model.generate(torch.tensor([ids[-8:]]), 20, temperature=0, use_cache=False)[0, 8:].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    request = Instance("generate_until", doc={}, arguments=(context, {"until": ["\u2603"], "max_gen_toks": 20}), idx=0)
    assert lm.generate_until([request]) == [tok.decode(new)]


def test_a_misspelt_model_arg_is_refused_not_ignored(tiny_run):
    with pytest.raises(ValueError, match=r"model_args: unknown argument\(s\) \['n_loop'\] .*allowed: \['checkpoint', 'n_loops'"):
        lm_eval.simple_evaluate(model="cartlab", model_args=f"checkpoint={tiny_run['ckpt']},n_loop=4",
                                tasks=[local_tasks()["cartlab_mc"]], limit=1)


@pytest.mark.parametrize("args, message", [
    (["eval", "/no/such/ckpt", "--tasks", "cartlab_mc"], "checkpoint='/no/such/ckpt' is not allowed: no such checkpoint or run folder"),
    (["eval", "CKPT", "--tasks", "no_such_task_xyz"], "--tasks: unknown task 'no_such_task_xyz'"),
    (["eval", "CKPT", "--tasks", "cartlab_mc", "--n-loops", "0,2"], "n_loops[0]=0 is not allowed: must be >= 1"),
    (["eval", "CKPT", "--tasks", "cartlab_mc", "--db", "/no/such/results.db"], "--db: /no/such/results.db does not exist"),
])
def test_bad_arguments_give_one_line_errors(tiny_run, capsys, args, message):
    args = [str(tiny_run["ckpt"]) if a == "CKPT" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cartlab: error: ") and message in err and len(err.splitlines()) == 1


def test_generate_until_in_left_padded_batches_equals_one_at_a_time(tiny_run):
    """batch_size=4 decodes prompts of different lengths as one left-padded batch (issue 29)."""
    from lm_eval.api.instance import Instance

    contexts = ["Once upon a time", "The", "Every evening she counted the stars and", "A list is", "Cats"]
    requests = [Instance("generate_until", doc={}, arguments=(c, {"until": ["\u2603", "."], "max_gen_toks": 6 + i}),
                         idx=0) for i, c in enumerate(contexts)]
    single = CartlabLM(checkpoint=str(tiny_run["ckpt"]), n_loops=4)
    batched = CartlabLM(checkpoint=str(tiny_run["ckpt"]), n_loops=4, batch_size=4)
    want = single.generate_until(requests)
    assert batched.generate_until(requests) == want and any(want)
    assert batched.mean_loops() == single.mean_loops() == 4
    rule = {"n_loops": 6, "exit": "kl", "exit_threshold": 1e-2}  # a padded position's exit must not matter
    single = CartlabLM(checkpoint=str(tiny_run["ckpt"]), **rule)
    batched = CartlabLM(checkpoint=str(tiny_run["ckpt"]), batch_size=4, **rule)
    assert batched.generate_until(requests) == single.generate_until(requests)
    assert batched.mean_loops() == single.mean_loops() < 6
