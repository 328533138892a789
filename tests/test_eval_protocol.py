"""The protocol is part of the score (issue 29, acceptance 3 and 5): every downstream row carries
how it was produced (`cartlab.eval.protocol`), a quick `--limit` look or an earlier checkpoint is
stored under its own protocol instead of standing in for the final weights on whole tasks, a
score table gives each protocol its own column, the pinned presets run (`local`) or fail at once
offline naming their tasks (`paper`), and a database from before protocols keeps its scores.
Offline: the tasks are the jsonl files of data/tasks/.
Run: pytest tests/test_eval_protocol.py
"""
from __future__ import annotations

import re
import sqlite3

import pytest
from conftest import copy_db, need

lm_eval = need("lm_eval")

from cartlab import results  # noqa: E402
from cartlab.cli import main  # noqa: E402
from cartlab.eval.protocol import describe, load_preset, score_table, sweeps  # noqa: E402
from cartlab.results.schema import PROTOCOL_COLUMNS  # noqa: E402

pytestmark = pytest.mark.usefixtures("hf_offline")


@pytest.fixture
def run(tiny_run, tmp_path):
    """The session's tiny trained run with a results database of its own to write into."""
    db = tmp_path / "results.db"
    copy_db(tiny_run.db, db)
    return {"run_id": tiny_run.run_id, "db": db, "dir": tiny_run.run_dir, "step": int(tiny_run.checkpoint.name[5:]),
            "R": tiny_run.config.model_config().n_loops}


def test_the_local_preset_stores_every_protocol_field_quietly(run, capsys):
    assert main(["eval", str(run["dir"]), "--preset", "local", "--limit", "4", "--quiet", "--db", str(run["db"])]) == 0
    captured = capsys.readouterr()
    assert "it/s" not in captured.err and "%|" not in captured.err, captured.err[-500:]  # no progress bar
    rows = results.downstream(run["db"])
    assert set(rows.task) == {"cartlab_mc", "cartlab_ppl"} and (rows.run_id == run["run_id"]).all()
    assert rows[list(PROTOCOL_COLUMNS)].notna().all().all(), rows[list(PROTOCOL_COLUMNS)].isna().sum()
    one = rows.iloc[0]
    assert (one.lm_eval_version, one.fewshot_seed, one.batch_size, one.limit_docs) == (lm_eval.__version__, 1234, 8, 4)
    assert (one.chat_template, one.system_prompt, one["dtype"], one.exit_rule) == ("none", "none", "float32", "fixed")
    assert one.step == run["step"] and one.num_fewshot == 0 and one.n_loops == run["R"]  # the trained R
    assert rows.protocol.nunique() == 1 and re.fullmatch(r"[0-9a-f]{12}", one.protocol)
    for task, group in rows.groupby("task"):  # each task's own version and config hash
        assert group.task_version.nunique() == 1 and re.fullmatch(r"[0-9a-f]{12}", group.task_hash.iloc[0])
    assert rows.groupby("task").task_hash.first().nunique() == 2
    assert "limit 4, float32, step" in describe(one.to_dict())


@pytest.mark.slow
def test_other_shots_and_a_quick_look_at_an_earlier_checkpoint_are_columns_of_their_own(run, capsys):
    """Two few-shot counts of the final weights, and a --limit look at an older checkpoint of one
    run: three protocols, three columns; the final weights' whole-task scores are kept as stored."""
    db, base = str(run["db"]), ["--tasks", "cartlab_mc", "--n-loops", "2", "--quiet"]
    assert main(["eval", str(run["dir"]), *base, "--num-fewshot", "0,1", "--db", db]) == 0
    whole = results.downstream(db)
    older = sorted((run["dir"] / "checkpoints").glob("step_*"))[0]
    assert main(["eval", str(older), *base, "--limit", "3", "--db", db]) == 0
    rows = results.downstream(db)
    assert rows.protocol.nunique() == 3 and len(rows) == 3 * len(whole) // 2
    final = rows[rows.protocol.isin(set(whole.protocol))].reset_index(drop=True)
    assert final[["protocol", "metric", "value"]].equals(whole[["protocol", "metric", "value"]])
    table, legend = score_table(rows)
    assert len(table.columns) == 3 and list(legend.column) == list(table.columns)
    step = int(older.name[5:])
    assert set(table.columns) == {f"0-shot R=2 (whole tasks, step {run['step']})", "1-shot R=2",
                                  f"0-shot R=2 (limit 3, step {step})"}, table.columns
    quick = legend.set_index("column").protocol[f"0-shot R=2 (limit 3, step {step})"]
    assert f"limit 3, float32, step {step}," in quick, quick
    assert len(sweeps(rows)) == 3  # a curve over R never mixes two of them
    capsys.readouterr()


