"""cartlab: ablation-and-analysis toolkit for depth-recurrent language models.

Subpackages:
    cartlab.model     CART and Dense models, ablation hooks, parameter/FLOP accounting
    cartlab.data      tokenizers, corpora, token bins and loaders
    cartlab.analysis  scaling fits, seed-noise statistics, gap decomposition, spectral analysis

Importing `cartlab` is cheap: subpackages are imported on first use. It also teaches transformers'
auto classes the cartlab model type, when (and if) they are imported (`cartlab.export.auto`).
"""

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """transformers' AutoConfig/AutoModelForCausalLM learn the cartlab model type once they are
    imported (`cartlab.export.auto`): exported models load without trust_remote_code here."""
    from cartlab.export.auto import install

    install()


_register_with_transformers()
