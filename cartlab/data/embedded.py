"""The embedded corpus: text that needs nothing downloaded.

Three document streams, each deterministic:

* `prose_documents()`: real English prose that ships with every Python, the reference topics
  in `pydoc_data.topics` and the docstrings of the standard library (read with `ast`, nothing
  is imported). It depends on the Python version, which the build records.
* `story_documents(seed)`: short narrow-vocabulary stories from a small grammar (the role
  TinyStories plays in the paper): a few hundred words, simple sentences.
* `iteration_documents(seed, ...)` (in `cartlab.data.iteration`): text whose answer takes k
  sequential steps to compute.
"""
from __future__ import annotations

import ast
import functools
import random
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

# Bump when the text any generator yields changes, so caches keyed on it are invalidated.
EMBEDDED_CORPUS_VERSION = 1

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MIN_DOC_CHARS = 80


@functools.lru_cache(maxsize=1)
def _prose_documents() -> tuple[str, ...]:
    from pydoc_data import topics

    docs: list[str] = [topics.topics[key].strip() for key in sorted(topics.topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not _SKIP_DIRS.intersection(p.relative_to(root).parts))
    for path in files:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a few stdlib files are deliberately invalid
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc.strip())
    seen: set[str] = set()
    unique = []
    for doc in docs:  # exact duplicates (shared docstrings) would leak between train and val
        if len(doc) >= _MIN_DOC_CHARS and doc not in seen:
            seen.add(doc)
            unique.append(doc)
    return tuple(unique)


def prose_documents(seed: int = 0) -> Iterator[str]:
    """pydoc topics then stdlib docstrings, deduplicated, in a fixed order (finite, ~2M chars).

    `seed` is accepted for a uniform generator signature and ignored: the order is fixed.
    """
    del seed
    yield from _prose_documents()


def python_version() -> str:
    return "%d.%d.%d" % sys.version_info[:3]


# --- stories -----------------------------------------------------------------------------

_GIRLS = ["Lily", "Mia", "Sara", "Anna", "Zoe", "Lucy", "Emma", "Ella", "Nora", "Ruby"]
_BOYS = ["Tom", "Ben", "Max", "Leo", "Sam", "Jack", "Tim", "Finn", "Oliver", "Jake"]
_NAMES = _GIRLS + _BOYS
_ANIMALS = ["cat", "dog", "bunny", "bird", "frog", "duck", "bear", "puppy", "fox", "mouse", "owl", "pony"]
_ADJ = ["little", "happy", "small", "brave", "kind", "shy", "funny", "curious", "sleepy", "friendly"]
_COLOR = ["red", "blue", "green", "yellow", "pink", "big", "shiny", "soft", "round", "old"]
_THINGS = ["ball", "kite", "hat", "box", "book", "cup", "boat", "drum", "toy car", "blanket",
           "flower", "cake", "shoe", "star", "apple", "rock"]
_PLACES = ["park", "garden", "forest", "beach", "farm", "yard", "pond", "hill", "house", "school"]
_FEEL_GOOD = ["happy", "glad", "proud", "excited", "calm"]
_FEEL_BAD = ["sad", "scared", "worried", "upset", "tired"]
_PLAY = ["play", "run", "jump", "sing", "dance", "swim", "read", "draw", "look for bugs", "build a tower"]
_PROBLEMS = [
    "the {thing} fell into the {water}",
    "the wind took the {thing} up into a tree",
    "the {thing} was lost in the tall grass",
    "a big dog ran off with the {thing}",
    "the {thing} broke into two pieces",
    "it started to rain and the {thing} got wet",
]
_WATER = ["pond", "river", "puddle", "lake"]
_HELP = [
    "{helper} helped {name} get it back",
    "{name} and {helper} looked for it together and found it",
    "{helper} had a good idea and fixed it",
    "{name} asked {helper} for help, and {helper} said yes",
]
_MORAL = [
    "It is good to share with friends.",
    "Friends help each other.",
    "It is good to be kind.",
    "It is okay to ask for help.",
    "Being brave makes hard things easy.",
    "Saying sorry makes things better.",
]
_ENDINGS = [
    "That night, {name} went to bed with a big smile.",
    "From that day on, {name} and {helper} were best friends.",
    "They played until the sun went down.",
    "{name} said thank you and gave {helper} a hug.",
    "Then they went home and had a warm snack.",
]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _story(rng: random.Random) -> str:
    kid = rng.choice(["girl", "boy"])
    name = rng.choice(_GIRLS if kid == "girl" else _BOYS)
    pron, poss = ("she", "her") if kid == "girl" else ("he", "his")
    animal = rng.choice(_ANIMALS)
    helper = rng.choice([f"the {rng.choice(_ADJ)} {animal}", rng.choice([n for n in _NAMES if n != name]),
                         f"{poss} mom", f"{poss} dad"])
    thing = f"{rng.choice(_COLOR)} {rng.choice(_THINGS)}"
    place = rng.choice(_PLACES)
    start = rng.choice(["Once upon a time", "One day", "One sunny morning", "Long ago", "Once"])
    sents = [
        f"{start}, there was {_a(rng.choice(_ADJ))} {kid} named {name}.",
        f"{pron} had {_a(thing)} and {pron} loved it very much.",
        f"Every day, {name} liked to {rng.choice(_PLAY)} at the {place}.",
    ]
    if rng.random() < 0.5:
        sents.append(f"One day, {name} met {helper} at the {place}.")
    problem = rng.choice(_PROBLEMS).format(thing=thing.split()[-1], water=rng.choice(_WATER))
    sents.append(f"But then {problem}.")
    sents.append(f"{name} felt {rng.choice(_FEEL_BAD)}. \"Oh no!\" {pron} said.")
    sents.append(rng.choice(_HELP).format(helper=helper, name=name) + ".")
    sents.append(f"{name} felt {rng.choice(_FEEL_GOOD)} again.")
    sents.append(rng.choice(_ENDINGS).format(name=name, helper=helper))
    if rng.random() < 0.6:
        sents.append(rng.choice(_MORAL))
    return " ".join(s[0].upper() + s[1:] for s in sents)


def story_documents(seed: int = 0) -> Iterator[str]:
    """An endless, seeded stream of short stories from a small grammar (~300 distinct words)."""
    rng = random.Random(f"stories:{seed}")
    while True:
        yield _story(rng)
