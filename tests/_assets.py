"""Test access to downloadable assets, obtained the way a user's install gets them.

whisper's ``multilingual.tiktoken`` (the v1 text tokenizer vocabulary) is not in this repository: it is
taken from the openai-whisper sdist on PyPI into the cosyvoice-lite cache.  Tests that need it call
``whisper_vocab_path()``, which skips the test when the file cannot be obtained (no network).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_VOCAB_MEMBER = "whisper/assets/multilingual.tiktoken"


def cache_dir() -> Path:
    return Path(os.environ.get("COSYVOICE_LITE_CACHE", Path.home() / ".cache" / "cosyvoice-lite"))


def whisper_vocab_path() -> Path:
    """Path of multilingual.tiktoken in the cache, fetched from the whisper sdist on first use."""
    target = cache_dir() / "assets" / "multilingual.tiktoken"
    if target.is_file():
        return target
    try:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 WHISPER_SDIST, "-d", tmp, "-q"],
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
            (sdist,) = Path(tmp).glob("*.tar.gz")
            with tarfile.open(sdist) as archive:
                member = next(
                    m for m in archive.getmembers() if m.name.endswith(WHISPER_VOCAB_MEMBER)
                )
                data = archive.extractfile(member).read()
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(target)
    except Exception as error:  # no network, no pip, unexpected archive layout
        pytest.skip(
            f"whisper vocabulary unavailable ({WHISPER_SDIST} sdist could not be fetched: {error})"
        )
    return target
