"""Experiment trackers (issue 18, acceptance 2): with the real packages and offline, a tiny run's
mirror in MLflow's SQLite store, in W&B's offline run file and in trackio's local store equals
the results database step by step; a resumed run continues its tracker run; a tracker that
fails never stops training; a tracker without its package is one line before anything trains.
Run: pytest tests/test_trackers.py
"""
from __future__ import annotations

import importlib.util
import json
import struct
import warnings
from pathlib import Path

import pytest
from conftest import need

from cartlab import results, trackers
from cartlab.config import ConfigError
from cartlab.train import TrainConfig, train
from train_helpers import tiny_config

TRAIN_KEYS = ("loss", "grad_norm", "lr", "tokens_per_s", "flops")
SHORT = dict(steps=4, eval_every=2, checkpoint_every=2, measures=[])  # evals and checkpoints at steps 2 and 4


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No tracker may reach a server: W&B offline, MLflow's telemetry off, stores under tmp."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    (tmp_path / "wandb_dir").mkdir()


def expected_series(db, run_id) -> dict[str, list[tuple[int, float]]]:
    """What the results database holds of the run, as the tracker's metric names -> [(step, value)]."""
    log, ev = results.train_log(db, [run_id]), results.eval_log(db, [run_id])
    out = {f"train/{k}": [(int(s), float(v)) for s, v in zip(log.step, log[k])] for k in TRAIN_KEYS}
    for split, grp in ev.groupby("split"):
        for k in ("loss", "ppl"):
            out[f"val/{split}/{k}"] = [(int(s), float(v)) for s, v in zip(grp.step, grp[k])]
    return out


def final_from_db(db, run_id) -> dict[str, float]:
    log, ev = results.train_log(db, [run_id]), results.eval_log(db, [run_id])
    last = ev[ev.step == ev.step.max()]
    return {"final/step": float(results.runs(db).set_index("run_id").step[run_id]),
            "final/train/loss": float(log.loss.iloc[-1]),
            **{f"final/val/{r.split}/{k}": float(getattr(r, k)) for r in last.itertuples() for k in ("loss", "ppl")}}


# -- MLflow ----------------------------------------------------------------------------------------------------
def test_mlflow_store_equals_the_results_database_and_a_resume_continues_its_run(tiny_data, tmp_path, monkeypatch):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    import cartlab.train.loop as loop

    cfg = tiny_config(tiny_data, tmp_path, tracker="mlflow", stage="s" * 7000, **SHORT)  # a param MLflow must cut
    db = tmp_path / "results.db"
    real = loop.lr_at

    def crash_after_step_2(step, c):  # right after the checkpoint of step 2: nothing past it is logged
        if step == 2:
            raise RuntimeError("simulated crash")
        return real(step, c)

    monkeypatch.setattr(loop, "lr_at", crash_after_step_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    run_id = cfg.run_name()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default: next to the results database
    exp = client.get_experiment_by_name("cartlab")
    (first,) = client.search_runs([exp.experiment_id])
    assert first.info.status == "FAILED" and first.data.tags["cartlab.status"] == "failed"

    monkeypatch.setattr(loop, "lr_at", real)
    assert train(cfg) == run_id  # resumes from the checkpoint of step 2
    (run,) = client.search_runs([exp.experiment_id])  # the same MLflow run, continued
    assert run.info.run_id == first.info.run_id and run.info.run_name == run_id
    assert run.info.status == "FINISHED" and run.data.tags["cartlab.status"] == "completed"
    assert run.data.tags["cartlab.run_id"] == run_id

    expected = expected_series(db, run_id)
    assert [s for s, _ in expected["train/loss"]] == [1, 2, 3, 4]
    assert len(expected) == len(TRAIN_KEYS) + 2 * 3  # three validation domains
    for key, series in expected.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == series, key
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("final/")} == final_from_db(db, run_id)

    params = run.data.params
    assert params["model.d_model"] == "32" and params["optim.lr"] == "0.003" and params["steps"] == "4"
    assert params["tracker"] == "mlflow" and params["variant"] == results.runs(db).variant[0]
    assert params["stage"] == "s" * 5997 + "..."


def test_mlflow_params_are_flattened_within_mlflow_limits():
    config = {"model": {"hooks": ["no_lti"], "d_model": 64}, "grad_clip": None, "note": "x" * 7000, "k" * 300: 1}
    params = trackers.mlflow_params(config)
    assert params == {"model.hooks": '["no_lti"]', "model.d_model": "64", "grad_clip": "null",
                      "note": "x" * 5997 + "..."}


# -- W&B -------------------------------------------------------------------------------------------------------
BLOCK, FULL, LAST = 32768, 1, 4


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (`run-<id>.wandb`, what `wandb sync` uploads), parsed with
    W&B's own protobuf schema: a 7-byte file header (':W&B', 0xBEE1, version 0), then LevelDB's
    log format: 32 KiB blocks of chunks with a 7-byte header (crc32c, length, type FULL, FIRST,
    MIDDLE or LAST); a block's tail shorter than a header is zero padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # preallocated zeros: the end of what was written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def test_wandb_offline_run_equals_the_results_database(tiny_data, tmp_path):
    need("wandb")
    cfg = tiny_config(tiny_data, tmp_path, tracker="wandb", tracker_project="cartlab-test", **SHORT)
    run_id = train(cfg)
    (run_file,) = (tmp_path / "wandb_dir").glob(f"wandb/offline-run-*/run-{run_id}.wandb")
    records = wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id and run.display_name == run_id and run.project == "cartlab-test"

    history: dict[str, list] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = _items(r.history.item)
            for key, value in row.items():
                if not key.startswith("_"):
                    history.setdefault(key, []).append((row["_step"], value))
    db = tmp_path / "results.db"
    expected = expected_series(db, run_id)
    for key, series in expected.items():
        assert sorted(history[key]) == series, key

    config = _items(run.config.update)
    assert config["model"]["d_model"] == 32 and config["steps"] == 4 and config["tracker_project"] == "cartlab-test"

    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert summary["status"] == "completed"
    assert {k: v for k, v in summary.items() if k.startswith("final/")} == final_from_db(db, run_id)
    assert "exit" in kinds and [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]


