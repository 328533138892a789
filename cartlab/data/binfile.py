"""Token bins: a fixed 256-byte header followed by the token ids.

Header layout (little-endian), then zero padding up to 256 bytes:

    magic           8s   b"CARTBIN\\0"
    format version  u32  1
    dtype code      u32  bytes per token: 2 (uint16) or 4 (uint32)
    n_tokens        u64  number of tokens after the header
    vocab_size      u64  every id is < vocab_size
    chunk_size      u64  tokens per single-domain chunk (0: one domain, no chunk structure)
    tokenizer hash  64s  sha256 hex of the tokenizer that made the ids

A bin is written under a temporary name with `n_tokens` set to a sentinel, and only renamed to its
final name once the header holds the real count, so a crashed write never looks complete. On open,
the magic, version, dtype and file size are checked: a foreign, truncated or unfinished file
raises `ValueError`.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"CARTBIN\x00"
FORMAT_VERSION = 1
HEADER_SIZE = 256
_HEADER = struct.Struct("<8sIIQQQ64s")
_UNFINISHED = 2**64 - 1  # n_tokens while a writer is still open
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


@dataclass(frozen=True)
class BinHeader:
    """The decoded header of a token bin."""

    dtype: np.dtype
    n_tokens: int
    vocab_size: int
    chunk_size: int
    tokenizer_hash: str
    version: int = FORMAT_VERSION

    def pack(self, n_tokens: int | None = None) -> bytes:
        n = self.n_tokens if n_tokens is None else n_tokens
        raw = _HEADER.pack(MAGIC, self.version, self.dtype.itemsize, n, self.vocab_size,
                           self.chunk_size, self.tokenizer_hash.encode("ascii"))
        return raw.ljust(HEADER_SIZE, b"\x00")


def read_header(path: str | Path) -> BinHeader:
    """Read and validate the header of `path`, including that the file size matches it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"token bin {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < _HEADER.size or raw[:8] != MAGIC:
        raise ValueError(f"{path} is not a cartlab token bin (bad magic {raw[:8]!r}, "
                         f"expected {MAGIC!r})")
    magic, version, code, n_tokens, vocab, chunk, tok_hash = _HEADER.unpack(raw[:_HEADER.size])
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: bin format version {version} is not supported "
                         f"(this cartlab reads version {FORMAT_VERSION})")
    if code not in _DTYPES:
        raise ValueError(f"{path}: dtype code {code} is invalid (allowed: 2 for uint16, 4 for uint32)")
    if len(raw) < HEADER_SIZE:
        raise ValueError(f"{path} is truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
    if n_tokens == _UNFINISHED:
        raise ValueError(f"{path} is unfinished: its writer never completed (interrupted build?)")
    expected = HEADER_SIZE + n_tokens * code
    if size != expected:
        kind = "truncated" if size < expected else "longer than its header says"
        raise ValueError(f"{path} is {kind}: header says {n_tokens} tokens ({expected} bytes) "
                         f"but the file has {size} bytes")
    return BinHeader(dtype=_DTYPES[code], n_tokens=n_tokens, vocab_size=vocab, chunk_size=chunk,
                     tokenizer_hash=tok_hash.rstrip(b"\x00").decode("ascii"), version=version)


class TokenBin:
    """An opened token bin: header fields plus the ids as a read-only memmap (`tokens`)."""

    def __init__(self, path: str | Path, header: BinHeader):
        self.path = Path(path)
        self.header = header
        if header.n_tokens:
            self.tokens = np.memmap(self.path, dtype=header.dtype, mode="r", offset=HEADER_SIZE,
                                    shape=(header.n_tokens,))
        else:
            self.tokens = np.zeros(0, dtype=header.dtype)

    dtype = property(lambda self: self.header.dtype)
    n_tokens = property(lambda self: self.header.n_tokens)
    vocab_size = property(lambda self: self.header.vocab_size)
    chunk_size = property(lambda self: self.header.chunk_size)
    tokenizer_hash = property(lambda self: self.header.tokenizer_hash)

    def __len__(self) -> int:
        return self.header.n_tokens

    def __repr__(self) -> str:
        return (f"TokenBin({str(self.path)!r}, n_tokens={self.n_tokens}, dtype={self.dtype.name}, "
                f"vocab_size={self.vocab_size}, chunk_size={self.chunk_size}, "
                f"tokenizer={self.tokenizer_hash[:12]})")

    def check_ids(self, block: int = 1 << 24) -> None:
        """Scan every id; raise ValueError if one is >= vocab_size (reads the whole file)."""
        for start in range(0, self.n_tokens, block):
            top = int(self.tokens[start:start + block].max())
            if top >= self.vocab_size:
                pos = start + int(np.argmax(self.tokens[start:start + block] >= self.vocab_size))
                raise ValueError(f"{self.path}: token id {int(self.tokens[pos])} at position {pos} "
                                 f"is beyond the vocabulary (vocab_size={self.vocab_size})")


def open_bin(path: str | Path, *, check_ids: bool = False) -> TokenBin:
    """Open a token bin as a memmap; header, size and (optionally) every id are validated."""
    tb = TokenBin(path, read_header(path))
    if check_ids:
        tb.check_ids()
    return tb


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(block):
            h.update(buf)
    return h.hexdigest()


class BinWriter:
    """Stream token ids into a new bin; the file appears under `path` only on `close()`.

    Use as a context manager: an exception inside the block deletes the temporary file.
    Every written id is checked against `vocab_size`.
    """

    def __init__(self, path: str | Path, *, vocab_size: int, tokenizer_hash: str, chunk_size: int = 0):
        if len(tokenizer_hash) != 64:
            raise ValueError(f"tokenizer_hash must be a 64-character sha256 hex string, "
                             f"got {tokenizer_hash!r}")
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self.header = BinHeader(dtype=dtype_for_vocab(vocab_size), n_tokens=0, vocab_size=vocab_size,
                                chunk_size=chunk_size, tokenizer_hash=tokenizer_hash)
        self.n_tokens = 0
        self._f = open(self.tmp_path, "wb")
        self._f.write(self.header.pack(n_tokens=_UNFINISHED))

    def write(self, ids) -> None:
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.min() < 0 or arr.max() >= self.header.vocab_size:
            bad = int(arr.max()) if arr.max() >= self.header.vocab_size else int(arr.min())
            raise ValueError(f"token id {bad} is beyond the vocabulary "
                             f"(vocab_size={self.header.vocab_size}) while writing {self.path.name}")
        self._f.write(arr.astype(self.header.dtype, copy=False).tobytes())
        self.n_tokens += int(arr.size)

    def close(self) -> Path:
        """Finalise the header, flush to disk and atomically rename to `path`."""
        self._f.seek(0)
        self._f.write(self.header.pack(n_tokens=self.n_tokens))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file; `path` is left untouched."""
        if not self._f.closed:
            self._f.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "BinWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
