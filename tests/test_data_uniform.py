"""The causal-leak study's data: uniform random symbols, each written twice.

Guards cartlab/data/uniform.py, data/recipes/causal-leak.yaml and its fit with
ablations/causal-leak.yaml: documents are seeded, fresh symbols are uniform and copies exact (so
the causal floor ln|alphabet| / repeat is what a causal model can reach), the shipped recipe builds
offline into one token per symbol, and the study's runs never read a training window twice.
Run: pytest tests/test_data_uniform.py (about 10 s: one small tokenizer is trained).
"""
import itertools
import math
from collections import Counter

import numpy as np
import pytest

from cartlab.data.uniform import ALPHABET, causal_floor, uniform_documents


def test_documents_are_seeded_and_each_fresh_symbol_is_written_twice():
    docs = list(itertools.islice(uniform_documents(seed=3, length=64), 50))
    assert docs == list(itertools.islice(uniform_documents(seed=3, length=64), 50))
    assert docs != list(itertools.islice(uniform_documents(seed=4, length=64), 50))
    for doc in docs:
        symbols = doc.split(" ")[1:]  # " k k 7 7" -> k k 7 7
        assert doc.startswith(" ") and len(symbols) == 64 and set("".join(symbols)) <= set(ALPHABET)
        assert symbols[0::2] == symbols[1::2]


def test_fresh_symbols_are_uniform_so_the_causal_floor_is_ln36_over_2():
    fresh = [s for doc in itertools.islice(uniform_documents(length=512), 200) for s in doc.split(" ")[1::2]]
    counts = Counter(fresh)
    assert set(counts) == set(ALPHABET)
    p = np.array(list(counts.values())) / len(fresh)
    entropy = -(p * np.log(p)).sum()
    assert entropy == pytest.approx(math.log(36), abs=2e-3)  # 51,200 draws
    assert causal_floor() == pytest.approx(math.log(36) / 2) == pytest.approx(1.7918, abs=1e-4)
    assert causal_floor("ab", repeat=1) == pytest.approx(math.log(2))


@pytest.mark.parametrize("kw, message", [
    ({"alphabet": "ab-"}, "ASCII letters and digits"),
    ({"alphabet": "aa"}, "distinct"),
    ({"repeat": 0}, "repeat must be an integer >= 1"),
    ({"length": 0}, "length must be an integer >= 1"),
])
def test_bad_options_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        next(uniform_documents(**kw))


def test_the_shipped_recipe_builds_offline_into_one_token_per_symbol(tmp_path, monkeypatch):
    from cartlab.data.binfile import open_bin
    from cartlab.data.build import build
    from cartlab.data.recipe import load_recipe

    monkeypatch.setenv("CARTLAB_DATA_DIR", str(tmp_path))
    recipe = load_recipe("causal-leak")
    recipe.train_tokens = 20 * recipe.chunk_size  # the shipped size, scaled down
    recipe.domains[0].val_tokens = 2048
    meta = build(recipe, tmp_path / "out", progress=False, log=lambda s: None)
    eos = meta["tokenizer"]["eos_id"]
    ids = np.asarray(open_bin(tmp_path / "out" / "train.bin").tokens)
    assert len(set(ids.tolist()) - {eos}) == len(ALPHABET)  # 36 symbols, one token each
    # the validation bin keeps documents in order: between two end-of-text ids, 512 tokens in pairs
    val = np.asarray(open_bin(tmp_path / "out" / "val_uniform.bin").tokens)
    cuts = np.flatnonzero(val == eos)
    doc = val[cuts[0] + 1:cuts[1]]
    assert len(doc) == 512 and (doc[0::2] == doc[1::2]).all()


def test_the_study_reads_every_training_window_once():
    from cartlab.data.recipe import load_recipe
    from cartlab.studies import load_study

    recipe = load_recipe("causal-leak")
    runs = load_study("causal-leak").expand()
    assert {r.label for r in runs} == {"causal", "noncausal_cross_attn"}
    for run in runs:
        cfg = run.config
        assert cfg.data.recipe == "causal-leak"
        assert cfg.seq_len + 1 <= recipe.chunk_size
        windows = (recipe.train_tokens // recipe.chunk_size) * ((recipe.chunk_size - 1) // cfg.seq_len)
        assert cfg.steps * cfg.batch_size * cfg.grad_accum <= windows
        assert cfg.model_config().vocab_size >= recipe.tokenizer.vocab_size
    causal = {(r.label, r.seed): r.config.model_config().causal_cross_attn for r in runs}
    assert causal == {("causal", 1): True, ("causal", 2): True, ("noncausal_cross_attn", 1): False,
                      ("noncausal_cross_attn", 2): False}  # two seeds each: the README states the finding on both
