"""The command line as a user meets it: fast help, a version, what `cartlab train` prints.

    pytest tests/test_cli.py
"""
from __future__ import annotations

import subprocess
import sys

from cartlab import __version__, cli

PROBE = """
import sys
from cartlab.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "pandas", "numpy", "lm_eval", "transformers") if m in sys.modules)
print("IMPORTED:" + ",".join(heavy))
sys.exit(code)
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)


def test_help_and_version_import_no_torch():
    for args in (("--help",), ("--version",)):
        proc = _run(*args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().endswith("IMPORTED:"), proc.stdout[-300:]
    assert f"cartlab {__version__}" in _run("--version").stdout


def test_help_lists_every_command_and_a_wrong_command_is_one_line():
    out = _run("--help").stdout
    for name, (_, summary) in cli.COMMANDS.items():
        assert name in out and summary.split()[0] in out
    proc = _run("trian")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "invalid choice: 'trian'" in proc.stderr


def test_each_command_builds_its_own_parser():
    """Every command's module registers under its name (a typo in COMMANDS would only show when
    that command is run)."""
    for name in cli.COMMANDS:
        parser = cli.build_parser(name)
        sub = next(a for a in parser._actions if a.dest == "command")
        real = sub.choices[name]
        assert real.add_help and real.description, name  # the module's parser, not the listing's stub


def test_quiet_is_the_one_progress_switch():
    for name in ("train", "ablate", "data", "demo"):
        help_text = subprocess.run([sys.executable, "-m", "cartlab.cli", name, *(("build",) if name == "data" else ()),
                                    "--help"], capture_output=True, text=True, timeout=120).stdout
        assert "--quiet" in help_text and "--no-progress" not in help_text, name


def test_train_prints_validation_at_each_eval_and_a_closing_summary(tiny_data, tmp_path, capsys):
    from train_helpers import TINY_MODEL

    args = ["train", "--preset", "smoke", f"model.vocab_size={TINY_MODEL['vocab_size']}", "model.d_model=32",
            f"data.dir={tiny_data}", "steps=8", "eval_every=4", "eval_batches=2", "seq_len=32", "batch_size=4",
            f"results_db={tmp_path / 'r.db'}", f"out_dir={tmp_path / 'runs'}", "device=cpu"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    evals = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in evals] == ["step 4", "step 8"]
    assert all(" | val " in line and "(ppl " in line for line in evals)
    assert "completed at step 8" in out
    assert "checkpoint: " in out and "step_00000008" in out
    assert "next: cartlab eval " in out and "cartlab report " in out


def test_ablate_watches_the_steps_of_running_runs(tmp_path):
    """`cartlab ablate` shows progress inside each run by reading the newest logged step of the
    runs being trained (in notebook kernels) from the results database, read-only."""
    from cartlab.ablate import StepWatcher
    from cartlab.results.db import ResultsDB

    path = tmp_path / "r.db"
    seen = []
    watcher = StepWatcher(path, seen.append, interval=0.01)
    watcher.active = {"a", "b"}
    assert watcher.steps() == {}  # no database yet: nothing to show, no error
    db = ResultsDB(path)
    for rid in ("a", "b", "c"):
        db.upsert_run(rid)
    db.log_train("a", [{"step": s, "loss": 1.0} for s in (10, 20, 30)])
    db.log_train("c", [{"step": 50, "loss": 1.0}])
    assert watcher.steps() == {"a": 30}  # only the active runs; b has logged nothing yet
    with watcher:
        db.log_train("b", [{"step": 5, "loss": 1.0}])
        import time

        deadline = time.time() + 10
        while not any(s.get("b") == 5 for s in seen) and time.time() < deadline:
            time.sleep(0.01)
    db.close()
    assert any(s == {"a": 30, "b": 5} for s in seen)
