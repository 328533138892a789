"""`cartlab export`: a run or checkpoint as a transformers model folder (trust_remote_code), so it
travels where cartlab is not installed: the Hugging Face Hub, `AutoModelForCausalLM`, plain lm-eval.

    cartlab export runs/RUN --out exported/RUN
    AutoModelForCausalLM.from_pretrained("exported/RUN", trust_remote_code=True)   # in Python, no cartlab needed
    lm_eval --model hf --model_args pretrained=exported/RUN,trust_remote_code=True --tasks cartlab_mc \\
        --include_path data/tasks                                          # n_loops=R in model_args for CART
    cartlab eval exported/RUN --tasks cartlab_mc --exit kl             # lm-eval's hf model, rows stored in the db

The folder's modeling file is generated from cartlab's own model modules (`bundle`) plus the
transformers wrapper (`hf`); `write` writes the folder and checks that the exported model's logits
equal the checkpoint's before it takes the folder's place.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds files")
    p.add_argument("--db", default="runs/results.db",
                   help="results database whose downstream scores of the run (with their protocols) the model card "
                        "lists (default runs/results.db; none listed when it does not exist)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read a checkpoint's state.pt / dcp/.metadata with plain pickle if the safe reader refuses it (a checkpoint written before cartlab stored them pickle-free): this runs any code the files carry, so give it only for checkpoints you trust")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cartlab.checkpoint import trusting
    from cartlab.export.write import export

    with trusting(args.trust_checkpoint):
        export(args.checkpoint, args.out, force=args.force, db=args.db)
    return 0
