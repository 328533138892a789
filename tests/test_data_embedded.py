"""The embedded corpus: the k-step iteration domain is checked, and every generator is seeded.

Guards cartlab/data/iteration.py and cartlab/data/embedded.py (issue 3, acceptance 3).
Run: PYTHONPATH=. .venv/bin/pytest tests/test_data_embedded.py -q
"""
import itertools
import random

import pytest

from cartlab.data.embedded import prose_documents, story_documents
from cartlab.data.iteration import check_iteration_sample, iteration_documents, iteration_sample


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_every_answer_needs_exactly_k_steps(k):
    rng = random.Random(k)
    for _ in range(200):
        line = iteration_sample(rng, k, n_distractors=2)
        check = check_iteration_sample(line)
        assert check.steps == k, line
        assert check.correct, line


def test_document_stream_respects_k_range_and_seed():
    docs = list(itertools.islice(iteration_documents(seed=7, k_min=2, k_max=4), 100))
    assert docs == list(itertools.islice(iteration_documents(seed=7, k_min=2, k_max=4), 100))
    assert docs != list(itertools.islice(iteration_documents(seed=8, k_min=2, k_max=4), 100))
    steps = [check_iteration_sample(line).steps for d in docs for line in d.splitlines()]
    assert len(steps) == 400 and set(steps) == {2, 3, 4}


def test_checker_catches_wrong_answers_and_malformed_text():
    line = "Let a = 5. Let b = a + 3. Let c = b - 2. What is c? c = 6."
    assert check_iteration_sample(line).steps == 2 and check_iteration_sample(line).correct
    assert not check_iteration_sample(line.replace("c = 6.", "c = 7.")).correct
    with pytest.raises(ValueError, match="used before it is bound"):
        check_iteration_sample("Let b = a + 3. What is b? b = 3.")
    with pytest.raises(ValueError, match="not an iteration sample"):
        check_iteration_sample("Once upon a time.")


def test_distractors_are_interleaved_not_appended():
    # If the chain were always the last k+1 statements, one attention hop would find it.
    rng = random.Random(0)
    tails = 0
    for _ in range(200):
        line = iteration_sample(rng, 3, n_distractors=2)
        stmts = line.split(" What is ")[0].split(". ")
        tails += check_iteration_sample(line).query == stmts[-1].split()[1]
    assert tails < 200


def test_bad_iteration_options():
    with pytest.raises(ValueError, match="k_min"):
        next(iteration_documents(k_min=3, k_max=2))
    with pytest.raises(ValueError, match="variables"):
        next(iteration_documents(k_max=12, n_distractors=2))


def test_stories_are_seeded_and_narrow():
    a = list(itertools.islice(story_documents(1), 300))
    assert a == list(itertools.islice(story_documents(1), 300))
    assert a != list(itertools.islice(story_documents(2), 300))
    words = {w.strip('.,!"').lower() for s in a for w in s.split()}
    assert len(words) < 400  # narrow vocabulary, the TinyStories role


def test_prose_is_real_unique_text():
    docs = list(prose_documents())
    assert len(docs) > 1000 and len(set(docs)) == len(docs)
    assert sum(map(len, docs)) > 1_000_000
    assert any("Return" in d for d in docs)
