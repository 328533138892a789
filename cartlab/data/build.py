"""`cartlab data build`: a recipe -> train.bin, val_<domain>.bin, tokenizer.json, meta.json.

The steps, as in the paper (sections 4.1, 4.4, 11):

1. Split the training tokens between domains by ratio, in whole chunks (largest remainder).
2. For each domain, read documents in order, encode them in parallel batches (documents joined by
   the end-of-text id) and cut the stream into `chunk_size`-token chunks until the domain's quota
   is met; held-out documents go to `val_<domain>.bin`. Each document is used at most once.
3. Shuffle the chunks of all domains with the recipe seed and write them to train.bin: a single
   pass, no repetition, every chunk from one domain.

Everything is written into a staging folder inside the output directory and moved into place at
the end, meta.json last: an interrupted build leaves the previous build (or nothing) complete, and
no file that looks complete. A build holds a lock on its output folder, so a second build of the
same folder (two `cartlab train` runs on a fresh clone) waits and then finds the first one's
result; the staging folders of killed builds are removed by the next build.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

import cartlab
from cartlab.data import paths
from cartlab.data.binfile import BinWriter, dtype_for_vocab, file_sha256, open_bin
from cartlab.data.embedded import python_version
from cartlab.data.meta import META_FORMAT, META_NAME, load_meta, write_json_atomic
from cartlab.data.recipe import DomainConfig, Recipe, load_recipe
from cartlab.data.sources import iter_documents, split_bucket
from cartlab.data.tokenizer import Tokenizer, get_tokenizer
from cartlab.filelock import file_lock

CHUNK_DOMAINS = "train_chunk_domains.npy"  # uint8 per chunk of train.bin: index into meta["domains"]


def chunk_quotas(recipe: Recipe) -> dict[str, int]:
    """Chunks of train.bin per domain: ratios normalised, rounded by largest remainder."""
    n_chunks = recipe.train_tokens // recipe.chunk_size
    total = sum(d.ratio for d in recipe.domains)
    exact = [n_chunks * d.ratio / total for d in recipe.domains]
    quotas = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in by_remainder[: n_chunks - sum(quotas)]:
        quotas[i] += 1
    return {d.name: q for d, q in zip(recipe.domains, quotas)}


def _batched(it: Iterator[str], n: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(it, n)):
        yield batch


def _write_docs(writer: BinWriter, tok: Tokenizer, docs: list[str], room: int) -> int:
    """Encode `docs`, append each with end-of-text, write at most `room` tokens; return written."""
    if not docs or room <= 0:
        return 0
    ids = tok.encode_batch(docs)
    total = sum(len(x) for x in ids) + len(ids)
    eos = [tok.eos_id]
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, eos) for x in ids),
                       dtype=np.int64, count=total)
    flat = flat[:room]
    writer.write(flat)
    return int(flat.size)


def _fill(writer: BinWriter, tok: Tokenizer, docs: Iterator[str], quota: int, batch: int, bar) -> int:
    n = 0
    for group in _batched(docs, batch):
        k = _write_docs(writer, tok, group, quota - n)
        n += k
        bar.update(k)
        if n >= quota:
            break
    return n


def _build_domain(domain: DomainConfig, tok: Tokenizer, recipe: Recipe, train_quota: int,
                  staging: Path, progress: bool) -> dict:
    """Write staging/train_<d>.bin (exactly `train_quota` tokens) and staging/val_<d>.bin."""
    common = dict(vocab_size=tok.vocab_size, tokenizer_hash=tok.hash)
    bar = tqdm(total=train_quota + domain.val_tokens, desc=f"{domain.name:>10}", unit="tok",
               unit_scale=True, disable=not progress, leave=True, file=sys.stderr)
    with bar, BinWriter(staging / f"train_{domain.name}.bin", chunk_size=recipe.chunk_size, **common) as tw, \
            BinWriter(staging / f"val_{domain.name}.bin", **common) as vw:
        if domain.val is not None:  # held-out documents come from their own split / shard
            n_train = _fill(tw, tok, iter_documents(domain.train, recipe.seed), train_quota,
                            recipe.encode_batch_docs, bar)
            n_val = _fill(vw, tok, iter_documents(domain.val, recipe.seed), domain.val_tokens,
                          recipe.encode_batch_docs, bar)
        else:  # one stream, split by text hash
            n_train = n_val = 0
            for group in _batched(iter_documents(domain.train, recipe.seed), recipe.encode_batch_docs):
                held = [split_bucket(d) < domain.val_fraction for d in group]
                k = _write_docs(tw, tok, [d for d, h in zip(group, held) if not h], train_quota - n_train)
                v = _write_docs(vw, tok, [d for d, h in zip(group, held) if h], domain.val_tokens - n_val)
                n_train, n_val = n_train + k, n_val + v
                bar.update(k + v)
                if n_train >= train_quota and n_val >= domain.val_tokens:
                    break
        if n_train < train_quota:
            raise ValueError(f"domain {domain.name!r} ran out of documents: {n_train} training tokens "
                             f"available, the recipe asks for {train_quota} (lower train_tokens or "
                             f"recipe.domains[].ratio of {domain.name!r})")
    return {"train_tokens": n_train, "val_tokens": n_val}


def _interleave(recipe: Recipe, tok: Tokenizer, quotas: dict[str, int], staging: Path,
                progress: bool) -> np.ndarray:
    """Shuffle all domains' chunks into staging/train.bin; return each chunk's domain index."""
    c = recipe.chunk_size
    parts = {name: open_bin(staging / f"train_{name}.bin").tokens.reshape(-1, c) for name in quotas}
    labels = np.concatenate([np.full(q, i, dtype=np.int64) for i, q in enumerate(quotas.values())])
    index = np.concatenate([np.arange(q, dtype=np.int64) for q in quotas.values()])
    order = np.random.default_rng(recipe.seed).permutation(len(labels))
    names = list(quotas)
    per_write = max(1, (1 << 22) // c)  # ~4M tokens per write
    with BinWriter(staging / "train.bin", vocab_size=tok.vocab_size, tokenizer_hash=tok.hash,
                   chunk_size=c) as w:
        for start in tqdm(range(0, len(order), per_write), desc="   shuffle", unit="block",
                          disable=not progress, file=sys.stderr):
            sel = order[start:start + per_write]
            buf = np.empty((len(sel), c), dtype=w.header.dtype)
            for i, name in enumerate(names):
                mask = labels[sel] == i
                buf[mask] = parts[name][index[sel][mask]]
            w.write(buf.reshape(-1))
    for name in names:
        (staging / f"train_{name}.bin").unlink()
    return labels[order]


def build(recipe: Recipe | str, out_dir: str | Path | None = None, *, progress: bool = True,
          force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build `recipe` into `out_dir` (default `<data root>/built/<name>`); return the metadata.

    An existing build of the same recipe is kept (nothing to do); one of a different recipe is
    refused unless `force`.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    recipe.validate()
    out = Path(out_dir) if out_dir is not None else paths.built_dir(recipe.name)
    check_out(out, force)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out, log):
        return _build_locked(recipe, out, progress, force, log)


def check_out(out: Path, force: bool) -> None:
    """Refuse, before anything is made, an output that is a file, or a non-empty folder that is not
    a build (no meta.json) unless `force`: a build writes its bins there, and --force replaces."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a folder")
    if out.is_dir() and not (out / META_NAME).exists() and not force:
        foreign = [p.name for p in out.iterdir() if not p.name.startswith(".staging-")]
        if foreign:
            raise ValueError(f"--out: {out} holds files that are not a data build ({', '.join(sorted(foreign)[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); choose an empty folder, or pass --force")


