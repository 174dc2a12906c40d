"""What the web page shows about the loaded model beyond its name: the inline markup it knows
(for the help with insert buttons) and the instruction presets of its version."""

from __future__ import annotations

from typing import TYPE_CHECKING

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

# Instructions from the model cards and the official examples; the page lets users edit them.
V2_INSTRUCTIONS = {
    "dialects": [
        "用粤语说这句话",
        "用四川话说这句话",
        "用上海话说这句话",
        "用天津话说这句话",
        "用东北话说这句话",
        "用河南话说这句话",
        "用山东话说这句话",
        "用长沙话说这句话",
    ],
    "emotions": [
        "用开心的语气说",
        "用伤心的语气说",
        "用惊讶的语气说",
        "用生气的语气说",
        "用恐惧的语气说",
        "用温柔的语气说",
        "用严肃的语气说",
    ],
    "style": ["用很快的语速说", "用很慢的语速说", "用小声说悄悄话的方式说", "像机器人一样说"],
}
V3_INSTRUCTIONS = {
    "dialects": [
        "请用广东话表达。",
        "请用四川话表达。",
        "请用上海话表达。",
        "请用东北话表达。",
        "请用天津话表达。",
        "请用河南话表达。",
        "请用山东话表达。",
        "请用陕西话表达。",
        "请用闽南话表达。",
        "请用湖南话表达。",
        "请用云南话表达。",
        "请用贵州话表达。",
    ],
    "emotions": [
        "请用开心的语气说。",
        "请用伤心的语气说。",
        "请用生气的语气说。",
        "请用惊讶的语气说。",
        "请用温柔的语气说。",
        "请用恐惧的语气说。",
    ],
    "style": [
        "请用尽可能快地语速说一句话。",
        "请用尽可能慢地语速说一句话。",
        "请用悄悄话的方式说。",
        "Please speak as fast as possible.",
        "Please speak in a happy tone.",
    ],
}


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
    """Instruction presets of CosyVoice2/3 (v1-Instruct takes free-form persona descriptions)."""
    return {2: V2_INSTRUCTIONS, 3: V3_INSTRUCTIONS}.get(engine.version, {})


def page_info(engine: Engine) -> dict:
    return {
        "markup": markup_help(engine),
        "instruction_presets": instruction_presets(engine),
        "presets": sorted(n for n, v in engine.presets.items() if v.kind == "preset"),
    }
