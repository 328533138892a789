"""The `cartlab` model for lm-evaluation-harness (paper sections 7.4 and 7.5).

    lm = CartlabLM(checkpoint="runs/<run>/checkpoints/step_00030500", n_loops=12, batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], num_fewshot=0)

Registered as "cartlab", so `--model cartlab --model_args checkpoint=...,n_loops=12` works in
lm_eval's own CLI once this module is imported (`pretrained=` is accepted for `checkpoint=`, as
lm-eval's hf model names it). Scoring runs the model on the harness's token ids: loglikelihood
batches right-padded sequences (padding after the scored positions cannot change them: the model
is causal), loglikelihood_rolling uses the harness's own rolling windows
(`get_rolling_token_windows` + `make_disjoint_window`) of the trained context length, and
generate_until decodes greedily with the KV cache, `batch_size` requests at a time as one
left-padded batch (attention mask), stopping each at its first `until` string. Each
kind of request shows a progress bar, as lm-eval's hf model does.

A CART model can score with a per-token exit rule (`cartlab.model.exits`; issue 27):
`--model_args checkpoint=...,n_loops=12,exit=kl,exit_threshold=0.001`; `n_loops` is then the most
loops a token runs, and `mean_loops()` is the mean loops per scored token since the last
`set_loops` (loglikelihood: the positions a request scores, padding not counted; generation:
every position decoded, the prompt included).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from cartlab.model import KVCache
from cartlab.model.family import family_of, looping


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's folder / checkpoints folder (its newest checkpoint)."""
    from cartlab import checkpoint

    p = Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint: {path} does not exist")
    for candidate in (p, p / "checkpoints"):
        if (candidate / "model.safetensors").is_file() or checkpoint.is_sharded(candidate):
            return candidate
        newest = checkpoint.latest(candidate) if candidate.is_dir() else None
        if newest is not None:
            return newest
    raise ValueError(f"checkpoint: {path} is not a checkpoint folder (model.safetensors or dcp/) nor a run folder "
                     f"holding checkpoints/")