@contextlib.contextmanager
def _exclusive(out: Path, log: Callable[[str], None]):
    """Hold the lock `.<name>.lock` beside `out` for a whole build (a second build waits for
    it). Staging folders found once the lock is held belong to builds that were killed: removed."""
    with file_lock(out.parent / f".{out.name}.lock",
                   busy=lambda _: log(f"{out}: another build of this folder is running; waiting for it")):
        for stale in out.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


def _build_locked(recipe: Recipe, out: Path, progress: bool, force: bool, log: Callable[[str], None]) -> dict:
    if (out / META_NAME).exists() and not force:
        old = json.loads((out / META_NAME).read_text(encoding="utf-8"))
        if old.get("recipe") == recipe.to_dict():
            meta = load_meta(out)
            log(f"{out} is already built from this recipe (use --force to rebuild)")
            return meta
        raise ValueError(f"{out} holds a build of a different recipe; pass force=True (--force) "
                         f"to replace it, or choose another output directory")

    t0 = time.time()
    tok = get_tokenizer(recipe.tokenizer, progress=progress)
    quotas = chunk_quotas(recipe)
    staging = out / f".staging-{int(t0 * 1000)}"
    staging.mkdir()
    try:
        log(f"building {recipe.name!r}: {sum(quotas.values()) * recipe.chunk_size:,} training tokens "
            f"in {recipe.chunk_size}-token chunks, tokenizer {tok.name} (vocab {tok.vocab_size}, "
            f"{tok.hash[:12]})")
        stats = {d.name: _build_domain(d, tok, recipe, quotas[d.name] * recipe.chunk_size, staging, progress)
                 for d in recipe.domains}
        labels = _interleave(recipe, tok, quotas, staging, progress)
        np.save(staging / CHUNK_DOMAINS, labels.astype(np.uint8))
        tok.save(staging / "tokenizer.json")
        meta = _metadata(recipe, tok, quotas, stats, staging, labels)
        write_json_atomic(staging / META_NAME, meta)
        _commit(staging, out, meta)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta = load_meta(out)
    log(f"built {recipe.name!r} in {time.time() - t0:.1f}s -> {out}")
    for name, info in meta["files"].items():
        log(f"  {name:<24} {info['n_tokens']:>12,} tokens  {info['role']}")
    log(f"  {CHUNK_DOMAINS:<24} domain of each {recipe.chunk_size}-token chunk of train.bin")
    log(f"  {'tokenizer.json':<24} {tok.name}, vocab {tok.vocab_size}")
    log(f"  {META_NAME:<24} tokenizer, sources, seed, shares, sha256")
    return meta


