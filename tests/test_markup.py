"""Inline markup reaches the tokenizer as the model expects; unknown tags are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosyvoice_lite import Engine, InvalidRequestError, Mode, SynthesisRequest
from cosyvoice_lite.frontend.markup import check_markup, find_markup


def test_find_markup() -> None:
    text = "报道[j][ǐ]予 [M][AY0] <strong>hi</strong> [laughter] <|en|> see [1] and a<b"
    assert find_markup(text) == [
        "[j]",
        "[ǐ]",
        "[M]",
        "[AY0]",
        "<strong>",
        "</strong>",
        "[laughter]",
        "<|en|>",
    ]


def test_unknown_tags_are_named() -> None:
    known = frozenset({"[breath]", "[laughter]", "<strong>", "</strong>", "<|endofprompt|>"})
    check_markup(["a [breath] b <strong>c</strong>"], known, "m")
    with pytest.raises(InvalidRequestError, match=r"\[giggle\].*\[h\]") as info:
        check_markup(["ha [giggle] [h][ào]"], known, "CosyVoice2-0.5B")
    assert "[breath]" in str(info.value)


def test_v1_engine_knows_its_tags(v1_variants: dict[str, Path]) -> None:
    engine = Engine.load(v1_variants["instruct"])
    voice = engine.voices()[0]
    ok = SynthesisRequest(Mode.PRESET, "<strong>你好</strong>[breath]。", voice=voice, seed=1)
    assert next(iter(engine.synthesize(ok))).samples.size > 0
    bad = SynthesisRequest(Mode.PRESET, "你好[h][ǎo]。", voice=voice)
    with pytest.raises(InvalidRequestError, match=r"\[h\], \[ǎo\]"):
        list(engine.synthesize(bad))
