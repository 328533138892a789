"""The Hugging Face hub, reached at most once and briefly.

    is_offline()                                   any HF offline switch set?
    fetch_file(repo, "tokenizer.json", hint=...)   one short try, else one ValueError line

`huggingface_hub.hf_hub_download` retries an unreachable hub five times with backoff (about
half a minute) before it fails with a long traceback. Here the file's metadata is asked for
once, with a timeout of a few seconds (`HF_HUB_ETAG_TIMEOUT` if set); when that fails the
error is one line saying what to set instead. Offline (`HF_HUB_OFFLINE` and friends) the network
is never tried.
"""
from __future__ import annotations

import os

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
TIMEOUT = 5.0
"""Seconds to wait for the hub's answer about a file (unless HF_HUB_ETAG_TIMEOUT says otherwise)."""


def is_offline() -> bool:
    """True when any Hugging Face offline switch is set in the environment."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_SWITCHES)


def _timeout() -> float:
    try:
        return float(os.environ["HF_HUB_ETAG_TIMEOUT"])
    except (KeyError, ValueError):
        return TIMEOUT


def fetch_file(repo: str, filename: str, hint: str) -> str:
    """Download `filename` of hub repository `repo` (into the huggingface_hub cache) and return
    its local path. `hint` says what the user can do instead (e.g. which local file to pass);
    it ends every error. Offline, raises at once."""
    if is_offline():
        raise ValueError(f"{filename} of {repo} is not available offline (HF_HUB_OFFLINE is set); {hint}, "
                         f"or unset HF_HUB_OFFLINE to fetch it")
    import huggingface_hub

    try:  # one short try: hf_hub_download itself would retry an unreachable hub for ~30 s
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo, filename), timeout=_timeout())
        return huggingface_hub.hf_hub_download(repo, filename, etag_timeout=_timeout())
    except Exception as err:  # network, DNS, HTTP, authentication: all end the same way
        raise ValueError(f"could not fetch {filename} of {repo} from the Hugging Face hub "
                         f"({type(err).__name__}: {_first_line(err)}); {hint}, or set HF_HUB_OFFLINE=1 "
                         f"to stop trying the hub") from None


def _first_line(err: Exception, limit: int = 160) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else "no detail"
    return text if len(text) <= limit else text[: limit - 3] + "..."