def test_the_paper_preset_offline_fails_at_once_naming_every_task(run, capsys):
    spec = load_preset("paper")
    assert spec["tasks"] == ["hellaswag", "arc_challenge", "lambada_openai", "piqa"] and spec["num_fewshot"] == [0, 5]
    assert main(["eval", str(run["dir"]), "--preset", "paper", "--db", str(run["db"])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE is set" in err, err
    for task in spec["tasks"]:
        assert repr(task) in err, task
    assert results.downstream(run["db"]).empty


def test_a_misspelt_preset_is_one_line_naming_the_presets(run, capsys):
    assert main(["eval", str(run["dir"]), "--preset", "papr", "--db", str(run["db"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "--preset: 'papr' is not a protocol preset; allowed: local, paper, variable-r" in err
    assert main(["eval", "--list-presets"]) == 0
    assert re.search(r"^paper: hellaswag, arc_challenge, lambada_openai, piqa; shots \[0, 5\]", capsys.readouterr().out,
                     re.M)


def test_scores_stored_before_protocols_keep_their_rows_and_say_so(tmp_path):
    """A schema-4 database's downstream rows migrate with protocol '' and read as unrecorded."""
    from cartlab.results.db import ResultsDB

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    from cartlab.results.schema import MIGRATIONS

    for v in range(1, 5):
        con.executescript(MIGRATIONS[v])
    con.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT); "
                      "INSERT INTO meta VALUES ('schema_version', '4'); "
                      "INSERT INTO runs (run_id, name, status, created_at, updated_at) VALUES ('r', 'r', 'completed', "
                      "'t', 't'); INSERT INTO downstream VALUES ('r', 'piqa', 'acc', 0.6, 0.01, 0, 6, 't');")
    con.close()
    old = results.downstream(path)  # read-only: the older file is not changed
    assert old.protocol.tolist() == [""] and "protocol not recorded" in describe(old.iloc[0].to_dict())
    ResultsDB(path).close()  # a writable open migrates
    new = results.downstream(path)
    assert new[["task", "metric", "value", "num_fewshot", "n_loops", "protocol"]].values.tolist() == [
        ["piqa", "acc", 0.6, 0, 6, ""]]


@pytest.mark.slow
def test_local_tasks_load_as_lm_evals_own_task_manager_loads_them():
    """`cartlab eval` loads local tasks without lm-eval's index of its own tasks (`task_manager`,
    seconds saved per evaluation): the configs lm-eval runs, and so the stored task hashes, are
    the ones its default TaskManager (as simple_evaluate makes it) gives."""
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    from cartlab.eval.run import local_tasks, task_manager

    tasks, args = list(local_tasks().values()), "pretrained=run,n_loops=2"
    ours = task_manager(tasks, args).load(tasks)["tasks"]
    theirs = TaskManager(metadata=simple_parse_args_string(args)).load(tasks)["tasks"]
    assert set(ours) == {t["task"] for t in tasks}
    assert {n: t.dump_config() for n, t in ours.items()} == {n: t.dump_config() for n, t in theirs.items()}
    assert ours["cartlab_mc"].dump_config()["metadata"]["n_loops"] == 2  # the model args reach the tasks
