"""The trainer's edges (issue 12, "nothing left behind, nothing lost"): an out dir or database
location that takes no files fails before step 1 in one line and leaves no run `running`; a
checkpoint save that fails leaves no temporary folder and the earlier checkpoints intact; the
temporary folders of killed processes are removed when a run starts (a live one's are kept);
weights that do not fit their config are refused in one line naming what differs; the run row
records the variant. Run: pytest tests/test_train_edges.py
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cartlab import checkpoint as ckpt_read
from cartlab import results
from cartlab.config import ConfigError
from cartlab.model import LMConfig, build_model
from cartlab.train import train
from cartlab.train import checkpoint
from train_helpers import TINY_MODEL, tiny_config


def _afile(tmp_path: Path) -> Path:
    f = tmp_path / "afile"
    f.write_text("a regular file: nothing can be created under it, not even by root")
    return f


def _no_steps(monkeypatch):
    """Fail the test if any training step starts."""
    import cartlab.train.loop as loop

    def refuse(step, cfg):
        raise AssertionError(f"step {step + 1} started")

    monkeypatch.setattr(loop, "lr_at", refuse)


def test_unwritable_out_dir_fails_before_step_one(tiny_data, tmp_path, monkeypatch):
    _no_steps(monkeypatch)
    out = _afile(tmp_path) / "runs"
    cfg = tiny_config(tiny_data, tmp_path, out_dir=str(out))
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith("out_dir=") and str(out) in message, message
    assert "not writable" in message
    assert not Path(cfg.results_db).exists()  # refused before the database is opened: no row, no file


def test_unwritable_database_location_fails_before_step_one(tiny_data, tmp_path, monkeypatch):
    _no_steps(monkeypatch)
    db = _afile(tmp_path) / "results.db"
    cfg = tiny_config(tiny_data, tmp_path, results_db=str(db))
    with pytest.raises(ConfigError, match=r"^results_db=.*afile/results.db.* is not writable"):
        train(cfg)


def test_cli_says_unwritable_out_dir_in_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    from cartlab import cli

    _no_steps(monkeypatch)
    out = _afile(tmp_path) / "runs"
    code = cli.main(["train", "--preset", "smoke", "--quiet", f"data.dir={tiny_data}", "model.vocab_size=512",
                     f"results_db={tmp_path / 'r.db'}", f"out_dir={out}"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cartlab: error: out_dir='{out}' is not writable"), lines
    assert not (tmp_path / "r.db").exists()


def test_a_failed_save_leaves_no_tmp_folder_and_earlier_checkpoints_intact(tiny_data, tmp_path, monkeypatch):
    real = checkpoint.save_model
    calls = []

    def full_disk(model, filename):
        calls.append(filename)
        if len(calls) == 1:
            return real(model, filename)
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_model", full_disk)
    cfg = tiny_config(tiny_data, tmp_path, steps=8)
    run_id = cfg.run_name()
    with pytest.raises(OSError, match=r"no space left on .*/checkpoints \(checkpoint of about \d+ MB\)"):
        train(cfg)
    ckpt_dir = tmp_path / run_id / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000004"]  # no .tmp_step_* left
    state = ckpt_read.load(ckpt_dir / "step_00000004", build_model(cfg.model_config()))
    assert state["step"] == 4
    run = results.runs(cfg.results_db).set_index("run_id").loc[run_id]
    assert run.status == "failed" and "no space left on" in run.message
    arts = results.artifacts(cfg.results_db, [run_id])
    assert [Path(p).name for p in arts.path] == ["step_00000004"]


def test_stale_tmp_folders_of_dead_processes_are_removed_when_a_run_starts(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, steps=2, checkpoint_every=2)
    ckpt_dir = tmp_path / cfg.run_name() / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        stale = ckpt_dir / f".tmp_step_00000004_{dead.pid}"
        busy = ckpt_dir / f".tmp_step_00000004_{live.pid}"
        for folder in (stale, busy):
            folder.mkdir(parents=True)
            (folder / "model.safetensors").write_bytes(b"partial")
        train(cfg)
        assert not stale.exists()
        assert busy.is_dir()  # another live process may still be writing it
    finally:
        live.kill()
        live.wait()
    assert checkpoint.remove_stale_tmp(ckpt_dir) == [busy]  # now its process is gone too


def test_the_run_row_records_its_variant(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, steps=1, checkpoint_every=1, model={**TINY_MODEL, "hooks": ["no_lti"]})
    run_id = train(cfg)
    row = results.runs(cfg.results_db).set_index("run_id").loc[run_id]
    want = cfg.variant_fields()
    assert (row.variant, row.overrides, row.variant_label) == (want["variant"], want["overrides"],
                                                               want["variant_label"])
    assert "[no_lti]" in row.variant_label


@pytest.fixture(scope="module")
def one_checkpoint(tiny_run):
    """The newest checkpoint of the session's tiny run (conftest): copy it before changing it."""
    return tiny_run.checkpoint


def test_weights_that_do_not_fit_an_edited_config_are_refused_in_one_line(one_checkpoint, tmp_path):
    import shutil

    path = tmp_path / "edited"
    shutil.copytree(one_checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    config["model"]["d_model"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        ckpt_read.build(path)
    message = str(err.value)
    assert "\n" not in message and len(message) < 1000, message
    assert f"checkpoint {path} does not fit" in message
    assert "was config.json edited?" in message
    assert re.search(r"\[\d+, 32\] in the checkpoint, \[\d+, 64\] in the model", message), message


def test_a_model_built_from_another_config_names_the_fields_that_differ(one_checkpoint):
    saved = ckpt_read.load_config(one_checkpoint)["model"]
    other = build_model(LMConfig.from_dict({**saved, "prelude_layers": 3, "d_model": 64}))
    with pytest.raises(ValueError) as err:
        ckpt_read.load(one_checkpoint, other)
    message = str(err.value)
    assert "\n" not in message
    assert "d_model=32 vs 64" in message and "prelude_layers=2 vs 3" in message
    assert "missing from the checkpoint" in message or "in the checkpoint," in message


def test_a_fitting_checkpoint_loads_its_weights(one_checkpoint):
    from safetensors.torch import load_file

    model, config = ckpt_read.build(one_checkpoint)
    stored = load_file(str(one_checkpoint / "model.safetensors"))
    state = model.state_dict()
    assert config["model"] == model.config.to_dict()
    assert all(torch.equal(state[k], v) for k, v in stored.items())


def test_a_checkpoint_folder_name_gives_its_step(tiny_run):
    """`checkpoint.step_of`: what `cartlab eval` stores with a score and the model card states."""
    assert ckpt_read.step_of(tiny_run.checkpoint) == 12  # the tiny run's newest, step_00000012
    assert ckpt_read.step_of("step_00000040") == 40
    for other in ("final", "step_", "step_12a", tiny_run.run_dir):
        assert ckpt_read.step_of(other) is None, other