def is_export(path: str | Path) -> bool:
    """Whether `path` is a transformers folder that `cartlab export` wrote (config.json of
    model_type cartlab): `cartlab eval` scores it with lm-eval's hf model (`cartlab.eval.exported`)."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "cartlab"
    except (ValueError, AttributeError):  # not JSON, or not an object
        return False


def resolve_device(device: str | None = "auto") -> str:
    """The device to evaluate on: 'auto' (or None) picks what the hardware supports, as training
    does (`cartlab.train.device.select`, which also refuses 'cuda' without a GPU in one line).
    From Python any other torch device name (cuda:1, mps) is taken as given, as lm-eval takes
    it; `cartlab eval --device` takes auto, cpu or cuda."""
    from cartlab.train.device import DEVICES, Capabilities, select

    if device is not None and device not in DEVICES:
        return device
    return select(Capabilities.detect(), device=device or "auto").device


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """(model in eval mode on `device`, tokenizer, checkpoint config dict) of a cartlab checkpoint."""
    from cartlab import checkpoint

    ckpt = resolve_checkpoint(path)
    model, config = checkpoint.build(ckpt)
    return model.to(device).eval(), checkpoint.load_tokenizer(ckpt), config


def exit_kw(model, exit: str | None, exit_threshold: float | str | None) -> dict:
    """The cartlab forward's exit arguments for `exit` and `exit_threshold` as lm-eval's model
    args give them (strings allowed; "" is none), checked against `model`: {} for no rule. An
    unknown rule, a bad threshold, a model without loops or 'learned' without an exit head is one
    line naming the field."""
    from cartlab.model.exits import exit_rule

    if exit in (None, "") and exit_threshold in (None, ""):
        return {}
    if not family_of(model.config).loops:
        raise ValueError(f"exit: only {looping()} models loop; this checkpoint is {model.config.kind}")
    try:
        threshold = None if exit_threshold in (None, "") else float(exit_threshold)
    except ValueError:
        raise ValueError(f"exit_threshold: must be a number, got {exit_threshold!r}") from None
    exit = exit or None
    exit_rule(exit, threshold)  # refuses an unknown rule or a bad threshold now, in one line
    if exit == "learned" and getattr(model, "exit_head", None) is None:
        raise ValueError("exit: 'learned' needs a checkpoint trained with the hook exit_head; this one has none")
    return {"exit": exit, "exit_threshold": threshold}


class LoopMeter:
    """The running mean of loops per scored token of an lm-eval model over a CART (`loops`:
    whether it loops); `set_loops` restarts it."""

    loop_total, loop_tokens = 0, 0

    def count_loops(self, loops: torch.Tensor | None) -> None:
        """Add the loop counts of scored positions (any shape) to the running mean."""
        if loops is not None:
            self.loop_total += int(loops.sum())
            self.loop_tokens += loops.numel()

    def mean_loops(self) -> float | None:
        """Mean loops per scored token since `set_loops` (None for a model without loops, or before scoring)."""
        return self.loop_total / self.loop_tokens if self.loops and self.loop_tokens else None


@register_model("cartlab")
class CartlabLM(TemplateLM, LoopMeter):
    """A cartlab CART or Dense checkpoint as an lm-eval model. Model args: `checkpoint` (or
    `pretrained`, lm-eval's name), `n_loops` (CART only: inference loop count, section 7.4),
    `max_length` (default: the trained sequence length), `max_gen_toks`, plus the harness's
    `batch_size` and `device` (default 'auto': chosen by capability, as training does; its
    `max_batch_size` is accepted and unused: batches are exactly `batch_size`). Any other
    argument is an error."""

    MODEL_ARGS = ("checkpoint", "n_loops", "exit", "exit_threshold", "batch_size", "device", "max_length",
                  "max_gen_toks", "pretrained")

    def __init__(self, checkpoint: str | None = None, n_loops: int | None = None, batch_size: int | str = 1,
                 device: str | None = "auto", max_length: int | None = None, max_gen_toks: int = 128, *,
                 exit: str | None = None, exit_threshold: float | str | None = None,
                 pretrained: str | None = None, model=None, tokenizer=None, max_batch_size: int | None = None,
                 quiet: bool = False, **unknown):
        super().__init__()
        if unknown:  # a typo in --model_args must not be silently ignored (max_batch_size: lm-eval always passes it)
            raise ValueError(f"model_args: unknown argument(s) {sorted(unknown)} for the cartlab model; "
                             f"allowed: {list(self.MODEL_ARGS)}")
        if checkpoint is not None and pretrained is not None:
            raise ValueError("model_args: give checkpoint=PATH or pretrained=PATH, not both")
        checkpoint = checkpoint if checkpoint is not None else pretrained
        if (checkpoint is None) == (model is None):
            raise ValueError("cartlab model: give either checkpoint=PATH or an already built model and tokenizer")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size: 'auto' is not supported by the cartlab model; give an integer >= 1")
        self.batch_size, self.quiet = int(batch_size), bool(quiet)  # quiet: no progress bars
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self._device = torch.device(resolve_device(device))
        seq_len = None
        if checkpoint is not None:
            model, tokenizer, config = load_checkpoint(checkpoint, self._device)
            seq_len = config.get("train", {}).get("seq_len")
            self.run_id = config.get("run_id")
        self.model, self.tokenizer_ = model.to(self._device).eval(), tokenizer
        self.max_length = int(max_length or seq_len or 1024)
        self.max_gen_toks = int(max_gen_toks)
        self.set_loops(n_loops, exit, exit_threshold)

    @property
    def loops(self) -> bool:
        """Whether the model has a loop count to vary (CART)."""
        return family_of(self.model.config).loops

    def set_loops(self, n_loops: int | str | None, exit: str | None = None,
                  exit_threshold: float | str | None = None) -> None:
        """Score with `n_loops` iterations of the core (section 7.4); None or "" means the trained R.
        With `exit` (and `exit_threshold`), each token stops by that rule, after at most n_loops."""
        self.forward_kw = {}
        self.loop_total, self.loop_tokens = 0, 0
        self.set_exit(exit, exit_threshold)
        if n_loops in (None, ""):
            return
        if not self.loops:
            raise ValueError(f"n_loops: only {looping()} models loop; this checkpoint is {self.model.config.kind}")
        try:
            r = int(n_loops)
        except ValueError:
            raise ValueError(f"n_loops: must be an integer >= 1, got {n_loops!r}") from None
        if r < 1:
            raise ValueError(f"n_loops: must be an integer >= 1, got {n_loops!r}")
        self.forward_kw["n_loops"] = r

    def set_exit(self, exit: str | None, exit_threshold: float | str | None) -> None:
        self.forward_kw.update(exit_kw(self.model, exit, exit_threshold))

    @property
    def core(self):
        """The cartlab model that scores (CART, Dense or LRT)."""
        return self.model

    # -- tokenizer ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string)  # cartlab tokenizers never add special tokens

    def tok_decode(self, tokens) -> str:
        return self.tokenizer_.decode(tokens)

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def _logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """Logits of right-padded sequences: (B, T_max, V). Padding after a row's end cannot
        change its positions: the model is causal."""
        width = max(len(s) for s in seqs)
        idx = torch.full((len(seqs), width), self.eot_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            idx[i, : len(s)] = torch.tensor(s)
        return self.model(idx.to(self._device), **self.forward_kw)[0]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)  # its tokenizing bar

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether it is the greedy continuation. The
        model reads the last max_length + 1 tokens of context + continuation, minus the final
        one; an empty continuation scores (0.0, True), as in the harness's HF model."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for i in order:
            if not requests[i][2]:
                results[i] = (0.0, True)
            elif len(requests[i][2]) > self.max_length:
                raise ValueError(f"continuation: {len(requests[i][2])} tokens, longer than max_length="
                                 f"{self.max_length}; pass a larger max_length in --model_args")
        order = [i for i in order if results[i] is None]
        bar = tqdm(total=len(requests), initial=len(requests) - len(order), disable=disable_tqdm or self.quiet,
                   desc="Running loglikelihood requests")
        for start in range(0, len(order), self.batch_size):
            batch = order[start: start + self.batch_size]
            seqs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in batch]
            logits = self._logits(seqs)
            loops = getattr(self.model, "loops_per_token", None)
            for row, (i, seq) in enumerate(zip(batch, seqs)):
                cont = requests[i][2]
                n = len(cont)
                self.count_loops(None if loops is None else loops[row, len(seq) - n: len(seq)])
                # only the continuation's predictions go through log_softmax and to the CPU: (n, V)
                lp = F.log_softmax(logits[row, len(seq) - n: len(seq)].float(), dim=-1).cpu()
                target = torch.tensor(cont)
                results[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each whole string, scored in the harness's disjoint rolling
        windows of max_length predicted tokens: each token is predicted once, from a window of at
        most max_length input tokens (the first window starts with the end-of-text prefix)."""
        out = []
        for (string,) in tqdm([req.args for req in requests], disable=disable_tqdm or self.quiet,
                              desc="Running loglikelihood_rolling requests"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            out.append(sum(s for s, _ in scores))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding with the KV cache until an `until` string, the end token or
        `max_gen_toks` tokens (sampling arguments such as do_sample/temperature are not used:
        decoding is always greedy). The context keeps its last max_length - max_gen_toks tokens,
        and at least half of max_length: CART and Dense have no position limit, so a long answer
        may run past the trained length rather than lose its prompt. Requests run `batch_size`
        at a time, left-padded (the model's attention mask; each row decodes what it would alone);
        a model whose forward takes no attention_mask decodes one at a time."""
        args = [self.decoding(*req.args) for req in requests]
        size = self.batch_size if "attention_mask" in inspect.signature(self.model.forward).parameters else 1
        out: list[str] = []
        with tqdm(total=len(args), disable=disable_tqdm or self.quiet, desc="Running generate_until requests") as bar:
            for start in range(0, len(args), size):
                batch = args[start: start + size]
                out += [self.decode_one(*batch[0])] if len(batch) == 1 else self.decode_batch(batch)
                bar.update(len(batch))
        return out

    def decoding(self, context: str, gen_kwargs: dict) -> tuple[list[int], list[str], int]:
        """A request's context tokens (cut as `generate_until` says), stop strings and token budget."""
        until = gen_kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
        until = [until] if isinstance(until, str) else list(until)
        budget = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        ctx = self.tok_encode(context)[-max(self.max_length - budget, self.max_length // 2, 1):]
        return ctx or [self.eot_token_id], until, budget

    def cut(self, new: list[int], until: list[str]) -> str:
        text = self.tok_decode(new)
        for stop in until:
            text = text.split(stop)[0]
        return text

    def stops(self, new: list[int], until: list[str]) -> bool:
        return any(stop in self.tok_decode(new) for stop in until)

    def decode_one(self, ctx: list[int], until: list[str], budget: int) -> str:
        cache = KVCache()
        logits, _ = self.model(torch.tensor([ctx], device=self._device), cache=cache, **self.forward_kw)
        new: list[int] = []
        for _ in range(budget):
            nxt = int(logits[0, -1].argmax())
            if nxt == self.eot_token_id:
                break
            new.append(nxt)
            if self.stops(new, until):
                break
            logits, _ = self.model(torch.tensor([[nxt]], device=self._device), cache=cache, **self.forward_kw)
        self.count_loops(cache.states.get("loops"))
        return self.cut(new, until)

    def decode_batch(self, batch: list[tuple[list[int], list[str], int]]) -> list[str]:
        """Requests decoded as one left-padded batch; a row that has stopped feeds the end token
        (ignored) until every row has stopped. Loop counts: each row's prompt and decoded tokens."""
        width = max(len(ctx) for ctx, _, _ in batch)
        idx = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (ctx, _, _) in enumerate(batch):
            idx[i, width - len(ctx):], mask[i, width - len(ctx):] = torch.tensor(ctx), 1
        cache = KVCache()
        logits, _ = self.model(idx.to(self._device), cache=cache, attention_mask=mask.to(self._device), **self.forward_kw)
        news: list[list[int]] = [[] for _ in batch]
        live = [True] * len(batch)
        fed = [mask.bool()]  # (B, T) per call: the positions whose loop counts are a row's own
        for _ in range(max(budget for _, _, budget in batch)):
            nxt = logits[:, -1].argmax(-1).tolist()  # (B,)
            for i, (_, until, budget) in enumerate(batch):
                if live[i] and (nxt[i] == self.eot_token_id or len(news[i]) >= budget):
                    live[i] = False
                elif live[i]:
                    news[i].append(nxt[i])
                    live[i] = not self.stops(news[i], until)
            if not any(live):
                break
            step = [n if alive else self.eot_token_id for n, alive in zip(nxt, live)]
            fed.append(torch.tensor(live)[:, None])
            logits, _ = self.model(torch.tensor(step, device=self._device)[:, None], cache=cache, **self.forward_kw)
        loops = cache.states.get("loops")
        if loops is not None:
            self.count_loops(loops[torch.cat(fed, dim=1).to(loops.device)])
        return [self.cut(new, until) for new, (_, until, _) in zip(news, batch)]
