"""lm-eval with a per-token exit rule (issue 27 acceptance 5): `cartlab eval --exit` scores a
CART checkpoint with each token stopping by the rule and stores the mean loops per token beside
the scores, under metric names that carry the rule; the cartlab lm-eval model's loglikelihoods
with an exit rule equal the model's own forward with the same rule; bad rules are refused.
Offline: the tasks are the jsonl files of data/tasks/.
Run: pytest tests/test_eval_exits.py
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_db, need

lm_eval = need("lm_eval")

from cartlab import results  # noqa: E402
from cartlab.cli import main  # noqa: E402
from cartlab.eval.lm import CartlabLM, load_checkpoint  # noqa: E402
from cartlab.eval.run import local_tasks, task_manager  # noqa: E402

pytestmark = pytest.mark.usefixtures("hf_offline", "one_thread")
RULE = dict(exit="latent", exit_threshold=0.2)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_run):
    db = tmp_path_factory.mktemp("eval_exits") / "results.db"
    copy_db(tiny_run.db, db)
    return {"run_id": tiny_run.run_id, "db": db, "ckpt": tiny_run.run_dir}


@pytest.mark.slow
def test_loglikelihoods_with_an_exit_rule_are_the_models_own(run):
    lm = CartlabLM(checkpoint=str(run["ckpt"]), batch_size=3, n_loops=6, **RULE)
    model, tok, _ = load_checkpoint(run["ckpt"])
    tasks = [local_tasks()["cartlab_mc"]]
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(tasks), num_fewshot=0, limit=3,
                                  log_samples=True, bootstrap_iters=0)
    loops = lm.mean_loops()
    assert loops is not None and 1 <= loops < 6  # some tokens stop early, none runs past R
    for s in res["samples"]["cartlab_mc"]:
        context = s["doc"]["question"]
        for choice, resp in zip(s["doc"]["choices"], s["resps"]):
            ctx, whole = tok.encode(context), tok.encode(context + " " + choice)
            with torch.no_grad():
                logits, _ = model(torch.tensor([whole[:-1]]), n_loops=6, **RULE)
            n = len(whole) - len(ctx)
            lp = F.log_softmax(logits[0].float(), -1)[-n:].gather(1, torch.tensor(whole[-n:])[:, None]).sum()
            assert resp[0][0] == pytest.approx(float(lp), abs=1e-4)


def test_cartlab_eval_stores_the_mean_loops_per_token_with_the_scores(run, capsys):
    args = ["eval", str(run["ckpt"]), "--tasks", "cartlab_mc", "--n-loops", "6", "--db", str(run["db"]),
            "--batch-size", "4", "--exit", "latent", "--exit-threshold", "0.2"]
    assert main(args) == 0
    ds = results.downstream(run["db"])
    ds = ds[(ds.task == "cartlab_mc") & (ds.exit_rule == "latent:0.2")]  # the rule is part of the protocol
    assert sorted(ds.metric) == ["acc", "acc_norm", "loops_per_token"] and ds.protocol.nunique() == 1
    loops = ds[ds.metric == "loops_per_token"].value.item()
    assert 1 <= loops <= 6 and (ds.n_loops == 6).all()


def test_bad_exit_arguments_are_refused(run, capsys):
    for args, message in (
        (["--exit", "halt"], "exit='halt' is not allowed"),
        (["--exit-threshold", "0.1"], "exit_threshold=0.1 is not allowed: a threshold needs an exit rule"),
        (["--exit", "argmax", "--exit-threshold", "0.5"], "exit_threshold=0.5 is not allowed for exit='argmax'"),
    ):
        assert main(["eval", str(run["ckpt"]), "--tasks", "cartlab_mc", "--db", str(run["db"]), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    with pytest.raises(ValueError, match=r"exit: 'learned' needs a checkpoint trained with the hook exit_head"):
        CartlabLM(checkpoint=str(run["ckpt"]), exit="learned")
