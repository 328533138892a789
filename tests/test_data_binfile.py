"""Token bin format: round trip, and every way a bin can be bad is caught on open.

Guards cartlab/data/binfile.py (issue 3: truncated / foreign / unfinished bins, ids beyond the
vocabulary, nothing half-written). Run: PYTHONPATH=. .venv/bin/pytest tests/test_data_binfile.py -q
"""
import numpy as np
import pytest

from cartlab.data.binfile import HEADER_SIZE, BinWriter, dtype_for_vocab, open_bin

HASH = "ab" * 32


def _write(path, ids, vocab=1000, chunk=0):
    with BinWriter(path, vocab_size=vocab, tokenizer_hash=HASH, chunk_size=chunk) as w:
        w.write(ids)
    return path


def test_round_trip_and_header(tmp_path):
    ids = np.arange(500) % 1000
    tb = open_bin(_write(tmp_path / "a.bin", ids, chunk=50), check_ids=True)
    assert tb.n_tokens == 500 and tb.vocab_size == 1000 and tb.chunk_size == 50
    assert tb.tokenizer_hash == HASH and tb.dtype == np.uint16
    np.testing.assert_array_equal(tb.tokens, ids)
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary left


def test_dtype_follows_vocab(tmp_path):
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.uint32
    tb = open_bin(_write(tmp_path / "big.bin", [70000, 5], vocab=100_000))
    assert tb.dtype == np.uint32 and list(tb.tokens) == [70000, 5]


def test_truncated_bin_is_refused(tmp_path):
    path = _write(tmp_path / "a.bin", np.arange(100))
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated.*100 tokens"):
        open_bin(path)
    path.write_bytes(data[:100])  # shorter than the header
    with pytest.raises(ValueError, match="truncated"):
        open_bin(path)


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "foreign.bin"
    with open(path, "wb") as f:
        np.save(f, np.arange(100, dtype=np.uint16))
    with pytest.raises(ValueError, match="not a cartlab token bin"):
        open_bin(path)
    raw = tmp_path / "raw.bin"  # a headerless nanoGPT-style uint16 file
    np.arange(1000, dtype=np.uint16).tofile(raw)
    with pytest.raises(ValueError, match="not a cartlab token bin"):
        open_bin(raw)


def test_interrupted_writer_leaves_nothing_complete(tmp_path):
    final = tmp_path / "train.bin"
    w = BinWriter(final, vocab_size=1000, tokenizer_hash=HASH)
    w.write(np.arange(300))
    w._f.flush()  # the process dies here: close() never runs
    assert not final.exists()
    (partial,) = tmp_path.iterdir()
    with pytest.raises(ValueError, match="unfinished"):
        open_bin(partial)
    other = tmp_path / "val.bin"
    with pytest.raises(RuntimeError):  # an exception inside the block removes the temporary
        with BinWriter(other, vocab_size=1000, tokenizer_hash=HASH) as w2:
            w2.write([1, 2, 3])
            raise RuntimeError("boom")
    assert not other.exists() and list(tmp_path.iterdir()) == [partial]


def test_ids_beyond_vocab(tmp_path):
    final = tmp_path / "a.bin"
    with pytest.raises(ValueError, match=r"token id 1000 is beyond the vocabulary \(vocab_size=1000\)"):
        with BinWriter(final, vocab_size=1000, tokenizer_hash=HASH) as w:
            w.write([1, 2, 1000])
    assert list(tmp_path.iterdir()) == []
    # A file whose ids were corrupted after writing is caught by the full scan.
    path = _write(final, np.arange(100))
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 2 * 7: HEADER_SIZE + 2 * 8] = np.uint16(4000).tobytes()
    path.write_bytes(bytes(data))
    open_bin(path)  # header and size are fine
    with pytest.raises(ValueError, match="token id 4000 at position 7 is beyond the vocabulary"):
        open_bin(path, check_ids=True)


def test_writer_rejects_bad_hash(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_hash"):
        BinWriter(tmp_path / "a.bin", vocab_size=10, tokenizer_hash="abc")
