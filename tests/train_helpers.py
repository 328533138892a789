"""Helpers shared by the training tests (a tiny run config, a child process that dies on cue)."""
from __future__ import annotations

import os
import signal

from cartlab.train import TrainConfig

TINY_MODEL = {"kind": "cart", "vocab_size": 512, "d_model": 32, "n_heads": 4, "prelude_layers": 2, "n_loops": 3,
              "ffn_multiple_of": 16}


def tiny_config(data_dir, out, **kw) -> TrainConfig:
    base = dict(model=TINY_MODEL, data={"dir": str(data_dir)}, steps=12, seq_len=32, batch_size=4, grad_accum=2,
                log_every=1, eval_every=4, eval_batches=2, eval_batch_size=2, checkpoint_every=4,
                keep_checkpoints=2, results_db=str(out / "results.db"), out_dir=str(out), quiet=True,
                optim={"lr": 3e-3, "warmup_steps": 2, "name": "adamw"}, device="cpu",
                measures=[])  # the measures have their own tests (test_depth_profile, test_loop_measures, ...)
    base.update(kw)
    return TrainConfig.from_dict(base)


def train_and_signal(config: dict, at_step: int, signum: int) -> None:
    """Child-process target: train, and send ourselves `signum` when update `at_step` begins."""
    import cartlab.train.loop as loop

    real = loop.lr_at

    def lr_at(step, cfg):
        if step == at_step:
            os.kill(os.getpid(), signum)
        return real(step, cfg)

    loop.lr_at = lr_at
    try:
        loop.train(TrainConfig.from_dict(config))
    except loop.TrainingInterrupted:
        os._exit(130)


SIGKILL, SIGTERM = signal.SIGKILL, signal.SIGTERM
