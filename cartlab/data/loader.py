"""BatchLoader: (x, y) batches from a token bin, sequential (as the paper) or sampled, resumable.

Windows. A window is seq_len+1 consecutive tokens; x is its first seq_len, y its last seq_len.
Windows advance by seq_len, so every token is a target exactly once per pass. In a chunked bin
(train.bin, `chunk_size` > 0) windows are laid out inside each chunk and never cross a chunk
boundary: a chunk of C tokens holds (C - 1) // seq_len windows, starting at 0, seq_len, ...
Since every chunk comes from one domain, so does every window. This needs seq_len <= C - 1
(e.g. chunk 1025 for seq_len 1024 or 512; chunk 513 for 512, 256 or 128). An unchunked bin (a
validation bin) is one run of windows from the start.

Order. `sequential` reads windows in file order (train.bin is pre-shuffled at build time, so every
seed sees the same data in the same order, section 4.4). `random` reads a seeded permutation of
the windows, a new one each pass. A pass ends when fewer than batch_size * world_size windows are
left; the next pass starts over (`epoch` counts them; the paper's runs stay in pass 0).

Ranks. With world_size W, global batch s covers windows s*B*W ... (s+1)*B*W - 1 of the order;
rank r takes the r-th block of B. All ranks together read exactly what one rank with batch B*W
would, whatever W is.

Resuming. `state_dict()` holds the pass and the step within it; `load_state_dict` restores
them, and the next batch is the one that would have come next.
"""
from __future__ import annotations

import numpy as np
import torch

from cartlab.data.binfile import TokenBin, open_bin

MODES = ("sequential", "random")


class BatchLoader:
    """Batches of (x, y), int64 tensors of shape (batch_size, seq_len), from one token bin."""

    def __init__(self, bin: TokenBin | str, batch_size: int, seq_len: int, mode: str = "sequential",
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.bin = open_bin(bin) if not isinstance(bin, TokenBin) else bin
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
        c = self.bin.chunk_size
        if c and seq_len + 1 > c:
            raise ValueError(f"seq_len={seq_len} needs windows of {seq_len + 1} tokens, longer than the "
                             f"{c}-token chunks of {self.bin.path.name}; use seq_len <= {c - 1} so every "
                             f"window stays in one domain")
        self.batch_size, self.seq_len, self.mode, self.seed = batch_size, seq_len, mode, seed
        self.rank, self.world_size = rank, world_size
        if c:
            self.windows_per_chunk = (c - 1) // seq_len
            self.n_windows = (self.bin.n_tokens // c) * self.windows_per_chunk
        else:
            self.windows_per_chunk = 0
            self.n_windows = max(0, (self.bin.n_tokens - 1) // seq_len)
        self.steps_per_epoch = self.n_windows // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.bin.path.name} has {self.n_windows} windows of {seq_len + 1} tokens, "
                             f"fewer than batch_size x world_size = {batch_size * world_size}")
        self.epoch, self.step = 0, 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1
        self.last_offsets: np.ndarray | None = None
        """Token offsets (in the bin) of the windows of the last batch, for inspection and tests."""

    def window_offset(self, w: np.ndarray) -> np.ndarray:
        """Token offset of window index `w` (array)."""
        if self.windows_per_chunk:
            return (w // self.windows_per_chunk) * self.bin.chunk_size + (w % self.windows_per_chunk) * self.seq_len
        return w * self.seq_len

    def _order(self, lo: int, hi: int) -> np.ndarray:
        if self.mode == "sequential":
            return np.arange(lo, hi, dtype=np.int64)
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n_windows), self.epoch
        return self._perm[lo:hi]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        B, T = self.batch_size, self.seq_len
        lo = (self.step * self.world_size + self.rank) * B
        offsets = self.window_offset(self._order(lo, lo + B))
        tokens = self.bin.tokens
        buf = np.stack([tokens[o:o + T + 1] for o in offsets]).astype(np.int64)  # (B, T+1)
        if buf.max() >= self.bin.vocab_size:
            raise ValueError(f"{self.bin.path.name}: token id {int(buf.max())} is beyond the vocabulary "
                             f"(vocab_size={self.bin.vocab_size})")
        self.step += 1
        self.last_offsets = offsets
        t = torch.from_numpy(buf)
        return t[:, :-1], t[:, 1:]  # x, y: (B, T)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "mode": self.mode, "seed": self.seed,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "world_size": self.world_size,
                "rank": self.rank, "n_tokens": self.bin.n_tokens, "tokenizer_hash": self.bin.tokenizer_hash}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`; every field that fixes the batch order must match this loader."""
        mine = self.state_dict()
        for key in ("mode", "seed", "batch_size", "seq_len", "world_size", "rank", "n_tokens", "tokenizer_hash"):
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume: loader state has {key}={state.get(key)!r}, "
                                 f"this loader has {mine[key]!r}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
