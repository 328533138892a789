"""Model families of cartlab (`cartlab.model.family`): CART, its Dense baseline, and LRT (Dense
with a recurrent memory: our hooks lrt_kv, lrt_residual, or the published recipe lrt_paper); the
ablation hooks of section 8; their accounting.

    from cartlab.model import CARTConfig, LRTConfig, build_model, account
    cfg = CARTConfig.paper(d_model=256, hooks=("no_lti", "unshare_core"))
    model = build_model(cfg)
    lrt = build_model(LRTConfig(d_model=512, n_layers=12, hooks=("lrt_kv", "lrt_residual")))
"""
from cartlab.model.family import FAMILIES, ModelSpec, build_model, family_of, register_family
from cartlab.model.config import CARTConfig, ConfigError, DenseConfig, LMConfig
from cartlab.model.hooks import HOOKS, PAPER_ABLATIONS, register_hook
from cartlab.model.layers import KVCache
from cartlab.model.cart import CART
from cartlab.model.dense import Dense
from cartlab.model.lrt import LRT, LRT_HOOKS, LRTConfig
from cartlab.model.memory import exact_reference
from cartlab.model.accounting import Accounting, account, matched_dense, memory_overhead
from cartlab.model.probes import logit_lens, loop_contraction, loop_maps, mean_settle_loop

MODELS = {name: spec.model for name, spec in FAMILIES.items()}
"""Model classes by family name (`FAMILIES` holds the full specs)."""

__all__ = [
    "CARTConfig", "DenseConfig", "LRTConfig", "LMConfig", "ConfigError", "CART", "Dense", "LRT", "KVCache",
    "build_model", "ModelSpec", "register_family", "FAMILIES", "family_of", "MODELS",
    "HOOKS", "PAPER_ABLATIONS", "LRT_HOOKS", "register_hook", "Accounting", "account", "matched_dense",
    "memory_overhead", "exact_reference", "logit_lens", "loop_contraction", "loop_maps", "mean_settle_loop",
]
