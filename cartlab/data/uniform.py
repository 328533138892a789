"""Uniformly random symbols, each written twice: the data of the causal-leak study (section 3.4).

A document is a run of space-separated one-character symbols, drawn independently and uniformly
from `alphabet` (default: a-z and 0-9, 36 symbols), each written `repeat` times in a row:

    " k k 7 7 q q 0 0 b b ..."      (repeat=2)

What a causal model can learn: a repeated copy is predictable once the model knows whether the
current symbol is a first or a second copy (it must look one token back), a fresh symbol is not
predictable at all. Its best loss is ln|alphabet| / repeat nats per token (`causal_floor`: 1.79
for the defaults). A model whose cross-attention sees the future (paper section 3.4) can read the
fresh symbol off the anchor of the next position and drive its loss towards 0.

Why the repeats: on purely uniform symbols (repeat=1) nothing teaches the prelude to look back one
token, and that previous-token feature is what lets position t single out position t+1 among the
unmasked anchor keys (cross-attention has no positions of its own). Measured on a laptop: with
repeat=1 the non-causal model's loss did not move off ln|alphabet| in 1,000 steps at the cpu-demo
size; with repeat=2 it collapsed within a few hundred (ablations/causal-leak.yaml). Natural text
teaches previous-token heads too, which is how the paper's run found the leak after ~1,750 steps.

Tokens. The byte-level pre-tokeniser cuts " k k 7" into " k", " k", " 7": one piece per symbol,
which is one token wherever the BPE has the merge space+symbol. The embedded tokenizer trains on
these documents too (every embedded generator feeds it), where those pairs are the most frequent
ones, so it has them; `tests/test_data_uniform.py` checks it.
"""
from __future__ import annotations

import math
import random
import string
from typing import Iterator

ALPHABET = string.ascii_lowercase + string.digits


def _check(alphabet: str, repeat: int, length: int | None = None) -> None:
    if not isinstance(alphabet, str) or len(alphabet) < 2 or len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet must be a string of at least 2 distinct characters, got {alphabet!r}")
    bad = [c for c in alphabet if not (c.isascii() and c.isalnum())]
    if bad:
        raise ValueError(f"alphabet may hold ASCII letters and digits only (one pre-token each after a "
                         f"space), got {bad}")
    for name, value in (("repeat", repeat), ("length", length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def uniform_documents(seed: int = 0, length: int = 512, alphabet: str = ALPHABET, repeat: int = 2) -> Iterator[str]:
    """An endless, seeded stream of documents of `length` symbols (" k k 7 7 ..."): fresh uniform
    draws from `alphabet`, each written `repeat` times."""
    _check(alphabet, repeat, length)
    rng = random.Random(f"uniform:{seed}")
    while True:
        fresh = [rng.choice(alphabet) for _ in range(-(-length // repeat))]
        yield "".join(f" {c}" * repeat for c in fresh)[: 2 * length]


def causal_floor(alphabet: str = ALPHABET, repeat: int = 2) -> float:
    """The best mean loss per token a causal model can reach on `uniform_documents`, in nats:
    ln|alphabet| for each fresh symbol, 0 for its copies (end-of-document tokens ignored)."""
    _check(alphabet, repeat)
    return math.log(len(alphabet)) / repeat
