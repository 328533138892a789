"""meta.json: the record of a build, and the checks that tie its files together.

A build directory holds train.bin, one val_<domain>.bin per domain, tokenizer.json and meta.json.
meta.json is written last, so a directory without it is not a completed build. `load_meta`
checks that every file it lists exists and that its header agrees with the record (token count,
vocabulary, tokenizer hash), so files from two builds or two tokenizers are never mixed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from cartlab.data.binfile import file_sha256, read_header

META_FORMAT = "cartlab-data-meta/1"
META_NAME = "meta.json"


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_meta(build_dir: str | Path, *, verify_sha256: bool = False) -> dict:
    """Read `<build_dir>/meta.json` and check every listed file against it.

    Returns the metadata with `dir` set to the absolute build directory. Raises ValueError if the
    build is incomplete, a file is missing, truncated or foreign, or a header disagrees with the
    record; with `verify_sha256`, also if a file's content changed.
    """
    build_dir = Path(build_dir).resolve()
    path = build_dir / META_NAME
    if not path.is_file():
        raise ValueError(f"{build_dir} has no {META_NAME}: not a completed build "
                         f"(never built, or the build was interrupted)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {META_FORMAT!r}")
    tok = meta["tokenizer"]
    for name, info in meta["files"].items():
        header = read_header(build_dir / name)
        if header.tokenizer_hash != tok["hash"]:
            raise ValueError(f"tokenizer mismatch: {name} was made by tokenizer {header.tokenizer_hash[:12]} "
                             f"but {META_NAME} records {tok['name']} {tok['hash'][:12]}")
        if header.vocab_size != tok["vocab_size"]:
            raise ValueError(f"metadata mismatch: {name} has vocab_size {header.vocab_size}, "
                             f"{META_NAME} records {tok['vocab_size']}")
        if header.n_tokens != info["n_tokens"]:
            raise ValueError(f"metadata mismatch: {name} holds {header.n_tokens} tokens, "
                             f"{META_NAME} records {info['n_tokens']}")
        if header.dtype.name != meta["dtype"]:
            raise ValueError(f"metadata mismatch: {name} has dtype {header.dtype.name}, "
                             f"{META_NAME} records {meta['dtype']}")
        if verify_sha256 and file_sha256(build_dir / name) != info["sha256"]:
            raise ValueError(f"metadata mismatch: sha256 of {name} differs from {META_NAME}")
    meta["dir"] = str(build_dir)
    return meta
