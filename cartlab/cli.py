"""The `cartlab` command line.

Each subcommand lives next to the code it drives, in a module with a
`register(subparsers)` function that adds its parser and sets `func` to a callable taking the
parsed arguments and returning an exit code. This file only lists those modules (`COMMANDS`,
with the one-line help `cartlab --help` shows) and imports just the one a command line names,
so `cartlab --help` and `cartlab --version` start at once, without torch or pandas.

Errors meet one boundary (`run_guarded`, also used by `python -m cartlab.eval`): a user error (a
bad config field, a file that is missing or not what it should be, an unwritable folder) is
printed as one line, `cartlab: error: ...`, with exit code 2; anything else as one line naming
the exception, with exit code 1. `--debug` (or CARTLAB_DEBUG=1) shows the traceback instead.

A reader that closes the output early (`cartlab ablate cpu-demo --list | head -1`) ends the
command quietly, as coreutils do: no `Broken pipe` and no traceback on stderr, and exit code 141
(128 + SIGPIPE, what `seq 100 | head -1` gives): the shell reports the pipeline's last command
(head's 0), and under `set -o pipefail` a command cut short is not taken for one that finished.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sqlite3
import sys

COMMANDS = {
    "model": ("cartlab.model.cli", "inspect model configs (parameters, FLOPs)"),
    "data": ("cartlab.data.cli", "build and inspect token bins"),
    "train": ("cartlab.train.cli", "train a CART or Dense model into the results database"),
    "ablate": ("cartlab.ablate", "train every run of a study (ablations/*.yaml) through train_variant"),
    "report": ("cartlab.report", "render the analysis report of a study (or of the paper)"),
    "results": ("cartlab.results.cli", "export the results database (parquet, CSV) or merge per-run shards into it"),
    "eval": ("cartlab.eval.cli", "evaluate a checkpoint with lm-eval (few-shot, variable R)"),
    "export": ("cartlab.export", "write a run or checkpoint as a transformers model folder (trust_remote_code)"),
    "demo": ("cartlab.demo", "train the cpu-demo study and render its report (offline, 7-8 min on 2 idle CPU cores)"),
}
"""command -> (module with its `register(subparsers)`, the one line `cartlab --help` lists)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line that points at --help (subcommands inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser: the full one of `command` (importing its module only), and a one-line entry
    for every other command (enough for `cartlab --help` and for naming a wrong command)."""
    from cartlab import __version__

    parser = OneLineParser(
        prog="cartlab",
        description="Train, ablate and analyse depth-recurrent language models (CART, Dense).",
        epilog="--debug (anywhere, or CARTLAB_DEBUG=1) shows a traceback instead of a one-line error. "
               "Built corpora and tokenizers go to the data root: CARTLAB_DATA_DIR, else CARTLAB_HOME/data, else "
               "the clone's data/ (./data for an installed cartlab); runs/ and reports/ go under the current folder.",
    )
    parser.add_argument("--version", action="version", version=f"cartlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, summary) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command a command line names: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    return run_guarded(lambda: _dispatch(argv), debug=debug)


def _dispatch(argv: list[str]) -> int:
    parser = build_parser(_command(argv))
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # FIELD=VALUE overrides may come after options: `cartlab train --quiet seed=2`
            if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
                args.overrides = list(args.overrides) + extra
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:  # --help, --version or a usage error (already printed)
        return done.code if isinstance(done.code, int) else 2
    return int(args.func(args) or 0)


USER_ERRORS = (ValueError, OSError, sqlite3.Error)
"""What a user can cause and fix: bad values (ConfigError is a ValueError), missing or unreadable
files, full disks, unwritable folders, files that are not databases."""


CLOSED_PIPE = 141
"""The exit code when stdout's reader went away (128 + SIGPIPE, as a tool killed by SIGPIPE)."""


def run_guarded(fn, *, debug: bool = False, prog: str = "cartlab") -> int:
    """Call `fn()` -> exit code; turn an exception into one line on stderr and an exit code, and a
    closed stdout into a quiet `CLOSED_PIPE`."""
    try:
        code = _guarded(fn, debug=debug, prog=prog)
        sys.stdout.flush()  # here, not at exit, where a closed pipe prints "Exception ignored"
        return code
    except BrokenPipeError:
        if not stdout_closed():  # another pipe (a subprocess, a kernel): an error like any other
            if debug or os.environ.get("CARTLAB_DEBUG", "") not in ("", "0"):
                raise
            print(f"{prog}: error: {one_line(sys.exc_info()[1])}", file=sys.stderr)
            return 2
        # the Python docs' recipe (library/signal, "Note on SIGPIPE"): point stdout at devnull so
        # the interpreter's last flush of what is still buffered does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return CLOSED_PIPE


def stdout_closed() -> bool:
    """True when nobody reads stdout any more (its pipe's read end is closed), or when that
    cannot be told (stdout is not a file descriptor: take the BrokenPipeError at its word)."""
    try:
        import select

        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no fileno (a captured stdout)
        return True


def _guarded(fn, *, debug: bool, prog: str) -> int:
    if debug or os.environ.get("CARTLAB_DEBUG", "") not in ("", "0"):
        return int(fn() or 0)
    try:
        return int(fn() or 0)
    except BrokenPipeError:  # before USER_ERRORS (it is an OSError): run_guarded decides
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: say what and where to look, without a wall of frames
        print(f"{prog}: internal error: {type(err).__name__}: {one_line(err)} "
              f"(run again with --debug or CARTLAB_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


if __name__ == "__main__":
    sys.exit(main())
