"""What the web page shows about the loaded model beyond its name: the inline markup it knows
(for the help with insert buttons) and the instruction presets of its version."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .synthesis import preset_voices

if TYPE_CHECKING:
    from ..engine import Engine

# The non-speech sound tags of the CosyVoice tokenizers (v1-Instruct knows the first two).
SOUNDS = (
    "[breath]",
    "[laughter]",
    "[quick_breath]",
    "[sigh]",
    "[cough]",
    "[noise]",
    "[hissing]",
    "[clucking]",
    "[lipsmack]",
    "[accent]",
    "[vocalized-noise]",
    "[mn]",
)
PAIRS = ("strong", "laughter")
V1_LANGUAGES = ("<|zh|>", "<|en|>", "<|jp|>", "<|yue|>", "<|ko|>")


def markup_help(engine: Engine) -> dict:
    """The tags the model knows, grouped for the page's help."""
    known = engine.known_markup
    brackets = [t for t in known if t.startswith("[") and t.endswith("]")]
    return {
        "sounds": [t for t in SOUNDS if t in known],
        "pairs": [p for p in PAIRS if f"<{p}>" in known and f"</{p}>" in known],
        "pinyin": any(not t[1:-1].isascii() for t in brackets),
        "cmu": any(t[1:-1].isupper() for t in brackets),
        "languages": [t for t in V1_LANGUAGES if t in known] if engine.spec.language_tags else [],
    }


def instruction_presets(engine: Engine) -> dict[str, list[str]]:
    """Instruction presets of the model's version (none for v1-Instruct, which takes free-form
    persona descriptions)."""
    return {group: list(items) for group, items in engine.spec.instruction_examples.items()}


def page_info(engine: Engine) -> dict:
    return {
        "markup": markup_help(engine),
        "instruction_presets": instruction_presets(engine),
        "presets": preset_voices(engine),
    }
