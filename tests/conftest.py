"""Shared fixtures: the committed tiny model directories and the v1 text vocabulary."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
# Keep downloads (whisper's vocabulary) inside the checkout, not in the user's home.
os.environ.setdefault("COSYVOICE_LITE_CACHE", str(ROOT / ".cache"))


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """`serve` run in-process sets the root logger's handler (on the test's captured stderr,
    closed after it): later tests' server threads then printed "Logging error" tracebacks."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], level = saved
    root.setLevel(level)


@pytest.fixture(scope="session")
def whisper_vocab() -> Path:
    """whisper's multilingual.tiktoken, obtained the way a user's install would (once, cached)."""
    from cosyvoice_lite.hub import whisper_vocab_path

    return whisper_vocab_path()


@pytest.fixture(scope="session")
def v1_dir(whisper_vocab) -> Path:
    """Tiny CosyVoice v1 directory written by the official classes (serves as -SFT)."""
    return DATA / "models" / "v1-tiny"


def copy_model(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


@pytest.fixture(scope="session")
def v1_variants(v1_dir, tmp_path_factory) -> dict[str, Path]:
    """The three v1 releases, made from the one tiny directory: base has no spk2info.pt."""
    root = tmp_path_factory.mktemp("v1")
    return {
        "base": copy_model(v1_dir, root / "CosyVoice-300M", drop=("spk2info.pt",)),
        "sft": copy_model(v1_dir, root / "CosyVoice-300M-SFT"),
        "instruct": copy_model(v1_dir, root / "CosyVoice-300M-Instruct"),
    }
