"""BatchLoader: chunk-aligned windows, sequential/random order, exact resume, rank split.

Guards cartlab/data/loader.py (issue 3: loader). Uses small bins written in the test.
Run: PYTHONPATH=. .venv/bin/pytest tests/test_data_loader.py -q
"""
import numpy as np
import pytest
import torch

from cartlab.data import BatchLoader, open_bin
from cartlab.data.binfile import BinWriter

HASH = "cd" * 32
CHUNK = 17


@pytest.fixture
def chunked(tmp_path):
    """40 chunks of 17 tokens; chunk i holds ids 100*i .. 100*i+16 (which chunk a token is in is visible)."""
    ids = (np.arange(40)[:, None] * 100 + np.arange(CHUNK)[None, :]).reshape(-1)
    with BinWriter(tmp_path / "train.bin", vocab_size=5000, tokenizer_hash=HASH, chunk_size=CHUNK) as w:
        w.write(ids)
    return open_bin(tmp_path / "train.bin")


def _batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_sequential_windows_are_chunk_aligned(chunked):
    loader = BatchLoader(chunked, batch_size=3, seq_len=8)
    assert loader.windows_per_chunk == 2 and loader.n_windows == 80
    x, y = loader.next_batch()
    assert x.dtype == torch.int64 and x.shape == (3, 8) and y.shape == (3, 8)
    assert x[0].tolist() == list(range(0, 8)) and y[0].tolist() == list(range(1, 9))
    assert x[1].tolist() == list(range(8, 16)) and y[1].tolist() == list(range(9, 17))
    assert x[2].tolist() == list(range(100, 108))  # next chunk: no window crosses a boundary
    for _ in range(loader.steps_per_epoch * 2):
        x, y = loader.next_batch()
        both = torch.cat([x, y[:, -1:]], dim=1)
        assert (both // 100 == both[:, :1] // 100).all()  # every window within one chunk


def test_window_longer_than_chunk_is_refused(chunked):
    with pytest.raises(ValueError, match="seq_len=17.*use seq_len <= 16"):
        BatchLoader(chunked, batch_size=1, seq_len=17)


def test_random_mode_covers_each_window_once_per_epoch(chunked):
    loader = BatchLoader(chunked, batch_size=4, seq_len=8, mode="random", seed=5)
    seen = []
    for _ in range(loader.steps_per_epoch):
        loader.next_batch()
        seen.append(loader.last_offsets)
    seen = np.concatenate(seen)
    assert len(seen) == 80 and len(set(seen.tolist())) == 80
    first = seen.copy()
    again = BatchLoader(chunked, batch_size=4, seq_len=8, mode="random", seed=5)
    again.next_batch()
    assert (again.last_offsets == first[:4]).all()
    other = BatchLoader(chunked, batch_size=4, seq_len=8, mode="random", seed=6)
    other.next_batch()
    assert not (other.last_offsets == first[:4]).all()


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_resume_is_exact_across_epochs(chunked, mode):
    a = BatchLoader(chunked, batch_size=3, seq_len=8, mode=mode, seed=1)
    _batches(a, 20)  # 26 steps per epoch: the continuation crosses into epoch 1
    state = a.state_dict()
    rest = _batches(a, 15)
    b = BatchLoader(chunked, batch_size=3, seq_len=8, mode=mode, seed=1)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(rest, _batches(b, 15)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch == b.epoch == 1


def test_resume_refuses_a_different_loader(chunked):
    state = BatchLoader(chunked, batch_size=3, seq_len=8).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(chunked, batch_size=4, seq_len=8).load_state_dict(state)


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_ranks_split_the_global_batch(chunked, mode):
    single = BatchLoader(chunked, batch_size=4, seq_len=8, mode=mode, seed=2)
    ranks = [BatchLoader(chunked, batch_size=2, seq_len=8, mode=mode, seed=2, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(single.steps_per_epoch + 3):
        x, _ = single.next_batch()
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(x, torch.cat(parts))


def test_unchunked_validation_bin(tmp_path):
    with BinWriter(tmp_path / "val.bin", vocab_size=100, tokenizer_hash=HASH) as w:
        w.write(np.arange(50) % 100)
    loader = BatchLoader(open_bin(tmp_path / "val.bin"), batch_size=2, seq_len=7)
    x, y = loader.next_batch()
    assert x[1].tolist() == list(range(7, 14)) and y[1].tolist() == list(range(8, 15))


def test_bad_arguments(chunked):
    with pytest.raises(ValueError, match="mode must be one of"):
        BatchLoader(chunked, 2, 8, mode="shuffled")
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(chunked, 2, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than batch_size x world_size"):
        BatchLoader(chunked, 100, 8)


def test_ids_beyond_vocab_are_caught_when_read(tmp_path):
    with BinWriter(tmp_path / "a.bin", vocab_size=50_000, tokenizer_hash=HASH) as w:
        w.write(np.arange(100) * 400)
    path = tmp_path / "a.bin"
    data = bytearray(path.read_bytes())  # forge a smaller vocabulary in the header
    data[24:32] = (1000).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    loader = BatchLoader(open_bin(path), batch_size=1, seq_len=10)
    with pytest.raises(ValueError, match="beyond the vocabulary"):
        loader.next_batch()
