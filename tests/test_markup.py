"""Inline markup reaches the tokenizer as the model expects; unknown tags are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosyvoice_lite import Engine, InvalidRequestError, Mode, SynthesisRequest
from cosyvoice_lite.frontend.markup import (
    check_markup,
    find_markup,
    held_back,
    open_spans,
    unescape,
    user_markup,
    without_system_prompt,
)
from cosyvoice_lite.versions import ENDOFPROMPT, SYSTEM_PROMPT


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
    # the hint names pinyin and CMU phones only where the model knows them ([mn] is a sound)
    assert "pinyin" not in str(info.value) and "CMU" not in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        check_markup(["[giggle]"], known | {"[mn]", "[h]", "[ào]"}, "m")
    assert "pinyin ([h][ào])" in str(info.value) and "CMU" not in str(info.value)


def test_many_unknown_tags_are_checked_in_linear_time_and_named_briefly() -> None:
    """Distinct unknown tags were looked up in a list (40,000: 9 s) and all named (440 KB)."""
    import time

    text = " ".join(f"[tag{i}]" for i in range(40_000))
    start = time.perf_counter()
    with pytest.raises(InvalidRequestError) as info:
        check_markup([text], frozenset({"[breath]"}), "m")
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "[tag0], [tag1]" in message and "and 39990 more" in message and len(message) < 500


def test_escaped_brackets_are_text() -> None:
    """``\\[sic]`` is text: not checked, spoken without its backslash. A tag the model knows
    cannot be escaped (its tokenizer reads it as the tag wherever it stands): a clear error."""
    assert find_markup(r"he said \[sic], [breath] \[note]") == ["[breath]"]
    assert unescape(r"a \[sic] b \[1] c\d \[no tag") == r"a [sic] b [1] c\d \[no tag"
    known = frozenset({"[breath]"})
    check_markup([r"\[sic] [breath]"], known, "m")
    with pytest.raises(InvalidRequestError, match=r"\[sic\].*escape a bracket.*\\\[sic\]"):
        check_markup(["[sic]"], known, "m")
    with pytest.raises(InvalidRequestError, match=r"\[breath\] is m's own markup") as info:
        check_markup([r"ok \[breath]"], known, "m", field="ref_text")
    assert info.value.param == "ref_text"
    with pytest.raises(InvalidRequestError, match=r"\[breath\], \[cough\] are m's own"):
        check_markup([r"\[breath] \[cough]"], known | {"[cough]"}, "m")
    # angle and control tags have no escape: the advice says so
    with pytest.raises(InvalidRequestError, match="write it differently") as info:
        check_markup(["a <b> c"], known, "m")
    assert "escape" not in str(info.value)


def test_a_streamed_pieces_open_tag_or_escape_is_held_back() -> None:
    for text, kept in [
        ("abc", ""),
        ("abc\\", "\\"),
        ("abc\\[si", "\\[si"),
        ("abc[si", "[si"),
        ("abc[", "["),
        ("abc[sic]", ""),
        ("abc\\[sic]", ""),
        ("a[b c", ""),  # not a tag: brackets hold no spaces
        ("a[" + "x" * 17, ""),  # longer than any tag
        # angle and control tags too (each piece is tokenised alone: "<stro" + "ng>" would
        # reach the LLM as characters, and an unknown tag split so was never checked)
        ("I am <stro", "<stro"),
        ("happy</str", "</str"),
        ("a <", "<"),
        ("x<|endof", "<|endof"),
        ("x<|en|", "<|en|"),
        ("a < b", ""),  # not a tag: tags hold no spaces
        ("<strong>hi", ""),
        ("a<" + "x" * 21, ""),
    ]:
        assert text[held_back(text) :] == kept, text


def test_chat_and_whisper_control_tokens_are_not_markup() -> None:
    """Only CosyVoice's own tags may be written: the chat template's tokens (v2/v3) and
    whisper's task and timestamp tokens (v1) would reach the LLM as control tokens."""
    qwen = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|endofprompt|>", "[breath]"]
    assert user_markup(qwen, whisper=False) == {"<|endofprompt|>", "[breath]"}
    whisper = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|yue|>", "<|0.00|>"]
    assert user_markup(whisper, whisper=True) == {"<|en|>", "<|yue|>"}


