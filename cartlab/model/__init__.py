"""CART and Dense language models, the ablation hooks of section 8, and their accounting.

    from cartlab.model import CARTConfig, build_model, account
    cfg = CARTConfig.paper(d_model=256, hooks=("no_lti", "unshare_core"))
    model = build_model(cfg)
"""
from cartlab.model.config import CARTConfig, ConfigError, DenseConfig, LMConfig
from cartlab.model.hooks import HOOKS, PAPER_ABLATIONS, register_hook
from cartlab.model.layers import KVCache
from cartlab.model.cart import CART
from cartlab.model.dense import Dense

MODELS = {"cart": CART, "dense": Dense}


def build_model(cfg: LMConfig):
    """The model a config describes (CART for CARTConfig, Dense for DenseConfig)."""
    return MODELS[cfg.kind](cfg)


from cartlab.model.accounting import Accounting, account, matched_dense  # noqa: E402

__all__ = [
    "CARTConfig", "DenseConfig", "LMConfig", "ConfigError", "CART", "Dense", "KVCache", "build_model",
    "HOOKS", "PAPER_ABLATIONS", "register_hook", "Accounting", "account", "matched_dense",
]
