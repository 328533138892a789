"""transformers' view of a cartlab model: the config, the cache and the causal-LM wrapper that
`cartlab export` appends to the bundled model source in modeling_cartlab.py (trust_remote_code).

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # n_loops=8 for R=8
    model(ids).logits                                                            # cartlab's logits
    model.generate(ids, max_new_tokens=64, do_sample=False, n_loops=8)
    model.generate(ids, max_new_tokens=64, do_sample=False, exit="kl", exit_threshold=1e-3)  # per-token exits
    model.mean_loops_per_token()                                                 # since load / reset_loops()

`CartlabForCausalLM.model` is the cartlab model itself (CART or Dense, LRT included), rebuilt from
the cartlab config that config.json stores under `cartlab`, so its logits are cartlab's by
construction. Generation keeps cartlab's KV cache inside a transformers `Cache` (`CartlabCache`),
which `generate()` hands from one forward to the next: each new token runs one position, as in
cartlab's own `CausalLM.generate`. A batch of prompts of different lengths is left-padded
(`tokenizer.padding_side = "left"`) and its `attention_mask` goes through to cartlab's padding
mask (`CausalLM.positions`): each row generates what it would alone, LRT included (its memory
skips the pads: `cartlab.model.memory`).

This module imports cartlab only for names that the bundle defines in the same file; nothing in
it may need cartlab at run time (`cartlab.export.bundle`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from cartlab.export.config import CartlabConfig
from cartlab.model.cart import CART  # noqa: F401 - each family module registers its spec on import
from cartlab.model.config import LMConfig
from cartlab.model.dense import Dense  # noqa: F401
from cartlab.model.family import family_of, looping
from cartlab.model.layers import KVCache
from cartlab.model.lrt import LRT  # noqa: F401

CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""What this transformers version calls the cache in model outputs and `forward` (transformers 5
renamed `past_key_values` to `cache`)."""


class CartlabCache(Cache):
    """A cartlab `KVCache` behind transformers' `Cache` interface. `kv` holds every attention
    site's keys and values, LRT's memory and the count of positions seen; the cartlab model reads
    and extends it. Beam search and assisted decoding, which reorder or crop a cache, are refused."""

    def __init__(self):
        super().__init__(layers=[])
        self.kv = KVCache()

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.kv.pos

    @property
    def is_linear(self) -> list[bool]:
        return [False]  # a cache of positions: generate() slices the inputs it has already seen

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        self.kv = KVCache()

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError("a cartlab cache cannot be reordered, cropped or repeated: beam search and "
                                  "assisted decoding are not supported; use greedy decoding or sampling")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _refuse


class CartlabForCausalLM(PreTrainedModel, GenerationMixin):
    """A cartlab CART, Dense or LRT model as a transformers causal LM (see the module docstring)."""

    config_class = CartlabConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.wte.weight"}

    def __init__(self, config: CartlabConfig):
        super().__init__(config)
        cfg = LMConfig.from_dict(config.cartlab)
        self.model = family_of(cfg).build(cfg)
        self.post_init()
        self.reset_loops()

    def _init_weights(self, module) -> None:
        """Nothing: the cartlab model initialises itself when built, and the weights are then loaded."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # `forward` makes a CartlabCache when generate() asks for a cache

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value) -> None:
        self.model.wte = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def loop_kw(self, n_loops: int | None, exit: str | None = None, exit_threshold: float | None = None) -> dict:
        """The cartlab forward's loop arguments: this call's R and exit rule, else the config's (CART only)."""
        kw = {"n_loops": self.config.n_loops if n_loops is None else n_loops}
        if exit is not None or self.config.exit is not None:
            kw.update(exit=exit if exit is not None else self.config.exit,
                      exit_threshold=exit_threshold if exit is not None else self.config.exit_threshold)
        kw = {k: v for k, v in kw.items() if v is not None}
        if kw and not family_of(self.model.config).loops:
            name, value = next(iter(kw.items()))
            raise ValueError(f"{name}={value!r} is not allowed: only {looping()} models loop; this model is "
                             f"{self.model.config.kind}")
        return kw

    def reset_loops(self) -> None:
        """Restart the count behind `mean_loops_per_token`."""
        self.loop_total, self.loop_tokens = 0, 0

    def mean_loops_per_token(self) -> float | None:
        """Mean loops per position over every forward since load or `reset_loops`, padding not
        counted (None for Dense)."""
        return self.loop_total / self.loop_tokens if self.loop_tokens else None

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, n_loops: int | None = None,
                return_dict: bool | None = None, cache: CartlabCache | None = None,
                past_key_values: CartlabCache | None = None, exit: str | None = None,
                exit_threshold: float | None = None, **kwargs):
        """input_ids (B, T) -> logits (B, T, V), and with `labels` (B, T) the mean next-token loss
        (transformers' convention: labels are the inputs, shifted here; -100 is ignored). With a
        cache (given, or made when `use_cache`) the call continues the cache's sequence."""
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if unsupported:
            raise ValueError(f"{type(self).__name__}.forward: unsupported argument(s) {unsupported}")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = CartlabCache()
        kv = None if cache is None else cache.kv
        logits, _ = self.model(input_ids, cache=kv, **self.loop_kw(n_loops, exit, exit_threshold),
                               **self.padding_kw(input_ids, attention_mask, kv))
        self.count_loops(input_ids.size(1), attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        if return_dict is False:
            return tuple(v for v in (loss, logits, cache) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_ARG: cache})

    def count_loops(self, width: int, attention_mask: torch.Tensor | None) -> None:
        """Add the loop counts of this call's `width` positions (a cache's count holds the whole
        sequence) to `mean_loops_per_token`: the real tokens only, not the padding the mask marks."""
        loops = getattr(self.model, "loops_per_token", None)
        if loops is None:
            return
        loops = loops[:, -width:]  # (B, width)
        real = torch.ones_like(loops, dtype=torch.bool) if attention_mask is None else attention_mask[:, -width:].bool()
        self.loop_total += int(loops[real].sum())
        self.loop_tokens += int(real.sum())

    def padding_kw(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, kv: KVCache | None) -> dict:
        """The cartlab forward's `attention_mask`: the new positions' columns of transformers' mask
        (which covers cache and new positions), when padding is in play; none for a mask of ones."""
        padded = kv is not None and "keys" in kv.states
        if attention_mask is None or (bool(attention_mask.all()) and not padded):
            return {}
        return {"attention_mask": attention_mask[:, -input_ids.size(1):]}

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      use_cache: bool | None = None, n_loops: int | None = None,
                                      exit: str | None = None, exit_threshold: float | None = None, **kwargs) -> dict:
        """The next forward's inputs: the positions the cache has not seen yet (all without a cache)."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported by cartlab models; pass input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache,
                "n_loops": n_loops, "exit": exit, "exit_threshold": exit_threshold, CACHE_ARG: cache}