def _metadata(recipe: Recipe, tok: Tokenizer, quotas: dict[str, int], stats: dict, staging: Path,
              labels: np.ndarray) -> dict:
    import tokenizers

    c = recipe.chunk_size
    n_train = int(len(labels)) * c
    files = {"train.bin": {"role": "train (all domains, chunk-interleaved)", "n_tokens": n_train,
                           "sha256": file_sha256(staging / "train.bin")}}
    for d in recipe.domains:
        name = f"val_{d.name}.bin"
        files[name] = {"role": f"validation ({d.name})", "domain": d.name,
                       "n_tokens": stats[d.name]["val_tokens"], "sha256": file_sha256(staging / name)}
    return {
        "format": META_FORMAT,
        "recipe_name": recipe.name,
        "tokenizer": {**tok.describe(), "file": "tokenizer.json"},
        "dtype": dtype_for_vocab(tok.vocab_size).name,
        "chunk_size": c,
        "seed": recipe.seed,
        "domains": [d.name for d in recipe.domains],
        "chunk_domains_file": CHUNK_DOMAINS,
        "train_tokens": n_train,
        "tokens_per_domain": {name: q * c for name, q in quotas.items()},
        "share_per_domain": {name: q * c / n_train for name, q in quotas.items()},
        "val_tokens_per_domain": {d.name: stats[d.name]["val_tokens"] for d in recipe.domains},
        "sources": {d.name: {"train": d.train.describe(),
                             "val": d.val.describe() if d.val else f"hash split of train, fraction {d.val_fraction}"}
                    for d in recipe.domains},
        "files": files,
        "versions": {"python": python_version(), "cartlab": cartlab.__version__,
                     "tokenizers": tokenizers.__version__, "numpy": np.__version__},
        "recipe": recipe.to_dict(),
    }


def _commit(staging: Path, out: Path, meta: dict) -> None:
    """Move staged files into `out`: old meta.json removed first, new meta.json written last."""
    (out / META_NAME).unlink(missing_ok=True)
    keep = set(meta["files"]) | {"tokenizer.json", CHUNK_DOMAINS}
    for stale in list(out.glob("train.bin")) + list(out.glob("val_*.bin")):
        if stale.name not in keep:
            stale.unlink()
    for name in sorted(keep):
        (staging / name).replace(out / name)
    (staging / META_NAME).replace(out / META_NAME)
