"""CART and Dense language models, the ablation hooks of section 8, LRT's recurrent memory on
Dense (hooks lrt_kv, lrt_residual), and their accounting.

    from cartlab.model import CARTConfig, DenseConfig, build_model, account
    cfg = CARTConfig.paper(d_model=256, hooks=("no_lti", "unshare_core"))
    model = build_model(cfg)
    lrt = build_model(DenseConfig(d_model=512, n_layers=12, hooks=("lrt_kv", "lrt_residual")))
"""
from cartlab.model.config import CARTConfig, ConfigError, DenseConfig, LMConfig
from cartlab.model.hooks import HOOKS, LRT_HOOKS, PAPER_ABLATIONS, register_hook
from cartlab.model.layers import KVCache
from cartlab.model.cart import CART
from cartlab.model.dense import Dense
from cartlab.model.memory import exact_reference

MODELS = {"cart": CART, "dense": Dense}


def build_model(cfg: LMConfig):
    """The model a config describes (CART for CARTConfig, Dense for DenseConfig)."""
    return MODELS[cfg.kind](cfg)


from cartlab.model.accounting import Accounting, account, matched_dense, memory_overhead  # noqa: E402
from cartlab.model.probes import logit_lens, loop_contraction, loop_maps, mean_settle_loop  # noqa: E402

__all__ = [
    "CARTConfig", "DenseConfig", "LMConfig", "ConfigError", "CART", "Dense", "KVCache", "build_model",
    "HOOKS", "PAPER_ABLATIONS", "LRT_HOOKS", "register_hook", "Accounting", "account", "matched_dense",
    "memory_overhead", "exact_reference", "logit_lens", "loop_contraction", "loop_maps", "mean_settle_loop",
]
