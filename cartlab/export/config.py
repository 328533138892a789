"""The transformers config of an exported cartlab model (config.json, `model_type: cartlab`).

Its own module, importing nothing but transformers' `PretrainedConfig`, so that registering the
cartlab model type with transformers' auto classes (`cartlab.export.auto`) costs no torch import.
Bundled into modeling_cartlab.py with `cartlab.export.hf` (`cartlab.export.bundle`).
"""
from __future__ import annotations

from transformers import PretrainedConfig


class CartlabConfig(PretrainedConfig):
    """config.json of an exported cartlab model. `cartlab` is the cartlab model config
    (`LMConfig.to_dict()`: kind, shape and hooks) the model is rebuilt from. `n_loops` is the loop
    count R a CART model runs when a call does not give one: the trained R as exported; set it at
    load time for variable-R inference (`from_pretrained(DIR, n_loops=8)`, or lm-eval's
    `--model_args pretrained=DIR,n_loops=8`). None for Dense, which does not loop. `exit` and
    `exit_threshold` (CART only) name a per-token exit rule that calls use unless they give one
    (`cartlab.model.exits`; `from_pretrained(DIR, exit="kl", exit_threshold=1e-3)`, or in lm-eval's
    model args); None: every token runs n_loops."""

    model_type = "cartlab"

    def __init__(self, cartlab: dict | None = None, n_loops: int | None = None, exit: str | None = None,
                 exit_threshold: float | None = None, **kwargs):
        self.cartlab = dict(cartlab or {})
        self.n_loops = n_loops
        self.exit = exit
        self.exit_threshold = None if exit_threshold is None else float(exit_threshold)
        kwargs.setdefault("tie_word_embeddings", True)  # cartlab ties the LM head to the embedding
        super().__init__(**kwargs)
