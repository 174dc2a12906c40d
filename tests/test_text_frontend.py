"""Text frontend: parity with the official text_normalize, splitting, bypasses, properties, speed.

Goldens: tests/data/golden/text/official.jsonl (tools/golden/text_frontend.py, official code + wetext
0.0.4 on the current wetext FSTs); intended differences: tests/data/golden/text/known_differences.json.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
from _assets import whisper_vocab_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosyvoice_lite.frontend import text as T
from cosyvoice_lite.frontend.text import TextFrontend, split_paragraph

DATA = Path(__file__).parent / "data"


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


CORPUS = _jsonl(DATA / "text_corpus.jsonl")
OFFICIAL = {row["id"]: row for row in _jsonl(DATA / "golden/text/official.jsonl")}
KNOWN = json.loads((DATA / "golden/text/known_differences.json").read_text(encoding="utf-8"))[
    "items"
]


def _words(text: str) -> list[str]:
    """A stand-in tokenizer for English lengths (one 'token' per character) when no vocab is needed."""
    return list(text)


@pytest.fixture(scope="module")
def whisper_encode():
    from cosyvoice_lite.frontend.tokenizer import WhisperTextTokenizer

    return WhisperTextTokenizer(whisper_vocab_path()).encode


@pytest.fixture(scope="module")
def frontend(whisper_encode) -> TextFrontend:
    return TextFrontend(whisper_encode)


# ------------------------------------------------------------------------------------------------
# Corpus parity


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 300
    kinds = {row["kind"] for row in CORPUS}
    for kind in ("integer", "decimal", "fraction", "date", "time", "money", "percentage", "phone",
                 "unit", "url", "email", "emoji", "fullwidth", "mixed", "japanese", "korean",
                 "cantonese", "long_zh", "long_en", "no_punct", "only_punct", "markup"):  # fmt: skip
        assert kind in kinds
    assert set(OFFICIAL) == {row["id"] for row in CORPUS}


def test_corpus_parity_with_official(frontend):
    identical, differences = 0, []
    for row in CORPUS:
        official = OFFICIAL[row["id"]]
        segments = frontend.normalize(row["text"])
        known = KNOWN.get(str(row["id"]))
        if known is not None:
            assert known["text"] == row["text"]
            assert segments == known["ours"], f"known difference {row['id']} changed"
            continue
        assert "error" not in official, f"official raised on {row['id']}: record it as known"
        joined = frontend.normalize_text(row["text"])
        if segments == official["segments"] and joined == official["joined"]:
            identical += 1
        else:
            differences.append((row["id"], row["text"], official["segments"], segments))
    print(f"\ntext frontend corpus parity: {identical} of {len(CORPUS)} identical to the official, "
          f"{len(KNOWN)} known differences")  # fmt: skip
    assert not differences, "\n".join(map(repr, differences[:10]))
    assert identical + len(KNOWN) == len(CORPUS)


def test_chinese_corpus_parity_without_vocab():
    """zh segments are measured in characters: this part of the parity needs no tokenizer file."""
    frontend = TextFrontend()
    checked = 0
    for row in CORPUS:
        text = row["text"]
        if str(row["id"]) in KNOWN or not T.contains_chinese(text) or T.is_markup(text):
            continue
        assert frontend.normalize(text) == OFFICIAL[row["id"]]["segments"], row
        checked += 1
    assert checked > 150


# ------------------------------------------------------------------------------------------------
# wetext


def test_reorder_tokens_uses_wetext_004_order():
    tagged = 'date { day: "5" month: "3" year: "2024" } char { value: "\\"" } money { currency: "$" value: "5" extra: "x" }'
    assert T.reorder_tokens(tagged, "zh") == (
        'date { year: "2024" month: "3" day: "5" } char { value: "\\"" } money { value: "5" currency: "$" }'
    )
    preserved = 'date { preserve_order: "true" month: "march" day: "5" }'
    assert T.reorder_tokens(preserved, "en") == preserved


def test_wetext_only_rewrites_text_with_digits():
    assert T.wetext_normalize("Dr. Smith & co.", "en") == "Dr. Smith & co."
    assert T.wetext_normalize("今天×明天", "zh") == "今天×明天"
    assert T.wetext_normalize("今天是2024年3月5日", "zh") == "今天是二零二四年三月五日"
    assert T.wetext_normalize("I have 3 apples.", "en") == "I have three apples."


def test_wetext_failures_fall_back_to_digit_runs():
    # The en FSTs have no path for Hangul or runs of spaces: upstream raises, we read the numbers.
    assert T.wetext_normalize("가격은 10,000원입니다.", "en") == "가격은 ten thousand원입니다."
    assert T.wetext_normalize("I  have   3 apples", "en") == "I have three apples"
    with pytest.raises(T.WetextError):
        T.WetextFst("en")("사과 3개")


def test_zh_windows_give_the_whole_text_result():
    """wetext runs on windows around digits; for zh that must equal one whole-text FST call."""
    import random

    pool = [
        r["text"] for r in CORPUS if T.contains_chinese(r["text"]) and T._DIGIT.search(r["text"])
    ]
    pool = [text for text in pool if not T.is_markup(text) and len(text) < 80]
    rng = random.Random(0)
    texts = pool + ["".join(rng.sample(pool, 3)) for _ in range(40)]
    whole_text = T.WetextFst("zh")
    assert [T.wetext_normalize(text, "zh") for text in texts] == [
        whole_text(text) for text in texts
    ]


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("1 " * 3000, "zh"),
        ("中1 " * 2000, "zh"),
        ("1" * 5000, "zh"),
        ("中" + " " * 5000 + "1", "zh"),
        ("1.5 " * 2000, "en"),
        ("7" * 5000 + " apples", "en"),
    ],
)
def test_dense_numbers_are_tagged_in_short_windows(text: str, lang: str):
    """Numbers a space apart, a long digit run or a long run of spaces had each made one window
    of the whole text: tagging time grows faster than a window (4,096 characters of "1 ": 2.6 s
    holding the interpreter, 250 MB; 65,536: 48 s, 3.5 GB). Windows stay short and tile no text
    twice; the text between them is kept whole."""
    windows = list(T._zh_windows(text) if lang == "zh" else T._en_windows(text))
    longest = T.MAX_WINDOW_CHARS + 2 * (T.ZH_CONTEXT_CHARS + T.MAX_SPACE_RUN)
    assert windows and max(hi - lo for lo, hi in windows) <= longest
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(windows))
    start = time.perf_counter()
    normalized = T.wetext_normalize(text, lang)
    assert time.perf_counter() - start < 10 and "1" not in normalized.replace("1.5", "")


def test_english_windows_keep_units_and_prefixes_with_their_numbers():
    """Dense numbers' windows are cut to stay short: the cut fell right after a number, whose
    unit opened the next window and was read as letters ("six kg"); a prefix goes the other
    way ("No. 17")."""
    frontend = TextFrontend(_words)
    weights = "Weights: " + " ".join(f"{n} kg" for n in range(3, 60, 2)) + "."
    assert " kg" not in frontend.normalize_text(weights)
    rooms = "Rooms: " + " ".join(f"{n}kg No. {n * 7}" for n in range(3, 23)) + "."
    assert frontend.normalize_text(rooms).count("Number.") == rooms.count("No.") == 20


@pytest.mark.parametrize(
    ("before", "after", "lang"), [("打开", "购买。", "zh"), ("Open ", " now.", "en")]
)
def test_a_word_longer_than_a_window_is_not_cut_inside_a_number(before, after, lang):
    """A word over MAX_WINDOW_CHARS is tagged in pieces: a cut through a URL's qid=1701234567
    read it as 170 and 1,234,567 (upstream, one FST call over the text, reads one number)."""
    text = before + "https://example.com/" + "a" * 100 + "?qid=1701234567&sr=8" + after
    assert T.wetext_normalize(text, lang) == T.WetextFst(lang)(text)


def test_pieces_of_a_long_english_word_are_read_as_words_apart():
    """Two pieces of one word are read by separate FST calls: their words had been glued
    ("twelvethree", "fourfive")."""
    digits = "1234567" * 30  # longer than a window: cut inside anyway
    words = T.wetext_normalize("x" * 126 + digits, "en").split()
    assert words[0] == "x" * 126 and len(words) == 1 + len(digits)


def test_english_numbers_read_the_same_from_several_threads():
    """Requests are prepared on two threads; inflect keeps a call's state on its engine, so one
    number's reading took another's scale ("three hundred and forty trillion" for 340 billion)."""
    import threading

    frontend = TextFrontend(_words)
    texts = [
        f"Order #{n}{n % 1000:03d}{n % 997:03d} has shipped, version {n}.{n % 7}.1."
        for n in range(300, 420)
    ]
    expected = [TextFrontend(_words).normalize_text(text) for text in texts]
    results: dict[int, str] = {}

    def work(offset: int) -> None:
        for index in range(offset, len(texts), 2):
            results[index] = frontend.normalize_text(texts[index])

    threads = [threading.Thread(target=work, args=(offset,)) for offset in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[index] for index in range(len(texts))] == expected


def test_text_that_is_not_unicode_is_refused_split_or_not():
    from cosyvoice_lite.errors import InvalidRequestError

    for split in (True, False):
        with pytest.raises(InvalidRequestError, match="Unicode"):
            TextFrontend().normalize("I have 3\udc80 apples", split=split)


def test_spaces_at_a_cut_window_are_kept():
    text = "共" + " " * 30 + "3个"
    assert T.wetext_normalize(text, "zh") == "共" + " " * 30 + "三个"


def test_spell_out_number_and_helpers():
    import inflect

    engine = inflect.engine()
    assert T.spell_out_number("a 12 b 3", engine) == "a twelve b three"
    assert T.spell_out_number("1" * 40, engine).startswith("one, one")  # beyond inflect's range
    assert T.replace_blank("中 文 A B 中") == "中文A B中"
    assert T.remove_bracket("（注）【重要】`x`——y") == "注重要x y"
    assert T.is_only_punctuation("") and T.is_only_punctuation("。！？…—*#")
    assert not T.is_only_punctuation("  .") and not T.is_only_punctuation("a.")
    assert T.is_only_punctuation("\u200b\u200c\ufeff.") and T.is_only_punctuation("\x00\x1b")


# ------------------------------------------------------------------------------------------------
# Splitting


def test_split_zh_bounds():
    sentence = "一" * 29 + "。"  # 30 characters
    text = sentence * 5
    # 30+30=60 is not > 60, so chunks grow to 90 (> 80 with 60 < 90): 90, 60 (the 60 is not < 20).
    assert split_paragraph(text, None, "zh") == [sentence * 3, sentence * 2]
    short = "二" * 9 + "。"
    assert split_paragraph(sentence * 3 + short, None, "zh") == [sentence * 3 + short]
    assert split_paragraph("没有标点", None, "zh") == ["没有标点。"]


def test_split_en_counts_tokens():
    words = " ".join(["word"] * 9) + "."  # 9 'tokens' with a whitespace tokenizer
    text = " ".join([words] * 10)

    def encode(part: str) -> list[str]:
        return part.split()

    chunks = split_paragraph(text, encode, "en", token_max_n=30, token_min_n=20, merge_len=5)
    assert "".join(chunks) == text
    assert [len(encode(chunk)) for chunk in chunks] == [27, 27, 27, 9]  # as upstream


def test_split_quotes_and_repeated_punctuation():
    # Expected values from upstream split_paragraph; small bounds keep every sentence apart.
    bounds = {"token_max_n": 4, "token_min_n": 2, "merge_len": 1}
    assert split_paragraph('他说："你好。"然后走了！！', None, "zh", **bounds) == [
        '他说："',
        '你好。"',
        "然后走了！",
    ]
    assert split_paragraph("What a day!!!", _words, "en") == ["What a day!"]
    assert split_paragraph('."Hello', _words, "en") == ['"Hello.']  # upstream: IndexError


def test_iter_split_paragraph_is_lazy():
    chunks = T.iter_split_paragraph(("一" * 70 + "。") * 1000, None, "zh")
    assert next(chunks) == "一" * 70 + "。"  # 71 > 60 and 142 > 80: flushed alone


# ------------------------------------------------------------------------------------------------
# Bypasses


@pytest.mark.parametrize(
    "text",
    [
        "<|zh|>你好 2024",
        "You are a helpful assistant.<|endofprompt|>今天是2024年3月5日。",
        " <|en|> x ",
    ],
)
def test_markup_bypasses_normalisation(text):
    frontend = TextFrontend()
    assert frontend.normalize(text) == [text]
    assert frontend.normalize_text(text) == text


def test_stressed_cmu_phones_survive_number_normalisation():
    """CosyVoice3's ``[AY0]`` tags keep their stress digit (upstream spells it out: ``[AYzero]``,
    ``[AY零]``), while the numbers around them are read as before."""
    frontend = TextFrontend(_words)
    assert frontend.normalize_text("I [M][AY0] go [HH][AH0][L][OW1] 12 times.") == (
        "I [M][AY0] go [HH][AH0][L][OW1] twelve times."
    )
    assert (
        frontend.normalize_text("你好[M][AY0]世界，我有3个苹果。")
        == "你好[M][AY0]世界，我有三个苹果。"
    )
    assert frontend.normalize_text("我有3个苹果。") == "我有三个苹果。"


def test_a_tag_stuck_to_an_english_number_keeps_its_reading():
    """The en FSTs have no path for a number with a tag stuck to it (upstream raises): its digits
    had been read one by one ("one.five[breath]", "$five[laughter]")."""
    frontend = TextFrontend(_words)
    assert frontend.normalize_text("It is 1.5[breath] kg.") == "It is one point five[breath] kg."
    assert frontend.normalize_text("At 12:30[breath] we met.") == "At twelve thirty[breath] we met."
    assert frontend.normalize_text("It costs $5[laughter] only.") == (
        "It costs five dollars[laughter] only."
    )
    assert frontend.normalize_text("It is <strong>15</strong> kg.") == (
        "It is <strong>fifteen</strong> kg."
    )


def test_a_tag_next_to_a_chinese_number_keeps_its_reading():
    """A tag in a zh window parted a number from its unit: 12.5 without 元 is a date, 2024
    without 年 a cardinal. The text between tags is read with its neighbours' text as context."""
    frontend = TextFrontend(_words)
    assert frontend.normalize_text("价格是<strong>12.5</strong>元。") == (
        "价格是<strong>十二点五</strong>元。"
    )
    assert frontend.normalize_text("<strong>2024</strong>年") == "<strong>二零二四</strong>年"
    assert frontend.normalize_text("我买了3[breath]个苹果。") == "我买了三[breath]个苹果。"
    # a context the FST rewrites (50% reads 百分之五十) leaves the text read with its tags
    assert frontend.normalize_text("大约50<strong>%</strong>的人。") == (
        "大约五十<strong>%</strong>的人。"
    )


