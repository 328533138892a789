"""`cartlab eval` follows lm-eval's habits (issue 17): `pretrained=PATH` names the checkpoint,
`--output-path`/`--log-samples` write lm-eval's results and samples files in a folder named after
that path, the device is chosen by capability, requests show a progress bar, and an impossible R
or few-shot count is refused in one line before anything is evaluated. Offline; tiny random
checkpoints with the tiny data build's tokenizer.

    python -m pytest -q tests/test_eval_conventions.py
"""
from __future__ import annotations

import json

import pytest
from conftest import need
import torch

lm_eval = need("lm_eval")

from lm_eval.utils import sanitize_model_name  # noqa: E402

from cartlab.cli import main  # noqa: E402
from cartlab.eval.cli import checkpoint_arg  # noqa: E402
from cartlab.eval.lm import CartlabLM, resolve_device  # noqa: E402
from cartlab.eval.run import local_tasks, preflight, resolve_tasks, task_manager  # noqa: E402
from cartlab.results.db import ResultsDB  # noqa: E402
from test_export import CART, write_checkpoint  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread", "hf_offline")]  # lm-eval runs


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data):
    """An unshared-core CART checkpoint (3 core blocks, so R <= 3) and a results database holding
    its run (the --limit evaluations are stored there, under a protocol that says so)."""
    root = tmp_path_factory.mktemp("conventions")
    ckpt = write_checkpoint(root / "unshared", {**CART, "hooks": ["unshare_core"]}, tiny_data)
    db = root / "results.db"
    store = ResultsDB(db)
    store.upsert_run(CartlabLM(checkpoint=str(ckpt)).run_id, status="completed")
    store.close()
    return {"ckpt": ckpt, "db": db}


@pytest.fixture
def evaluations(monkeypatch):
    """Every lm_eval.simple_evaluate call (run as usual)."""
    calls = []
    real = lm_eval.simple_evaluate

    def record(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", record)
    return calls


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("cartlab: error: ") and len(err.splitlines()) == 1, err
    return err


def test_an_impossible_loop_count_is_refused_before_any_evaluation(run, evaluations, capsys):
    args = ["eval", f"pretrained={run['ckpt']}", "--tasks", "cartlab_mc", "--n-loops", "2,3,4", "--db", str(run["db"])]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "--n-loops: R=4 cannot run on this checkpoint" in err and "allowed: 1..3" in err
    assert evaluations == []


def test_an_impossible_fewshot_count_is_refused_before_any_evaluation(run, evaluations, capsys, repo):
    n_docs = len((repo / "data" / "tasks" / "cartlab_ppl.jsonl").read_text().splitlines())
    args = ["eval", str(run["ckpt"]), "--tasks", "cartlab_mc,cartlab_ppl", "--num-fewshot", f"0,{n_docs + 1}",
            "--db", str(run["db"])]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert f"--num-fewshot: {n_docs + 1} examples cannot be drawn for task 'cartlab_ppl', which has {n_docs} " \
           f"few-shot documents; allowed: 0.." in err
    assert evaluations == []
    # the bound it states is the real one: lm-eval builds that many shots and no more
    most = int(err.rsplit("0..", 1)[1])
    lm = CartlabLM(checkpoint=str(run["ckpt"]))
    tasks = resolve_tasks(["cartlab_ppl"])
    preflight(lm, tasks, n_loops=[None], num_fewshot=[most])
    with pytest.raises(ValueError, match=f"allowed: 0..{most}$"):
        preflight(lm, tasks, n_loops=[None], num_fewshot=[most + 1])


def test_output_path_and_log_samples_write_lm_evals_files(run, tmp_path, capsys):
    out = tmp_path / "results"
    args = ["eval", f"pretrained={run['ckpt']}", "--tasks", "cartlab_mc", "--n-loops", "1,3", "--limit", "3",
            "--db", str(run["db"]), "--batch-size", "2", "--output-path", str(out), "--log-samples"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "0-shot R=1" in captured.out and "0-shot R=3" in captured.out
    assert "Running loglikelihood requests" in captured.err and "12/12" in captured.err  # 3 questions x 4 choices
    folder = out / sanitize_model_name(str(run["ckpt"]))  # named from pretrained=, as lm-eval names it
    results = sorted(folder.glob("results_*.json"))
    samples = sorted(folder.glob("samples_cartlab_mc_*.jsonl"))
    assert len(results) == 2 and len(samples) == 2
    loops = []
    for path in results:
        res = json.loads(path.read_text())
        assert 0.0 <= res["results"]["cartlab_mc"]["acc,none"] <= 1.0
        assert res["config"]["model_args"].startswith(f"pretrained={run['ckpt']},n_loops=")
        loops.append(int(res["config"]["model_args"].rsplit("=", 1)[1]))
    assert sorted(loops) == [1, 3]
    for path in samples:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [s["doc_id"] for s in lines] == [0, 1, 2] and all(len(s["resps"]) == 4 for s in lines)


def test_log_samples_needs_an_output_path(run, capsys):
    assert main(["eval", str(run["ckpt"]), "--tasks", "cartlab_mc", "--db", str(run["db"]), "--log-samples"]) == 2
    assert "--log-samples: the samples are written under --output-path" in one_line_error(capsys)


def test_the_device_is_chosen_by_capability_as_in_training(run, capsys):
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu" and resolve_device("mps") == "mps"  # other names taken as given
    assert CartlabLM(checkpoint=str(run["ckpt"]))._device.type == resolve_device("auto")
    if not torch.cuda.is_available():
        args = ["eval", str(run["ckpt"]), "--tasks", "cartlab_mc", "--device", "cuda", "--db", str(run["db"])]
        assert main(args) == 2
        assert "device='cuda' is not available on this machine" in one_line_error(capsys)


def test_pretrained_is_the_checkpoint_argument(run, tmp_path):
    assert checkpoint_arg(f"pretrained={run['ckpt']}") == str(run["ckpt"])
    assert checkpoint_arg(str(run["ckpt"])) == str(run["ckpt"])
    odd = tmp_path / "lr=3e-4"  # a folder whose name holds '=' is a path
    odd.mkdir()
    assert checkpoint_arg(str(odd)) == str(odd)
    with pytest.raises(ValueError, match="neither a path nor pretrained=PATH"):
        checkpoint_arg(f"pretrained={run['ckpt']},n_loops=2")
    lm = CartlabLM(pretrained=str(run["ckpt"]))
    assert lm.run_id == "test-unshared"
    with pytest.raises(ValueError, match="checkpoint=PATH or pretrained=PATH, not both"):
        CartlabLM(checkpoint=str(run["ckpt"]), pretrained=str(run["ckpt"]))
    tasks = [local_tasks()["cartlab_mc"]]
    res = lm_eval.simple_evaluate(model="cartlab", model_args=f"pretrained={run['ckpt']},n_loops=2", tasks=tasks,
                                  task_manager=task_manager(tasks), limit=1, bootstrap_iters=0)
    assert "acc,none" in res["results"]["cartlab_mc"]
