"""Document sources: Hugging Face datasets, local text/jsonl/parquet files, the embedded corpus.

A source yields documents (strings) in a fixed order. `load_hf_dataset` is the one place that
calls `datasets`: the same call serves a hub name (`roneneldan/TinyStories`) and a local dataset
folder or file list, so tests exercise the hub code path offline on data they make.

Train/validation split of one stream (`val_fraction`): each document goes to validation when
`split_bucket(text) < val_fraction`, a hash of its text. Identical texts therefore always land on
the same side, and validation text never appears in train. Documents in the lowest
`TOKENIZER_HOLDOUT` bucket are never used to train the embedded tokenizer.
"""
from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from cartlab.config import Config
from cartlab.config import field as cfield
from cartlab.data.embedded import prose_documents, story_documents
from cartlab.data.iteration import iteration_documents
from cartlab.data.uniform import uniform_documents
from cartlab.data.hub import is_offline

SOURCE_TYPES = ("embedded", "hf", "jsonl", "parquet", "text")
EMBEDDED_GENERATORS: dict[str, Callable[..., Iterator[str]]] = {
    "prose": prose_documents,
    "stories": story_documents,
    "iteration": iteration_documents,
    "uniform": uniform_documents,  # the causal-leak study (data/recipes/causal-leak.yaml)
}
TOKENIZER_HOLDOUT = 0.1


def split_bucket(text: str) -> float:
    """A number in [0, 1) fixed by the text alone (blake2b of its UTF-8 bytes)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass
class SourceConfig(Config):
    """Where one stream of documents comes from."""

    type: str = cfield("embedded", choices=SOURCE_TYPES)
    """One of: embedded, hf, jsonl, parquet, text."""
    path: str | None = None
    """hf: hub name or local dataset folder; jsonl/parquet/text: a file, folder or glob."""
    name: str | None = None
    """hf: dataset config name (e.g. `20231101.en`); embedded: prose, stories or iteration."""
    split: str = "train"
    """hf: the split to read."""
    data_files: str | list[str] | None = None
    """hf: file patterns inside the dataset, e.g. one parquet shard."""
    text_field: str = "text"
    """hf/jsonl/parquet: the column holding the document text."""
    num_shards: int = cfield(1, ge=1)
    """Split the dataset into this many contiguous shards (streaming: by data file)..."""
    shards: list[int] | str | None = None
    """...and read only these (a list of indices or a range "a:b"); None reads all."""
    streaming: bool = False
    """hf: stream instead of downloading everything first (the paper-size recipes)."""
    options: dict[str, Any] = field(default_factory=dict)
    """embedded: keyword arguments of the generator (e.g. k_min, k_max for iteration)."""

    def validate(self) -> None:
        if self.type == "embedded":
            if self.name not in EMBEDDED_GENERATORS:
                raise self.reject("name", f"an embedded source is one of {', '.join(sorted(EMBEDDED_GENERATORS))}")
        elif not self.path:
            raise self.reject("path", f"a {self.type} source needs a path (a hub name, file, folder or glob)")
        try:
            bad = [i for i in self.shard_indices() if not 0 <= i < self.num_shards]
        except ValueError:
            raise self.reject("shards", "must be a list of integers or a range 'a:b'") from None
        if bad:
            raise self.reject("shards", f"{bad} are outside 0..{self.num_shards - 1}")

    def shard_indices(self) -> list[int]:
        if self.shards is None:
            return list(range(self.num_shards))
        if isinstance(self.shards, str):
            try:
                a, b = (int(x) for x in self.shards.split(":"))
            except ValueError:
                raise ValueError(f"shards must be a list of integers or a range 'a:b', "
                                 f"got {self.shards!r}") from None
            return list(range(a, b))
        return [int(i) for i in self.shards]

    def describe(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if v not in (None, {}, [])}
        return d


def _local_files(pattern: str) -> list[str]:
    p = Path(pattern).expanduser()
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    files = sorted(glob.glob(str(p), recursive=True))
    if not files:
        raise ValueError(f"no files match {pattern!r}")
    return files


def load_hf_dataset(src: SourceConfig):
    """`datasets.load_dataset` for a hub name, a local dataset folder, or local jsonl/parquet files.

    Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set), a name that is not a local path raises a
    ValueError at once instead of reaching for the network.
    """
    import datasets

    if src.type in ("jsonl", "parquet"):
        builder = "json" if src.type == "jsonl" else "parquet"
        return datasets.load_dataset(builder, data_files=_local_files(src.path), split="train",
                                     streaming=src.streaming)
    local = Path(src.path).expanduser()
    if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(local))  # a `save_to_disk` folder
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise ValueError(f"split {src.split!r} not in {local} (has {sorted(ds)})")
            ds = ds[src.split]
        return ds.to_iterable_dataset() if src.streaming else ds
    if not local.exists() and is_offline():
        raise ValueError(f"dataset {src.path!r} is not a local path and Hugging Face offline mode is "
                         f"on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); unset it to download, or point "
                         f"`path` at a local copy (a save_to_disk folder, or jsonl/parquet files)")
    try:
        return datasets.load_dataset(src.path if not local.exists() else str(local), src.name,
                                     split=src.split, data_files=src.data_files, streaming=src.streaming)
    except ConnectionError as err:  # datasets' own offline / unreachable-hub error
        raise ValueError(f"could not load dataset {src.path!r}: {err}") from err


def _shards(ds, src: SourceConfig) -> list:
    if src.num_shards == 1:
        return [ds]
    if src.streaming:
        if ds.num_shards < src.num_shards:
            raise ValueError(f"num_shards={src.num_shards} but the streamed dataset {src.path!r} has "
                             f"only {ds.num_shards} data files to shard by")
        return [ds.shard(num_shards=src.num_shards, index=i) for i in src.shard_indices()]
    return [ds.shard(num_shards=src.num_shards, index=i, contiguous=True) for i in src.shard_indices()]


def iter_documents(src: SourceConfig, seed: int = 0) -> Iterator[str]:
    """The documents of `src`, in order. Generated sources are endless; others are finite."""
    src.validate()
    if src.type == "embedded":
        yield from EMBEDDED_GENERATORS[src.name](seed=seed, **src.options)
        return
    if src.type == "text":  # each file is one document
        for f in _local_files(src.path):
            text = Path(f).read_text(encoding="utf-8")
            if text.strip():
                yield text
        return
    for part in _shards(load_hf_dataset(src), src):
        if src.text_field not in (part.column_names or [src.text_field]):
            raise ValueError(f"text_field {src.text_field!r} is not a column of {src.path!r} "
                             f"(columns: {part.column_names})")
        for row in part:
            text = row[src.text_field]
            if text and text.strip():
                yield text