def test_disabled_and_empty():
    frontend = TextFrontend(_words)
    assert frontend.normalize("  今天是2024年。 ", enabled=False) == ["  今天是2024年。 "]
    assert frontend.normalize("") == [""]
    assert frontend.normalize(" \n\t ") == []
    assert frontend.normalize("。！？") == []
    assert frontend.normalize("今天是2024年3月5日", split=False) == "今天是二零二四年三月五日"
    assert frontend.normalize(" <|zh|>2024 ", split=False) == " <|zh|>2024 "


def test_english_without_a_tokenizer_counts_words():
    """Without a tokenizer (the CLI without a model) English lengths are words and punctuation runs."""
    sentence = " ".join(["word"] * 29) + "."  # 30 pieces
    segments = TextFrontend().normalize(" ".join([sentence] * 4))
    assert [len(T._pretokens(segment)) for segment in segments] == [90, 30]


# ------------------------------------------------------------------------------------------------
# Properties


def _strip_punctuation(text: str) -> str:
    """What is left to speak: no punctuation, symbols or invisible characters."""
    return "".join(c for c in text if not T.is_only_punctuation(c))


def _letters_only(text: str) -> str:
    return "".join(c for c in text if unicodedata.category(c)[0] not in "PSZC")


_PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
_FRONTEND = TextFrontend(_words)
_ALPHABET = st.sampled_from(
    list("你好世界今天天气很好我们去公园中文字符测试ぁあかカタナ한국어abcXYZ  \n\t")
    + list("。，、！？；：.,!?;:\"“”'（）【】—-…·《》「」")
)


