"""cartlab.data: tokenizers, corpora, token bins and batch loaders.

    open_bin(path) -> TokenBin                  a token bin as a memmap, header checked
    BatchLoader(bin, batch_size, seq_len, ...)  (x, y) batches, sequential or random, resumable
    load_meta(dir) -> dict                      a build's meta.json, files checked against it
    get_tokenizer(name_or_meta) -> Tokenizer    `embedded`, `llama2`, or a build's own tokenizer
    load_recipe(name) -> Recipe                 data/recipes/NAME.yaml, validated
    build(recipe, out_dir=None) -> dict         write train.bin, val_<domain>.bin, meta.json
    resolve_data(data) -> Path                  the build a run's `data` section names (embedded: built on first use)

Names are imported on first use, so `import cartlab.data` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "open_bin": "binfile", "TokenBin": "binfile", "BinWriter": "binfile", "read_header": "binfile",
    "BatchLoader": "loader",
    "load_meta": "meta",
    "get_tokenizer": "tokenizer", "Tokenizer": "tokenizer", "TokenizerConfig": "tokenizer",
    "load_recipe": "recipe", "Recipe": "recipe", "DomainConfig": "recipe",
    "SourceConfig": "sources", "iter_documents": "sources", "load_hf_dataset": "sources",
    "build": "build",
    "data_root": "paths",
    "resolve_data": "resolve",
    "check_iteration_sample": "iteration",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"cartlab.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cartlab.data' has no attribute {name!r}")