def test_v1_engine_knows_its_tags(v1_variants: dict[str, Path]) -> None:
    engine = Engine.load(v1_variants["instruct"])
    voice = engine.voices()[0]
    ok = SynthesisRequest(Mode.PRESET, "<strong>你好</strong>[breath]。", voice=voice, seed=1)
    assert next(iter(engine.synthesize(ok))).samples.size > 0
    bad = SynthesisRequest(Mode.PRESET, "你好[h][ǎo]。", voice=voice)
    with pytest.raises(InvalidRequestError, match=r"\[h\], \[ǎo\]"):
        list(engine.synthesize(bad))
    # escaped, the brackets are text: spoken as upstream speaks them, without the backslash
    escaped = SynthesisRequest(Mode.PRESET, r"你好\[sic]。", voice=voice, seed=1)
    spoken = "".join(chunk.text for chunk in engine.synthesize(escaped))
    assert "[sic]" in spoken and "\\" not in spoken


def test_open_spans_follow_nesting() -> None:
    assert open_spans("<strong>a<laughter>b") == ["strong", "laughter"]
    assert open_spans("a</strong>b", ["strong"]) == []
    assert open_spans("<strong>x</strong>") == [] and open_spans("</laughter>") == []
    assert open_spans("<laughter>[breath]<strong>", ["strong"]) == ["strong", "laughter", "strong"]


@pytest.mark.parametrize(
    "pieces",
    [
        ["You are a helpful assistant.<|endofprompt|>你好，", "世界。"],
        ["", "You are a helpful assistant.<|endofprompt|>你好，", "世界。"],  # a chat's first delta
        ["You are a helpful assistant.<|endof", "prompt|>你好，", "世界。"],
        ["You are a helpful assistant.", "<|endofprompt|>你好，", "世界。"],
        [" <|endofprompt|>你好，", "世界。"],  # an empty one
    ],
)
def test_a_streamed_system_prompt_is_dropped_wherever_its_mark_arrives(pieces) -> None:
    """Only a mark inside the very first piece had dropped the prompt: otherwise it was spoken
    and <|endofprompt|> reached the LLM mid-text."""
    dropped = without_system_prompt(iter(pieces), ENDOFPROMPT, SYSTEM_PROMPT)
    assert "".join(dropped) == "你好，世界。"


@pytest.mark.parametrize(
    "pieces",
    [
        ["You are", " a helpful assistant. 用四川话说。", "<|endofprompt|>你好，", "世界。"],
        ["用粤语说这句话<|endofprompt|>我最近迷上", "一部经典港剧。"],
    ],
)
def test_a_streamed_instruction_is_refused_not_replaced(pieces) -> None:
    """CosyVoice3 reads a stream's system prompt before the stream: an instruction of the text's
    own was silently replaced by the canonical prompt (dropped); it is an error naming instruct."""
    with pytest.raises(InvalidRequestError, match="own instruction.*as instruct") as error:
        list(without_system_prompt(iter(pieces), ENDOFPROMPT, SYSTEM_PROMPT, "v3"))
    assert error.value.param == "text"


def test_streamed_text_is_held_back_only_while_it_may_be_a_system_prompt() -> None:
    """Other text goes on as it comes (held, every stream's first audio waited for it); text
    opening as the canonical prompt does waits a bounded length for its mark."""

    def chat():  # fails if asked for a second piece
        yield "Hello there, how are you? "
        raise AssertionError("read too far")

    assert next(without_system_prompt(chat(), ENDOFPROMPT, SYSTEM_PROMPT)) == (
        "Hello there, how are you? "
    )
    late = ["You are a helpful assistant." + "x" * 150, ENDOFPROMPT + "spoken"]
    assert list(without_system_prompt(late, ENDOFPROMPT, SYSTEM_PROMPT, hold=128)) == late
    assert list(without_system_prompt(["a", 3, "b"], ENDOFPROMPT, SYSTEM_PROMPT)) == ["a", 3, "b"]
    assert list(without_system_prompt([], ENDOFPROMPT, SYSTEM_PROMPT)) == []


def test_a_pinyin_tone_typed_as_a_combining_mark_is_the_tag() -> None:
    """[h][a\u0300o] (NFD, as some keyboards and copied sources give it) was refused as unknown
    markup: texts are read composed (NFC), checked and spoken alike."""
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "他[h][ào]学。")
    assert decomposed != "他[h][ào]学。"
    check_markup([decomposed], frozenset({"[h]", "[ào]"}), "m")
    assert unescape(decomposed) == "他[h][ào]学。"
