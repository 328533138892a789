"""Synthetic iteration-rewarding text: variable-binding chains whose answer takes k steps.

The paper suspects its corpus lacks content that rewards iterative refinement (section 5.2,
explanation iii). This domain supplies some. A sample is one line:

    Let w = 7. Let d = 4. Let k = w + 2. Let b = d + 6. Let q = k - 5. What is q? q = 4.

The queried variable sits at the end of a chain literal -> v1 -> ... -> vk of k dependent
bindings (`k = w + 2` needs `w`, `q = k - 5` needs `k`), so its value cannot be known without k
sequential look-up-and-add steps. Distractor chains are interleaved with it (statements stay in
dependency order) so the chain must be found, not assumed to be the last lines. Every variable is
bound once and values stay in 0..99.

`check_iteration_sample` parses a line back, recomputes every value, and returns the number of
steps the answer needs, so tests can verify the generator independently of how it was written.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterator

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_STMT = re.compile(r"Let ([a-z]) = (?:(\d+)|([a-z]) ([+-]) (\d+))\.")
_QUERY = re.compile(r"What is ([a-z])\? \1 = (\d+)\.$")


@dataclass(frozen=True)
class IterationCheck:
    """What `check_iteration_sample` found in one sample."""

    query: str
    steps: int
    """Dependent bindings between a literal and the queried variable (the k of the sample)."""
    stated: int
    """The answer written in the sample."""
    expected: int
    """The answer recomputed from the bindings."""

    @property
    def correct(self) -> bool:
        return self.stated == self.expected


def _chain(rng: random.Random, names: list[str], length: int) -> list[tuple[str, str]]:
    """A literal binding followed by `length` bindings each derived from the previous one."""
    value = rng.randrange(100)
    stmts = [(names[0], f"Let {names[0]} = {value}.")]
    for prev, name in zip(names, names[1:length + 1]):
        c = rng.randrange(1, 10)
        op = rng.choice("+-") if c <= value <= 99 - c else ("+" if value < c else "-")
        value = value + c if op == "+" else value - c
        stmts.append((name, f"Let {name} = {prev} {op} {c}."))
    return stmts


def iteration_sample(rng: random.Random, k: int, n_distractors: int = 2) -> str:
    """One sample whose answer needs exactly `k` sequential steps, with `n_distractors` chains."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_vars = (k + 1) * (1 + n_distractors)
    if n_vars > len(_LETTERS):
        raise ValueError(f"k={k} with n_distractors={n_distractors} needs {n_vars} variables; "
                         f"at most {len(_LETTERS)} (one per letter) are allowed")
    names = rng.sample(_LETTERS, n_vars)
    main = _chain(rng, names[:k + 1], k)
    chains = [main] + [_chain(rng, names[(i + 1) * (k + 1):(i + 2) * (k + 1)], rng.randint(1, k))
                       for i in range(n_distractors)]
    # Interleave the chains at random, keeping each chain's own order (dependency order).
    order = [i for i, ch in enumerate(chains) for _ in ch]
    rng.shuffle(order)
    cursors = [0] * len(chains)
    lines = []
    for i in order:
        lines.append(chains[i][cursors[i]][1])
        cursors[i] += 1
    query = main[-1][0]
    answer = check_bindings(" ".join(lines))[query][0]
    return " ".join(lines) + f" What is {query}? {query} = {answer}."


def check_bindings(text: str) -> dict[str, tuple[int, int]]:
    """Map each bound variable to (value, steps from a literal). Raises ValueError if malformed."""
    env: dict[str, tuple[int, int]] = {}
    for m in _STMT.finditer(text):
        name, literal, src, op, c = m.groups()
        if name in env:
            raise ValueError(f"variable {name!r} is bound twice in {text!r}")
        if literal is not None:
            env[name] = (int(literal), 0)
        else:
            if src not in env:
                raise ValueError(f"variable {src!r} is used before it is bound in {text!r}")
            value, depth = env[src]
            env[name] = (value + int(c) if op == "+" else value - int(c), depth + 1)
    return env


def check_iteration_sample(line: str) -> IterationCheck:
    """Parse one sample, recompute its answer and count the steps it needs."""
    m = _QUERY.search(line)
    if not m:
        raise ValueError(f"not an iteration sample (no 'What is x? x = N.' at the end): {line!r}")
    env = check_bindings(line[:m.start()])
    query = m.group(1)
    if query not in env:
        raise ValueError(f"queried variable {query!r} is never bound in {line!r}")
    value, steps = env[query]
    return IterationCheck(query=query, steps=steps, stated=int(m.group(2)), expected=value)


def iteration_documents(seed: int = 0, k_min: int = 1, k_max: int = 6, n_distractors: int = 2,
                        samples_per_doc: int = 4) -> Iterator[str]:
    """An endless, seeded stream of documents of `samples_per_doc` lines, k uniform in [k_min, k_max]."""
    if not 1 <= k_min <= k_max:
        raise ValueError(f"iteration options need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if samples_per_doc < 1:
        raise ValueError(f"samples_per_doc must be >= 1, got {samples_per_doc}")
    iteration_sample(random.Random(0), k_max, n_distractors)  # validates the variable budget early
    rng = random.Random(f"iteration:{seed}")
    while True:
        yield "\n".join(iteration_sample(rng, rng.randint(k_min, k_max), n_distractors)
                        for _ in range(samples_per_doc))