_NUMBERS_ALPHABET = st.sampled_from(
    list("0123456789０１٣²①.,:/-+$%年月日点元 abcXYZ你好世界가나\n\t。，！？\"“”'#×")
)
_ANY_TEXT = st.one_of(st.text(max_size=300), st.text(_NUMBERS_ALPHABET, max_size=200))


@_PROPERTY_SETTINGS
@given(_ANY_TEXT)
def test_no_input_crashes(text):
    segments = _FRONTEND.normalize(text)
    assert all(isinstance(segment, str) for segment in segments)
    assert isinstance(_FRONTEND.normalize(text, split=False), str)


@_PROPERTY_SETTINGS
@given(_ANY_TEXT)
def test_segments_cover_the_normalised_text_in_order(text):
    """Concatenated segments == normalised text, up to the punctuation marks upstream drops/adds."""
    if T.is_markup(text) or not text.strip():
        return
    segments = _FRONTEND.normalize(text)
    assert _strip_punctuation("".join(segments)) == _strip_punctuation(
        _FRONTEND.normalize_text(text)
    )


@_PROPERTY_SETTINGS
@given(st.text(_ALPHABET, max_size=400))
def test_every_letter_reaches_a_segment_in_order(text):
    """Without digits or markup normalisation only touches spaces and punctuation: every other
    character of the input reaches exactly one segment, in input order."""
    segments = _FRONTEND.normalize(text)
    assert _letters_only("".join(segments)) == _letters_only(text)


