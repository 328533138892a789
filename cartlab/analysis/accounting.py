"""Compute and data accounting from numbers (paper sections 3.5, 4.4, 4.6 and 7.2).

Takes parameter counts, token counts and throughputs as arguments; the model library
(`cartlab.model.accounting`) computes those from a config.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cartlab.hardware import RTX3090_BF16_PEAK_FLOPS  # noqa: F401 - section 4.6, re-exported

CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. (2022)


def _pos(name, v):
    a = np.asarray(v, float)
    if np.any(~np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"{name}: must be finite and > 0, got {v}")
    return a


def _out(a):
    return float(a) if np.ndim(a) == 0 else a


def leverage(stored_params, effective_params):
    """effective / stored parameters (section 3.5, Table 1)."""
    return _out(_pos("effective_params", effective_params) / _pos("stored_params", stored_params))


def tokens_per_param(tokens, params):
    """D / N: training tokens per parameter (section 4.4)."""
    return _out(_pos("tokens", tokens) / _pos("params", params))


def chinchilla_table(params: pd.DataFrame, *, tokens: float = 1e9,
                     optimal: float = CHINCHILLA_TOKENS_PER_PARAM) -> pd.DataFrame:
    """Tokens per stored and per effective parameter and % of Chinchilla-optimal (section 4.4, Table 2).

    stored_ratio = D / N_stored, effective_ratio = D / N_eff,
    pct_chinchilla_effective = 100 * effective_ratio / optimal (optimal = 20 tokens/param).
    `params` needs stored_params and effective_params (absolute counts); other columns are kept.
    """
    missing = [c for c in ("stored_params", "effective_params") if c not in params.columns]
    if missing:
        raise ValueError(f"params: missing columns {missing}")
    out = params.copy()
    out["stored_ratio"] = tokens_per_param(tokens, out["stored_params"].to_numpy())
    out["effective_ratio"] = tokens_per_param(tokens, out["effective_params"].to_numpy())
    out["pct_chinchilla_effective"] = 100 * out["effective_ratio"] / _pos("optimal", optimal)
    out["pct_chinchilla_stored"] = 100 * out["stored_ratio"] / optimal
    return out


def training_flops(params, tokens):
    """C = 6 N D: training FLOPs under the standard per-token estimate (Kaplan et al.; section 4.4)."""
    return _out(6.0 * _pos("params", params) * _pos("tokens", tokens))


def mfu(tokens_per_s, *, params=None, flops_per_token=None, peak_flops: float = RTX3090_BF16_PEAK_FLOPS):
    """Model FLOPs utilisation (section 4.6): flops_per_token * tokens_per_s / peak_flops.

    flops_per_token defaults to 6 N with N = `params` (effective parameters for CART; Table 4's
    MFU equals 6 N_eff * tokens/s / 71e12 within one point). Give exactly one of the two.
    """
    if (params is None) == (flops_per_token is None):
        raise ValueError("params, flops_per_token: give exactly one")
    if flops_per_token is not None:
        fpt = _pos("flops_per_token", flops_per_token)
    else:
        fpt = 6.0 * _pos("params", params)
    return _out(fpt * _pos("tokens_per_s", tokens_per_s) / _pos("peak_flops", peak_flops))


def bits_per_byte(ppl, tokens_per_byte):
    """Bits per byte from per-token perplexity (section 7.2): BPB = log2(ppl) * tokens_per_byte.

    log2(ppl) is bits per token; tokens_per_byte is the tokenizer's average on the evaluated text
    (the paper's Llama-2 ratio was lost in extraction, so there is no default).
    """
    return _out(np.log2(_pos("ppl", ppl)) * _pos("tokens_per_byte", tokens_per_byte))
