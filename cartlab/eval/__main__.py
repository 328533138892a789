"""lm-evaluation-harness's own command line with the `cartlab` model registered. From the
repository root (the local tasks of data/tasks name their files relative to it):

    python -m cartlab.eval run --model cartlab --model_args checkpoint=runs/RUN,n_loops=8 \\
        --tasks cartlab_mc,cartlab_ppl --include_path data/tasks --device cpu --batch_size 8

Every flag is lm-eval's (`python -m cartlab.eval run --help`), plus `--debug`; errors are one line as
for `cartlab`; `cartlab eval` is the shortcut that
also sweeps R and few-shot counts and stores the metrics in the results database.
"""
import sys

import cartlab.eval.lm  # noqa: F401  (registers the "cartlab" model with lm-eval)
from cartlab.cli import run_guarded
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    sys.exit(run_guarded(cli_evaluate, debug=debug, prog="python -m cartlab.eval"))