@_PROPERTY_SETTINGS
@given(st.lists(st.sampled_from([row["text"] for row in CORPUS if row["kind"] != "markup"]),
                min_size=1, max_size=12))  # fmt: skip
def test_corpus_mixtures_lose_nothing(texts):
    text = "".join(texts)
    segments = list(_FRONTEND.iter_segments(text))
    if T.is_markup(text) or not text.strip():
        return
    assert _strip_punctuation("".join(segments)) == _strip_punctuation(
        _FRONTEND.normalize_text(text)
    )
    assert all(segment and not T.is_only_punctuation(segment) for segment in segments)


# ------------------------------------------------------------------------------------------------
# Speed


def _mixed_text(n_chars: int) -> str:
    parts, size = [], 0
    for row in CORPUS:
        if row["kind"] in ("markup", "empty", "only_punct"):
            continue
        parts.append(row["text"])
        size += len(row["text"])
        if size >= n_chars:
            break
    return "".join(parts)[:n_chars]


# Work grows linearly with the text: 10,000 characters cost about 4x 2,500 (normally 0.3-0.5 s
# of CPU on 2 cores). Asserted as a ratio, which a slow host does not change (a shared CI host
# in its slow state took 4x longer for both), plus a bound only a runaway would pass.
LINEAR_RATIO, RUNAWAY_CPU_S = 8.0, 10.0


