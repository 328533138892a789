"""Exact resume (training issue, acceptance 1): N steps, a stop, and a resume give the same
losses and the same weights, bit for bit, as uninterrupted training; after SIGTERM (graceful:
checkpoint + 'interrupted') and after SIGKILL between checkpoints (resume from the last
checkpoint, no duplicate log rows). Run: pytest tests/test_train_resume.py
"""
import multiprocessing as mp

import pytest
import torch
from safetensors.torch import load_file

from cartlab import results
from cartlab.train import train
from cartlab.train.checkpoint import latest
from train_helpers import SIGKILL, SIGTERM, tiny_config, train_and_signal


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(tiny_data, out)
    run_id = train(cfg)
    return cfg, run_id


def weights(cfg, run_id):
    from pathlib import Path

    return load_file(str(latest(Path(cfg.out_dir) / run_id / "checkpoints") / "model.safetensors"))


def logs(cfg, run_id):
    return results.train_log(cfg.results_db, [run_id]), results.eval_log(cfg.results_db, [run_id])


@pytest.mark.parametrize("signum, at_step", [(SIGTERM, 5), (SIGKILL, 6)], ids=["sigterm", "sigkill"])
def test_stop_and_resume_equals_uninterrupted(uninterrupted, tiny_data, tmp_path, signum, at_step):
    ref_cfg, run_id = uninterrupted
    cfg = tiny_config(tiny_data, tmp_path)
    assert cfg.run_name() == run_id
    child = mp.get_context("spawn").Process(target=train_and_signal, args=(cfg.to_dict(), at_step, signum))
    child.start()
    child.join(120)
    assert child.exitcode == (130 if signum == SIGTERM else -SIGKILL)

    run = results.runs(cfg.results_db).set_index("run_id").loc[run_id]
    if signum == SIGTERM:  # finished update at_step, checkpointed it, said why
        assert run.status == "interrupted" and "SIGTERM" in run.message
        assert latest(tmp_path / run_id / "checkpoints").name == f"step_{at_step + 1:08d}"
    else:  # died mid-run: still 'running', last checkpoint at step 4, log rows beyond it
        assert run.status == "running"
        assert latest(tmp_path / run_id / "checkpoints").name == "step_00000004"
        assert results.train_log(cfg.results_db, [run_id]).step.max() > 4

    assert train(cfg, resume=run_id) == run_id
    assert results.runs(cfg.results_db).set_index("run_id").loc[run_id].status == "completed"
    (train_a, eval_a), (train_b, eval_b) = logs(ref_cfg, run_id), logs(cfg, run_id)
    assert list(train_b.step) == list(range(1, 13))  # every step once, no duplicates
    assert train_a.loss.tolist() == train_b.loss.tolist()  # bit for bit
    assert train_a.grad_norm.tolist() == train_b.grad_norm.tolist()
    assert eval_a[["step", "split", "loss"]].values.tolist() == eval_b[["step", "split", "loss"]].values.tolist()
    wa, wb = weights(ref_cfg, run_id), weights(cfg, run_id)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_rerunning_a_completed_run_does_nothing(uninterrupted, capsys):
    cfg, run_id = uninterrupted
    before = results.train_log(cfg.results_db, [run_id])
    assert train(cfg) == run_id
    assert "already completed" in capsys.readouterr().out
    assert results.train_log(cfg.results_db, [run_id]).equals(before)


def test_checkpoints_keep_last_n_and_are_registered(uninterrupted):
    from pathlib import Path

    cfg, run_id = uninterrupted
    kept = sorted(p.name for p in (Path(cfg.out_dir) / run_id / "checkpoints").iterdir())
    assert kept == ["step_00000008", "step_00000012"]
    arts = results.artifacts(cfg.results_db, [run_id])
    assert set(arts.kind) == {"checkpoint"}
    # pruned checkpoints leave the table with their folders: the rows name exactly the kept ones
    assert sorted(Path(p).name for p in arts.path) == kept
    assert sorted(arts.step) == [8, 12]


def test_checkpoint_carries_its_tokenizer(uninterrupted, tiny_data):
    from pathlib import Path

    from cartlab.data import get_tokenizer, load_meta
    from cartlab.train.checkpoint import load_config, load_tokenizer

    cfg, run_id = uninterrupted
    ckpt = latest(Path(cfg.out_dir) / run_id / "checkpoints")
    tok = load_tokenizer(ckpt)
    assert tok.hash == get_tokenizer(load_meta(tiny_data)).hash
    assert tok.decode(tok.encode("Let a = 5. What is a?")) == "Let a = 5. What is a?"
    assert load_config(ckpt)["run_id"] == run_id