def test_trackio_implements_the_same_api(tiny_data, tmp_path, monkeypatch):
    need("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import trackio.sqlite_storage as storage
    import trackio.utils

    monkeypatch.setattr(trackio.utils, "TRACKIO_DIR", tmp_path / "trackio")  # read at its import
    monkeypatch.setattr(storage, "TRACKIO_DIR", tmp_path / "trackio")
    cfg = tiny_config(tiny_data, tmp_path, tracker="trackio", **SHORT)
    run_id = train(cfg)
    logs = storage.SQLiteStorage.get_logs("cartlab", run_id)
    history: dict[str, list] = {}
    for row in logs:
        for key, value in row.items():
            if key not in ("step", "timestamp"):
                history.setdefault(key, []).append((row["step"], value))
    db = tmp_path / "results.db"
    for key, series in expected_series(db, run_id).items():
        assert sorted(history[key]) == series, key
    assert {k: v[-1][1] for k, v in history.items() if k.startswith("final/")} == final_from_db(db, run_id)
    assert storage.SQLiteStorage.get_run_config("cartlab", run_id)["model"]["d_model"] == 32


# -- failures --------------------------------------------------------------------------------------------------
class Flaky:
    """A tracker whose `fail_at` method raises as a dead network would."""

    def __init__(self, fail_at: str):
        self.fail_at, self.calls = fail_at, []

    def _call(self, name, *args):
        self.calls.append(name)
        if name == self.fail_at:
            raise ConnectionError("network is unreachable")

    def start(self, run_id, config):
        self._call("start")

    def log_train(self, step, row):
        self._call("log_train")

    def log_eval(self, step, results):
        self._call("log_eval")

    def finish(self, status, final):
        self._call("finish")


def tracker_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "tracker=" in str(w.message)]


def test_a_failing_tracker_never_stops_or_changes_training(tiny_data, tmp_path, monkeypatch):
    flaky = Flaky("log_train")
    monkeypatch.setattr(trackers, "make_tracker", lambda cfg: flaky)
    cfg = tiny_config(tiny_data, tmp_path, steps=2, eval_every=2, checkpoint_every=2, measures=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_id = train(cfg)
    (said,) = tracker_warnings(caught)
    assert "network is unreachable" in said and "off for the rest of this run" in said
    assert flaky.calls == ["start", "log_train"]  # nothing is sent after the failure
    runs = results.runs(tmp_path / "results.db")
    assert runs.status.tolist() == ["completed"] and runs.run_id.tolist() == [run_id]
    assert results.train_log(tmp_path / "results.db").step.tolist() == [1, 2]


@pytest.mark.parametrize("fail_at", ["start", "log_eval", "finish"])
def test_the_mirror_warns_once_and_turns_a_failing_tracker_off(tmp_path, monkeypatch, fail_at):
    from cartlab.results.db import ResultsDB

    flaky = Flaky(fail_at)
    monkeypatch.setattr(trackers, "make_tracker", lambda cfg: flaky)
    db = ResultsDB(tmp_path / "r.db")
    db.upsert_run("r", step=2)
    mirror = trackers.Mirror(TrainConfig(), db)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mirror.start("r", {})
        for step in (1, 2):
            mirror.log_train(step, {"step": step, "loss": 1.0})
            mirror.log_eval(step, {"prose": {"loss": 1.0, "ppl": 2.7}})
        mirror.finish("completed")
    db.close()
    assert len(tracker_warnings(caught)) == 1
    assert flaky.calls[-1] == fail_at and flaky.calls.count(fail_at) == 1
    assert trackers.Mirror(TrainConfig(), None, on=False).tracker is None  # ranks other than 0 have none


def test_a_tracker_without_its_package_is_one_line_before_training(tiny_data, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        tiny_config(tiny_data, tmp_path, tracker="mlflow")
    assert str(err.value) == ("tracker='mlflow' is not allowed: needs the 'mlflow' package: "
                              "pip install cartlab[trackers]")
    from cartlab.cli import main

    assert main(["train", "--preset", "smoke", "tracker=mlflow", f"results_db={tmp_path / 'r.db'}"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "pip install cartlab[trackers]" in stderr
    assert not (tmp_path / "r.db").exists()


def test_tracker_fields_are_operational():
    """Turning a tracker on changes neither the run's name nor its identity (a run can be resumed
    with a tracker it did not have)."""
    plain = TrainConfig.from_preset("smoke")
    tracked = TrainConfig.from_preset("smoke", ["tracker=wandb", "tracker_project=p", "tracking_uri=http://x"])
    assert tracked.run_name() == plain.run_name() and tracked.variant() == plain.variant()
    assert "tracker" not in plain.to_dict() and tracked.to_dict()["tracker"] == "wandb"