def _cpu_seconds(frontend: TextFrontend, text: str) -> tuple[float, float, int]:
    start, cpu = time.perf_counter(), time.process_time()
    segments = frontend.normalize(text)
    return time.perf_counter() - start, time.process_time() - cpu, len(segments)


def _assert_linear(frontend: TextFrontend, text_of: Callable[[int], str], label: str) -> None:
    quarter = min(_cpu_seconds(frontend, text_of(2_500))[1] for _ in range(3))
    wall, cpu, segments = _cpu_seconds(frontend, text_of(10_000))
    print(f"\nnormalise+split 10,000 {label} characters: {wall:.3f} s wall, {cpu:.3f} s CPU, "
          f"{segments} segments; 2,500: {quarter:.3f} s CPU")  # fmt: skip
    assert cpu < LINEAR_RATIO * max(quarter, 0.01)
    assert cpu < RUNAWAY_CPU_S


def test_speed_10k_characters_of_mixed_text():
    frontend = TextFrontend(_words)
    frontend.normalize("预热 1")  # loads the zh FSTs once
    assert len(_mixed_text(10_000)) == 10_000
    _assert_linear(frontend, _mixed_text, "mixed")


def test_speed_10k_characters_of_english(whisper_encode):
    frontend = TextFrontend(whisper_encode)
    frontend.normalize("Warm up 1.")  # loads the en FSTs and inflect once
    parts = [
        r["text"] for r in CORPUS if r["kind"] in ("english", "long_en", "money", "date", "unit")
    ]
    joined = " ".join(parts)

    def english(n_chars: int) -> str:
        return (joined * (n_chars // len(joined) + 1))[:n_chars]

    _assert_linear(frontend, english, "English")


def test_sentences_without_ends_are_cut_at_pauses_then_spaces():
    """Upstream keeps a text without sentence ends whole however long (its speech and the flow's
    memory for it grow without bound); one sentence over twice token_max_n is cut into pieces of
    about token_max_n, and the text is kept whole across them."""
    frontend = TextFrontend(_words)
    commas = "今天我们一起去公园散步，" * 30
    pieces = frontend.normalize(commas)
    assert len(pieces) > 1 and all(len(p) <= 80 for p in pieces)
    assert all(p.endswith("，") for p in pieces[:-1]) and "".join(pieces) == commas[:-1] + "。"
    unbroken = frontend.normalize("你好" * 200)
    assert [len(p) for p in unbroken] == [80] * 4 + [81] and "".join(
        unbroken
    ) == "你好" * 200 + "。"
    words = frontend.normalize(" ".join(["word"] * 400))  # _words: one token per character
    assert len(words) > 1 and all(len(p) <= 100 for p in words)
    assert "".join(words) == " ".join(["word"] * 400) + "."


def test_ordinary_sentences_merge_as_upstream_whatever_the_segment_length():
    """Only one over-long sentence is cut: sentences of 59, 102 and 14 characters make one
    175-character segment, as upstream's split gives."""
    frontend = TextFrontend(_words)
    text = "这" * 58 + "。" + "是" * 101 + "。" + "的" * 13 + "。"
    assert frontend.normalize(text) == [text]


def test_long_text_with_control_markup_is_cut_keeping_its_leading_tags():
    """Markup text bypasses normalisation and splitting (as upstream) unless it is long: then
    every piece starts with the tags the whole text started with."""
    frontend = TextFrontend(_words)
    short = "<|en|>Hello there, how are you?"
    assert frontend.normalize(short) == [short]
    long = "<|en|>" + "one two three, " * 30
    pieces = frontend.normalize(long)
    assert len(pieces) > 1 and all(p.startswith("<|en|>") for p in pieces)
    assert "".join(p.removeprefix("<|en|>") for p in pieces) == long.removeprefix("<|en|>")
    system = "You are a helpful assistant.<|endofprompt|>"
    pieces = frontend.normalize(system + "，".join(["我们一起去公园散步"] * 40))
    assert len(pieces) > 1 and all(p.startswith(system) for p in pieces)
    assert all(len(p) <= len(system) + 80 for p in pieces)


def test_long_unsplit_text_is_cut_at_its_sentence_ends(frontend):
    """Text upstream speaks unsplit (markup, normalisation off) was cut by length only when
    long: Chinese mid-word every 80 characters, English mid-sentence, beside its sentence ends."""
    chinese = "今天天气很好我们去公园散步。" * 30
    for text in ("<|zh|>" + chinese, chinese):
        for enabled in (True, False):
            pieces = frontend.normalize(text, enabled=enabled)
            assert len(pieces) > 1 and all(p.endswith("。") for p in pieces), pieces[:2]
    system = "You are a helpful assistant.<|endofprompt|>"
    english = "The quick brown fox jumps over the lazy dog. " * 30
    pieces = frontend.normalize(system + english)
    assert len(pieces) > 1 and all(p.endswith("dog. ") for p in pieces)
    quoted = "“这是真的吗？”他问道。" * 40  # a closing quote stays with its sentence
    pieces = frontend.normalize(quoted, enabled=False)
    assert len(pieces) > 1 and not any(p.startswith("”") for p in pieces)
    numbers = "3.14 4.56 " * 60  # a period inside a number is no sentence end
    assert not any(p.endswith(".") for p in frontend.normalize(numbers, enabled=False))


def test_a_fixed_cut_keeps_characters_whole_and_counts_tokens():
    """Without pauses or spaces, pieces of ``token_max_n`` characters started inside a
    character (a Thai vowel mark, an emoji's joiner) and could hold several tokens each."""
    from cosyvoice_lite.frontend.text import _fixed_pieces

    thai = "สวัสดีครับผมชื่อสมชาย" * 20
    family = "👩\u200d👩\u200d👧" * 60
    for text in (thai, family):
        pieces = _fixed_pieces(text, 80)
        assert "".join(pieces) == text and len(pieces) > 1
        assert not any(unicodedata.category(p[0]).startswith("M") for p in pieces)
        assert not any(p[0] == "\u200d" or p[-1] == "\u200d" for p in pieces)
    three_each = _fixed_pieces("字" * 200, 80, lambda piece: 3 * len(piece))
    assert [len(p) for p in three_each] == [26] * 7 + [18]
    # a tag inside a bracket tag (escaped text) cut short does not fail
    assert "".join(_fixed_pieces("[<strong>]<|zzzzzzzzzzzzz|>", 9)) == "[<strong>]<|zzzzzzzzzzzzz|>"


def test_a_cut_by_length_never_splits_a_tag():
    frontend = TextFrontend(_words)
    text = "你好" * 39 + "[breath]" + "你好" * 100
    pieces = frontend.normalize(text)
    assert len(pieces) > 2 and sum("[breath]" in p for p in pieces) == 1
    assert "".join(pieces) == text + "。"
    # nor between tags that spell one syllable; a run longer than a piece is cut between tags
    syllables = "你" * 77 + "[h][ào]" + "你好" * 100  # the 80th character ends [h]
    pieces = frontend.normalize(syllables)
    assert sum("[h][ào]" in p for p in pieces) == 1 and "".join(pieces) == syllables + "。"
    run = "[h][ǎo]" * 30 + "你" * 100
    pieces = frontend.normalize(run)
    assert all(len(p) <= 80 for p in pieces[:-1]) and "".join(pieces) == run + "。"
    assert all(p.count("[") == p.count("]") for p in pieces)


def test_a_fixed_cut_keeps_ascii_words_whole():
    """Unpunctuated Chinese (an ASR transcript) loses its spaces: it was cut every 80
    characters, inside English words ("Re|act" in two utterances)."""
    from cosyvoice_lite.frontend.text import _fixed_pieces

    text = "我们" * 38 + "会用React框架" + "搭建页面" * 30
    pieces = TextFrontend(_words).normalize(text)
    assert pieces[0].endswith("会用") and pieces[1].startswith("React框架")
    assert "".join(pieces) == text + "。"
    # with the tags stuck to it; a word longer than a piece is cut anyway
    tagged = _fixed_pieces("中" * 78 + "<strong>React</strong>" + "中" * 80, 80)
    assert tagged[1].startswith("<strong>React</strong>")
    assert _fixed_pieces("中" + "a" * 200, 80) == ["中" + "a" * 79, "a" * 80, "a" * 41]


def test_a_span_around_a_cut_sentence_reaches_every_piece():
    """Each segment is spoken alone: a <strong> span around one long sentence (which we cut,
    upstream does not) left the middle pieces without emphasis. Upstream's own splits, at
    sentence ends, stay as upstream's."""
    frontend = TextFrontend(_words)
    text = "<strong>" + "这是一个很长的强调句子没有任何标点符号" * 12 + "</strong>后面的文字。"
    pieces = frontend.normalize(text)
    assert len(pieces) == 3 and "".join(pieces).replace("</strong><strong>", "") == text
    assert all(p.startswith("<strong>") and p.count("</strong>") == 1 for p in pieces)
    laughing = "<|en|><laughter>" + "and he kept on laughing " * 30 + "</laughter> and stopped."
    pieces = frontend.normalize(laughing)
    assert len(pieces) > 2 and all(p.startswith("<|en|><laughter>") for p in pieces)
    assert all(p.count("</laughter>") == 1 for p in pieces)
    sentences = frontend.normalize("<strong>" + "这是一个比较长的句子。" * 20 + "</strong>")
    assert len(sentences) > 1 and not any("<strong>" in p for p in sentences[1:])
    assert [p.count("</strong>") for p in sentences] == [0] * (len(sentences) - 1) + [1]


def test_fixed_pieces_always_progress_and_keep_tags_whole():
    from cosyvoice_lite.frontend.text import _fixed_pieces

    assert _fixed_pieces("[h][ào]", 1) == ["[h]", "[ào]"]  # no empty piece after a last tag
    assert _fixed_pieces("x" + "[breath]" * 3, 5) == ["x", "[breath]", "[breath]", "[breath]"]
    assert _fixed_pieces("abc", 0) == ["a", "b", "c"] and _fixed_pieces("", 3) == [""]
    assert _fixed_pieces("ab[h][ào]cd", 8) == ["ab", "[h][ào]c", "d"]  # the run moves whole
    # a character that continues a cluster right after a tag had moved the cut into the tag
    for follow in ("\u200d", "\u0301", "\ufe0f"):
        for before in range(70, 80):
            text = "中" * before + "[breath]" + follow + "中" * 100
            pieces = _fixed_pieces(text, 80)
            assert "".join(pieces) == text and sum("[breath]" in p for p in pieces) == 1


def test_a_long_cut_text_keeps_the_language_tag_in_effect_where_each_piece_starts(frontend):
    """v1 text with two language tags (<|zh|>中文。<|en|>English…) cut by length: every piece
    had carried the leading <|zh|>, all-English pieces too."""
    zh = "<|zh|>收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。"
    en = "<|en|>" + "We like to own businesses for the long term, and the managers stay. " * 12
    pieces = frontend.normalize(zh + en)
    assert len(pieces) > 2 and pieces[0].startswith("<|zh|>收到")
    assert all(p.startswith("<|en|>") and "<|zh|>" not in p for p in pieces[1:]), pieces
    # of several leading tags the last; a piece that starts with its own gets no other
    pieces = frontend.normalize("<|zh|>" + en)
    assert all(p.startswith("<|en|>We") for p in pieces[1:]) and len(pieces) > 1
    pieces = frontend.normalize(zh * 6)
    assert len(pieces) > 1 and all(p.startswith("<|zh|>收到") for p in pieces), pieces


@pytest.mark.parametrize("enabled", [True, False])
def test_a_long_unnormalised_text_is_not_cut_inside_a_number(frontend, enabled):
    """Text upstream speaks as written (markup, normalisation off) is cut at its pauses when
    long: a comma or colon between digits is none (2,345,|678 dollars, 12:|30 read as two)."""
    body = " ".join(
        f"we shipped {n},{n + 111},{n + 222} units at {n % 12}:{n % 60:02d} and"
        for n in range(100, 130)
    )
    system = "You are a helpful assistant.<|endofprompt|>" if enabled else ""
    pieces = [p.removeprefix(system) for p in frontend.normalize(system + body, enabled=enabled)]
    assert len(pieces) > 2
    for a, b in itertools.pairwise(pieces):
        assert not (re.search(r"\d[,:]$", a) and re.match(r"\d", b)), (a[-20:], b[:30])
    assert T._AFTER_PAUSE.split("a, b,1 2,3 4:5 x：y") == ["a,", " b,", "1 2,3 4:5 x：", "y"]
