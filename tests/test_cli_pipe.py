"""Every `cartlab` command ends quietly when its reader closes the pipe early.

Guards: `cartlab ablate cpu-demo --list | head -1` prints one line, nothing on stderr (no
`Broken pipe`, no traceback) and exits 141 (128 + SIGPIPE, `cartlab.cli.CLOSED_PIPE`) when
the reader left before the command finished writing; `cartlab --help` into a pipe nobody reads is
as quiet; a BrokenPipeError from another pipe while stdout is fine stays a one-line error.
Run: pytest tests/test_cli_pipe.py
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cartlab.cli import CLOSED_PIPE

CLI = [sys.executable, "-m", "cartlab.cli"]


def _into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """Run with stdout a pipe whose reader is gone before the first write."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([*CLI, *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)


def test_list_into_head_prints_one_line_and_nothing_on_stderr(tmp_path):
    cmd = " ".join(CLI) + f" ablate cpu-demo --list --db {tmp_path / 'r.db'} | head -1; exit ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("pending"), proc.stdout
    assert proc.stderr == ""
    assert proc.returncode in (0, CLOSED_PIPE)  # 0 when head read everything before it exited


@pytest.mark.slow
def test_a_reader_gone_before_the_first_write_is_a_quiet_141(tmp_path):
    proc = _into_closed_pipe("ablate", "cpu-demo", "--list", "--db", str(tmp_path / "r.db"))
    assert proc.stderr == "" and proc.returncode == CLOSED_PIPE
    assert list(tmp_path.iterdir()) == []
    proc = _into_closed_pipe("--help")  # argparse swallows its own write error: quiet, and 0 or 141
    assert proc.stderr == "" and proc.returncode in (0, CLOSED_PIPE)


def test_a_broken_pipe_elsewhere_is_still_an_error():
    code = ("import sys\nfrom cartlab.cli import run_guarded\n"
            "def fn():\n    raise BrokenPipeError(32, 'Broken pipe')\n"
            "sys.exit(run_guarded(fn))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "cartlab: error: [Errno 32] Broken pipe"
