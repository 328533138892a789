"""An exported model folder (`cartlab export`) scored by lm-eval's own `hf` model, for `cartlab eval`:

    cartlab eval exported/RUN --tasks cartlab_mc --n-loops 6 --exit latent --exit-threshold 0.2

`ExportLM` is lm-eval's `HFLM` (the code of `lm_eval --model hf`) over the folder's transformers
model (`cartlab.export.hf.CartlabForCausalLM`, cartlab's installed code: no remote code) and
tokenizer. It offers what `cartlab.eval.run.evaluate` asks of `CartlabLM` (`set_loops`, `core`,
`loops`, `mean_loops`, `run_id`), plus the `step`, so the rows go to the results database as for
the checkpoint: under the run and step config.json's `cartlab_source` records, with the same
protocol. Scoring is HFLM's own; the class only watches it to count loops as `CartlabLM` does:

- loglikelihood: the loops of the positions each request scores (HFLM's `_select_cont_toks`
  names them, one call per row of the batch `_model_call` ran; its right padding is not counted).
  HFLM's logits cache is off, so each request is its own row, as in `CartlabLM`, and the mean
  loops per token of a loglikelihood task equals the checkpoint path's.
- generation: every real position the batch ran (the wrapper's `mean_loops_per_token`, which
  leaves out left padding); unlike `CartlabLM`, a row that has stopped runs on until the batch does.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from lm_eval.models.huggingface import HFLM

from cartlab.eval.lm import LoopMeter, exit_kw
from cartlab.model.family import family_of


class ExportLM(HFLM, LoopMeter):
    """lm-eval's hf model over the exported folder `folder` on `device`, `batch_size` requests at
    a time; `quiet`: no progress bars."""

    def __init__(self, folder: str | Path, *, batch_size: int = 1, device: str = "cpu", quiet: bool = False):
        from transformers import PreTrainedTokenizerFast

        from cartlab.checkpoint import step_of
        from cartlab.export.hf import CartlabForCausalLM
        from cartlab.export.write import quiet_transformers

        with quiet_transformers():  # no "Loading weights" bar
            model = CartlabForCausalLM.from_pretrained(folder).to(device).eval()
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        with without_model_object_warnings():
            super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=int(batch_size),
                             logits_cache=False)
        self.quiet = bool(quiet)
        source = getattr(model.config, "cartlab_source", None) or {}
        self.run_id = source.get("run_id")
        step = step_of(str(source.get("checkpoint") or ""))
        self.step = -1 if step is None else step
        self.batch_loops, self.row = None, 0
        self.set_loops(None)

    @property
    def core(self):
        """The cartlab model inside the transformers wrapper (CART, Dense or LRT)."""
        return self.model.model

    @property
    def loops(self) -> bool:
        """Whether the model has a loop count to vary (CART)."""
        return family_of(self.core.config).loops

    def set_loops(self, n_loops: int | None, exit: str | None = None, exit_threshold: float | None = None) -> None:
        """Score with `n_loops` (None: the trained R) and the exit rule `exit`, through the
        exported config's fields (the wrapper's defaults for every call); restart the loop count."""
        rule = exit_kw(self.core, exit, exit_threshold)
        config = self.model.config
        config.n_loops = getattr(self.core.config, "n_loops", None) if n_loops is None else int(n_loops)
        config.exit, config.exit_threshold = rule.get("exit"), rule.get("exit_threshold")
        self.loop_total, self.loop_tokens = 0, 0

    # -- watching HFLM score ---------------------------------------------------------------------
    def _model_call(self, inps, attn_mask=None, labels=None):
        logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)  # (B, T, V)
        self.batch_loops, self.row = getattr(self.core, "loops_per_token", None), 0  # (B, T): this batch's
        return logits

    def _select_cont_toks(self, logits, contlen=None, inplen=None):
        """Row `self.row`'s scored positions are inplen - contlen .. inplen - 1."""
        if self.batch_loops is not None:
            self.count_loops(self.batch_loops[self.row, inplen - contlen: inplen])
            self.row += 1
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        wrapper = self.model
        total, tokens = wrapper.loop_total, wrapper.loop_tokens
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        self.loop_total += wrapper.loop_total - total
        self.loop_tokens += wrapper.loop_tokens - tokens
        return out

    # -- progress bars ---------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)  # its tokenizing bar

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or self.quiet, override_bs=override_bs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self.quiet)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=disable_tqdm or self.quiet)


KNOWN = ("model kwarg is not of type", "already-initialized model")
"""HFLM's warnings that a model object, not a name, was passed: cartlab passes one on purpose."""


@contextlib.contextmanager
def without_model_object_warnings():
    """HFLM without its `KNOWN` warnings."""
    logger = logging.getLogger(HFLM.__module__)

    def keep(record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in KNOWN)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
