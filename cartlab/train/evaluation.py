"""Validation during training: loss and perplexity on every validation bin of the data build,
over the same fixed batches each time (section 11), and the line printed for it."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from cartlab.train.config import TrainConfig


def _val_bins(meta: dict) -> dict[str, Path]:
    """The validation bins the build recorded, by domain. load_meta has checked them against the
    build's tokenizer; any other val_*.bin lying in the folder is never read."""
    return {info["domain"]: Path(meta["dir"]) / name for name, info in meta["files"].items() if "domain" in info}


@torch.no_grad()
def evaluate(model, val_bins: dict, cfg: TrainConfig, selection, device) -> dict[str, dict]:
    """Mean loss and perplexity on every validation bin over the same fixed batches each time:
    the first `eval_batches` windows-batches from the start of the bin (section 11)."""
    from cartlab.data import BatchLoader

    model.eval()
    out = {}
    for split, vbin in val_bins.items():
        vl = BatchLoader(vbin, cfg.eval_batch_size, cfg.seq_len, "sequential")
        losses = []
        for _ in range(min(cfg.eval_batches, vl.steps_per_epoch)):
            x, y = vl.next_batch()
            with selection.autocast():
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.item())
        mean = float(np.mean(losses))
        out[split] = {"loss": mean, "ppl": math.exp(min(mean, 50.0))}
    model.train()
    return out


def eval_line(step: int, train_loss: float, results: dict[str, dict], tokens_per_s: float | None) -> str:
    """`step 200: train 3.412 | val iteration 2.871 (ppl 17.7), prose 4.102 (ppl 60.4) | 5,120 tok/s`"""
    val = ", ".join(f"{split} {r['loss']:.3f} (ppl {r['ppl']:.1f})" for split, r in results.items())
    speed = f" | {tokens_per_s:,.0f} tok/s" if tokens_per_s else ""
    return f"step {step}: train {train_loss:.3f} | val {val}{speed}"

def token_byte_table(path: Path) -> torch.Tensor | None:
    """(vocab,) bytes per token id of the build's tokenizer file, for the bits-per-byte measures;
    None when the build has no readable tokenizer file."""
    from cartlab.data.tokenizer import read_tokenizer_file, token_bytes

    if not path.is_file():
        return None
    return torch.tensor(token_bytes(read_tokenizer_file(path, "the data build's tokenizer")), dtype=torch.float64)
