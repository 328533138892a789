"""Tokenizers: `embedded` (a byte-level BPE trained here) and `llama2` (the paper's, 32,000 ids).

Both are Hugging Face `tokenizers` pipelines behind one small wrapper, `Tokenizer`, whose `hash`
is the sha256 of the pipeline's canonical JSON. Every token bin records that hash, so files made
by two different tokenizers are never mixed.

* `embedded`: trained with `tokenizers.trainers.BpeTrainer` on the embedded corpus (train side of
  the hash split only), deterministic, cached as `<data root>/cache/tokenizers/embedded-*.json`.
* `llama2`: loaded with `PreTrainedTokenizerFast(tokenizer_file=...)` from a local tokenizer.json
  (`path`, or the cache); when online and no file is given, `tokenizer.json` is fetched once from
  the hub repository into the cache and then loaded through the same local-file path. (Loading a
  folder with `AutoTokenizer` can rebuild the pipeline and treat leading spaces differently.)
  With HF_HUB_OFFLINE set the hub is never tried; otherwise it is tried once, briefly
  (`cartlab.data.hub`), and a failure is one line saying which local file to pass.

Imports go one way: recipe -> tokenizer -> sources -> (embedded, iteration, hub).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from cartlab.config import Config, ConfigError
from cartlab.data import paths
from cartlab.data.embedded import EMBEDDED_CORPUS_VERSION, python_version
from cartlab.data.hub import fetch_file, is_offline  # noqa: F401  (is_offline: re-exported)
from cartlab.data.sources import EMBEDDED_GENERATORS, TOKENIZER_HOLDOUT, split_bucket

TOKENIZER_NAMES = ("embedded", "llama2")
TOKENIZER_DOMAINS = ("iteration", "prose", "stories")
"""The embedded generators the embedded tokenizer trains on. Fixed, not every registered
generator: registering a new one (e.g. `uniform`) must not change the tokenizer of existing builds."""
EMBEDDED_EOS = "<|endoftext|>"
LLAMA2_HUB_REPO = "NousResearch/Llama-2-7b-hf"


@dataclass
class TokenizerConfig(Config):
    """Which tokenizer a recipe uses, and how to make or find it."""

    name: str = "embedded"
    """`embedded` (trained offline on the embedded corpus) or `llama2` (the paper's)."""
    vocab_size: int = 4096
    """embedded only: size of the trained vocabulary, special token included (256..65536 fits uint16)."""
    train_chars: int = 4_000_000
    """embedded only: characters of embedded text to train on (split evenly over its domains)."""
    seed: int = 0
    """embedded only: seed of the generated domains that the training text is drawn from."""
    path: str | None = None
    """llama2 only: a local tokenizer.json; if unset, `<data root>/cache/tokenizers/llama2/tokenizer.json`."""
    hub_repo: str = LLAMA2_HUB_REPO
    """llama2 only: hub repository to fetch tokenizer.json from when online and no file exists."""

    def validate(self) -> None:
        if self.name not in TOKENIZER_NAMES:
            raise self.reject("name", f"choose one of {', '.join(TOKENIZER_NAMES)}")
        if self.name == "embedded" and not 256 < self.vocab_size <= 2**20:
            raise self.reject("vocab_size", "must be in (256, 1048576] for the byte-level embedded tokenizer")
        if self.train_chars < 10_000:
            raise self.reject("train_chars", "must be >= 10000")


class Tokenizer:
    """A `tokenizers` pipeline with the few things cartlab needs.

    `encode` never adds special tokens; documents are separated by appending `eos_id`.
    """

    def __init__(self, backend: tokenizers.Tokenizer, name: str, eos_token: str):
        self.backend = backend
        self.name = name
        self.eos_token = eos_token
        eos = backend.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"tokenizer {name!r} has no end-of-text token {eos_token!r}")
        self.eos_id: int = eos
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.hash: str = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel on all cores (the Rust thread pool of `tokenizers`)."""
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes of the text each id stands for (0 for special tokens), for bits per byte."""
        return token_bytes(self.backend)

    def save(self, path: str | Path) -> Path:
        """Write the pipeline as tokenizer.json (atomically)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tmp.write_text(self.backend.to_str(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def describe(self) -> dict:
        return {"name": self.name, "hash": self.hash, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "eos_token": self.eos_token}

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, hash={self.hash[:12]})"


# --- embedded ------------------------------------------------------------------------------

def train_embedded_backend(texts: Iterable[str], vocab_size: int, progress: bool = False) -> tokenizers.Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) with `<|endoftext|>` as id 0."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EMBEDDED_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _embedded_training_text(cfg: TokenizerConfig) -> list[str]:
    """Training text: train-side documents of each embedded domain, `train_chars` in total."""
    per_domain = cfg.train_chars // len(TOKENIZER_DOMAINS)
    out = []
    for name in TOKENIZER_DOMAINS:
        n = 0
        for doc in EMBEDDED_GENERATORS[name](seed=cfg.seed):
            if split_bucket(doc) < TOKENIZER_HOLDOUT:  # never train on possible validation text
                continue
            out.append(doc)
            n += len(doc)
            if n >= per_domain:
                break
    return out


def embedded_cache_path(cfg: TokenizerConfig) -> Path:
    key = json.dumps({"vocab_size": cfg.vocab_size, "train_chars": cfg.train_chars, "seed": cfg.seed,
                      "corpus": EMBEDDED_CORPUS_VERSION, "python": python_version(),
                      "tokenizers": tokenizers.__version__}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return paths.cache_dir() / "tokenizers" / f"embedded-v{cfg.vocab_size}-{digest}.json"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode map, inverted: the character a byte-level BPE writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def token_bytes(backend: "tokenizers.Tokenizer") -> list[int]:
    """Bytes per id: a byte-level BPE token (`embedded`) is one byte per character of its
    alphabet; a SentencePiece byte-fallback piece `<0x0A>` is one byte; any other piece (`llama2`)
    is its text with '\u2581' read as a space; special tokens are 0."""
    alphabet = _byte_level_alphabet()
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    out = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        piece = backend.id_to_token(i) or ""
        if piece in special:
            out.append(0)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(1)
        elif all(c in alphabet for c in piece):
            out.append(len(piece))
        else:
            out.append(len(piece.replace("\u2581", " ").encode("utf-8")))
    return out


def read_tokenizer_file(path: Path, what: str) -> "tokenizers.Tokenizer":
    """A tokenizers JSON file, or one ValueError naming it (the library's own error is a bare
    Exception with a serde message)."""
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 -- tokenizers raises plain Exception for a malformed file
        raise ValueError(f"{what} {str(path)!r} is not a readable tokenizer JSON ({' '.join(str(err).split())[:200]})") from None


def load_embedded(cfg: TokenizerConfig, progress: bool = False) -> Tokenizer:
    """The embedded tokenizer for `cfg`, trained on first use and cached."""
    cfg.validate()
    cached = embedded_cache_path(cfg)
    if cached.is_file():
        return Tokenizer(read_tokenizer_file(cached, "the cached embedded tokenizer"), "embedded", EMBEDDED_EOS)
    if progress:
        print(f"training the embedded tokenizer (vocab {cfg.vocab_size}) -> {cached}")
    tok = Tokenizer(train_embedded_backend(_embedded_training_text(cfg), cfg.vocab_size, progress),
                    "embedded", EMBEDDED_EOS)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tok.save(cached)
    return tok


# --- llama2 --------------------------------------------------------------------------------

def load_llama2(cfg: TokenizerConfig) -> Tokenizer:
    """The Llama-2 tokenizer from a local tokenizer.json, fetched from the hub once if allowed."""
    from transformers import PreTrainedTokenizerFast

    cfg.validate()
    path = Path(cfg.path).expanduser() if cfg.path else paths.cache_dir() / "tokenizers" / "llama2" / "tokenizer.json"
    if not path.is_file():
        if cfg.path and path.is_dir():
            raise ValueError(f"tokenizer.path {cfg.path!r} is a directory, not a file (expected the path of a "
                             f"Llama-2 tokenizer.json, e.g. {str(path / 'tokenizer.json')!r})")
        if cfg.path:
            raise ValueError(f"tokenizer.path {cfg.path!r} does not exist (expected a Llama-2 tokenizer.json)")
        hint = (f"set a local Llama-2 tokenizer.json in the recipe (`tokenizer: {{name: llama2, path: "
                f"/path/to/tokenizer.json}}`) or copy one to {path}")
        if is_offline():
            raise ValueError(f"the llama2 tokenizer is not cached at {path} and Hugging Face offline mode is on "
                             f"(HF_HUB_OFFLINE); {hint}, or unset HF_HUB_OFFLINE to fetch it from {cfg.hub_repo}")
        fetched = fetch_file(cfg.hub_repo, "tokenizer.json", hint)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        shutil.copyfile(fetched, tmp)
        os.replace(tmp, path)
    read_tokenizer_file(path, "tokenizer.path" if cfg.path else "the cached llama2 tokenizer")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    eos = hf.eos_token or "</s>"
    return Tokenizer(hf.backend_tokenizer, "llama2", eos)


# --- entry point ---------------------------------------------------------------------------

def get_tokenizer(spec: "str | TokenizerConfig | dict" = "embedded", *, progress: bool = False) -> Tokenizer:
    """The tokenizer named by `spec`.

    `spec` is a name (`"embedded"`, `"llama2"`), a `TokenizerConfig`, a recipe's `tokenizer` dict,
    or a build's metadata (`load_meta(dir)`); for metadata the build's own tokenizer.json is loaded
    and its hash must match the one recorded.
    """
    if isinstance(spec, dict) and "files" in spec and "tokenizer" in spec:  # build metadata
        info = spec["tokenizer"]
        file = Path(spec["dir"]) / info["file"]
        if file.is_dir():
            raise ValueError(f"the build's tokenizer file {file} is a directory, not a tokenizer file")
        if not file.is_file():
            raise ValueError(f"the build's tokenizer file {file} is missing")
        tok = Tokenizer(read_tokenizer_file(file, "the build's tokenizer file"), info["name"], info["eos_token"])
        if tok.hash != info["hash"]:
            raise ValueError(f"tokenizer mismatch: {file} has hash {tok.hash[:12]} but the metadata "
                             f"records {info['hash'][:12]}")
        return tok
    if isinstance(spec, str):
        cfg = TokenizerConfig(name=spec)
    elif isinstance(spec, dict):
        try:
            cfg = TokenizerConfig.from_dict(spec)
        except ConfigError as err:
            raise err.within("tokenizer") from None
    elif isinstance(spec, TokenizerConfig):
        cfg = spec
    else:
        raise ValueError(f"get_tokenizer expects a name, TokenizerConfig or dict, got {type(spec).__name__}")
    cfg.validate()
    return load_embedded(cfg, progress) if cfg.name == "embedded" else load_llama2(cfg)
