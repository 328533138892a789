"""cartlab: ablation-and-analysis toolkit for depth-recurrent language models.

Subpackages:
    cartlab.model     CART and Dense models, ablation hooks, parameter/FLOP accounting
    cartlab.data      tokenizers, corpora, token bins and loaders
    cartlab.analysis  scaling fits, seed-noise statistics, gap decomposition, spectral analysis

Importing `cartlab` is cheap: subpackages are imported on first use.
"""

__version__ = "0.1.0"
