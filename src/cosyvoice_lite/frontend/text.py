"""Text normalisation and sentence splitting, reproducing the official CosyVoice frontend.

The official ``CosyVoiceFrontEnd.text_normalize`` (wetext path, no ttsfrd) does, for plain text:

* zh (the text has a CJK ideograph): wetext -> drop newlines -> ``replace_blank`` -> ``²``/``³`` ->
  ``.``->``。`` and `` - ``->``，`` -> remove brackets -> trailing commas->``。`` -> ``split_paragraph``;
* en (everything else): wetext -> ``spell_out_number`` (inflect) -> ``split_paragraph``;
* then drops segments made only of punctuation/symbols.

Text carrying ``<|`` and ``|>`` markup, or normalisation switched off, bypasses all of it.

wetext: upstream pins wetext 0.0.4, whose ``Normalizer.normalize`` rewrites a text only when it contains a
digit, then runs tagger FST -> token reordering -> verbalizer FST over the whole text.  0.0.4 downloads
its FSTs at run time; the current wetext package bundles the same files.  We run those three steps on
the installed package's FSTs with the 0.0.4 rules (digit gate, language from the branch, 0.0.4 token
order: wetext >= 0.1 escapes quotes twice and prints ``\\"``).  Tagging costs ~3 ms per number and grows
faster than the text, so the FSTs see short windows around the digits (MAX_WINDOW_CHARS at most) instead of the whole text.  The
zh tagger works character by character outside numbers and gives the whole-text result (checked on the
corpus and random mixtures of it); in English, words more than EN_CONTEXT_WORDS away from a number
are not rewritten (upstream rewrites e.g. "Mr." anywhere
in a text that holds a digit).  tests/data/golden/text/known_differences.json lists what differs.
"""

from __future__ import annotations

import bisect
import importlib.util
import itertools
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cosyvoice_lite.errors import CosyVoiceError, InvalidRequestError
from cosyvoice_lite.frontend.markup import ANGLE, BRACKET, CONTROL, LANGUAGE_TAG, open_spans

Encode = Callable[[str], list[int]]

# Official split_paragraph bounds (cosyvoice/cli/frontend.py).
TOKEN_MAX_N = 80
TOKEN_MIN_N = 60
MERGE_LEN = 20

_ZH_PUNCTUATION = frozenset("。？！；：、.?!;")
_EN_PUNCTUATION = frozenset(".?!;:")
_CLOSING_QUOTES = frozenset('"”')
_CHINESE = re.compile(r"[\u4e00-\u9fff]")
_DIGIT = re.compile(r"\d")  # str patterns: any Unicode decimal digit, as wetext 0.0.4's gate


# --------------------------------------------------------------------------------------------------
# wetext: tagger -> token reordering -> verbalizer


# wetext 0.0.4 token_parser orders: the verbalizer expects the members of these tokens in this order,
# and members not listed are dropped.
_TN_ORDERS = {
    "zh": {
        "date": ["year", "month", "day"],
        "fraction": ["denominator", "numerator"],
        "measure": ["denominator", "numerator", "value"],
        "money": ["value", "currency"],
        "time": ["noon", "hour", "minute", "second"],
    },
    "en": {
        "date": ["preserve_order", "text", "day", "month", "year"],
        "money": ["integer_part", "fractional_part", "quantity", "currency_maj"],
    },
}


class WetextError(CosyVoiceError):
    """wetext could not normalise a text (no FST path for some character)."""


_MEMBER = r'([A-Za-z_]+): "((?:[^"\\]|\\.)*)"'
_TOKEN = re.compile(r"([A-Za-z_]+) *\{((?: *" + _MEMBER + r")*) *\}", re.DOTALL)
_MEMBERS = re.compile(_MEMBER, re.DOTALL)


def reorder_tokens(tagged: str, lang: str) -> str:
    """Serialise tagger output in the member order the verbalizer expects (wetext 0.0.4 semantics).

    ``tagged`` looks like ``char { value: "他" } measure { value: "3个" }``; values keep their escapes.
    """
    orders = _TN_ORDERS[lang]
    tokens, pos = [], 0
    for match in _TOKEN.finditer(tagged):
        if tagged[pos : match.start()].strip():
            raise WetextError(f"unexpected tagger output: {tagged[pos : match.start()]!r}")
        pos = match.end()
        name = match.group(1)
        members = dict(_MEMBERS.findall(match.group(2)))
        order = list(members)
        if name in orders and members.get("preserve_order") != "true":
            order = orders[name]
        body = "".join(f' {key}: "{members[key]}"' for key in order if key in members)
        tokens.append(f"{name} {{{body} }}")
    if tagged[pos:].strip():
        raise WetextError(f"unexpected tagger output: {tagged[pos:]!r}")
    return " ".join(tokens)


def _wetext_fst_dir() -> Path:
    # find_spec locates the package without importing it: importing wetext >= 0.1 loads all of its
    # ~50 FSTs (about a second); we need four.
    spec = importlib.util.find_spec("wetext")
    if spec is None or not spec.submodule_search_locations:
        raise CosyVoiceError("the wetext package is not installed: pip install 'wetext>=0.1.8'")
    return Path(next(iter(spec.submodule_search_locations))) / "fsts"


class WetextFst:
    """wetext's text normalisation (operator tn, remove_erhua=False) for one language, 'zh' or 'en'."""

    def __init__(self, lang: str, fst_dir: Path | None = None) -> None:
        import kaldifst

        if lang not in _TN_ORDERS:
            raise ValueError(f"lang must be 'zh' or 'en', got {lang!r}")
        paths = [
            (fst_dir or _wetext_fst_dir()) / lang / "tn" / f"{name}.fst"
            for name in ("tagger", "verbalizer")
        ]
        for path in paths:
            if not path.is_file():
                raise CosyVoiceError(f"wetext FST {path} is missing: reinstall wetext>=0.1.8")
        self.lang = lang
        self._tagger, self._verbalizer = (kaldifst.TextNormalizer(str(path)) for path in paths)

    def __call__(self, text: str) -> str:
        """Normalise ``text`` as one unit (no digit gate); raises WetextError where wetext 0.0.4 fails."""
        tagged = self._tagger(text)
        if not tagged:
            raise WetextError(f"wetext ({self.lang}) has no path for {text!r}")
        return self._verbalizer(reorder_tokens(tagged, self.lang))


_FST_LOCK = threading.Lock()
_FSTS: dict[str, WetextFst] = {}


def _wetext(lang: str) -> WetextFst:
    """The FSTs of one language, loaded once on first use (about 0.1 s each)."""
    fst = _FSTS.get(lang)
    if fst is None:
        with _FST_LOCK:
            fst = _FSTS.get(lang)
            if fst is None:
                fst = _FSTS[lang] = WetextFst(lang)
    return fst


# --------------------------------------------------------------------------------------------------
# The official rule chain (cosyvoice/utils/frontend_utils.py), rewritten.


def contains_chinese(text: str) -> bool:
    return _CHINESE.search(text) is not None


def replace_blank(text: str) -> str:
    """Keep a space only when both neighbours are non-space ASCII (drops spaces around CJK text)."""
    out = []
    for i, char in enumerate(text):
        if char == " ":
            # text[i - 1] wraps around for i == 0, as upstream; a last-position space (upstream
            # IndexError) has no right neighbour and is dropped.
            after = text[i + 1] if i + 1 < len(text) else ""
            before = text[i - 1]
            if after.isascii() and after not in ("", " ") and before.isascii() and before != " ":
                out.append(char)
        else:
            out.append(char)
    return "".join(out)


def replace_corner_mark(text: str) -> str:
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    text = text.replace("（", "").replace("）", "").replace("【", "").replace("】", "")
    return text.replace("`", "").replace("——", " ")


def spell_out_number(text: str, inflect_engine) -> str:
    """Replace every run of ``str.isdigit`` characters (wider than ``\\d``: superscripts, circled digits)
    with inflect's English words, as upstream."""
    out = []
    for is_digit, group in itertools.groupby(text, key=str.isdigit):
        part = "".join(group)
        if is_digit:
            try:
                part = inflect_engine.number_to_words(part)
            except Exception:  # beyond inflect's range (upstream crashes): read digit by digit
                part = inflect_engine.number_to_words(part, group=1)
        out.append(part)
    return "".join(out)


# CosyVoice3's CMU phone tags with a stress digit ([AY0], [ER1]): the only markup with digits
_STRESSED_PHONE = re.compile(r"\[[A-Z]{2}[012]\]")


def outside_stressed_phones(
    text: str, rewrite: Callable[[str], str], tags: re.Pattern = _STRESSED_PHONE
) -> str:
    """``rewrite`` applied to the text between stressed CMU phone tags (or other ``tags``), so
    that number normalisation does not spell out their stress digits (upstream reads ``[AY0]``
    as ``[AYzero]``, ``[AY零]`` in Chinese, and the tag never reaches the model). Text without
    such tags is rewritten whole, as upstream."""
    found = [match.group(0) for match in tags.finditer(text)]
    if not found:
        return rewrite(text)
    parts = tags.split(text)
    out = [rewrite(parts[0]) if parts[0] else ""]
    for tag, part in zip(found, parts[1:], strict=True):
        out += [tag, rewrite(part) if part else ""]
    return "".join(out)


def is_only_punctuation(text: str) -> bool:
    """True for '' and for text with nothing to speak: only Unicode punctuation (P*), symbols
    (S*) and invisible characters (C* but whitespace: controls, zero-width and format marks,
    which upstream speaks, a text of zero-width spaces as ~24 s of babble)."""
    return all(_silent(char) for char in text)


def speaks_nothing(segment: str) -> bool:
    """True for a text segment with nothing to speak past its leading control tags (a v1
    language tag, a system prompt up to ``<|endofprompt|>``): blanks, punctuation and symbols."""
    # blanks anywhere ("- - -", "。 。"), as the streamed-text check has them
    return is_only_punctuation("".join(_control_prefix(segment)[1].split()))


def _silent(char: str) -> bool:
    category = unicodedata.category(char)[0]
    return category in "PS" or (category == "C" and not char.isspace())


def _cut_sentences(text: str, punctuation: frozenset[str]) -> list[str]:
    """Upstream's sentence cut: after each punctuation mark, a following closing quote stays attached.

    A punctuation mark right after another one does not start a sentence: upstream drops it (only
    punctuation is lost); where upstream would then pop from an empty list (IndexError, e.g. '."...'),
    the quote starts the first sentence instead.
    """
    sentences: list[str] = []
    start = 0
    for i, char in enumerate(text):
        if char not in punctuation:
            continue
        if i > start:
            sentences.append(text[start:i] + char)
        if i + 1 < len(text) and text[i + 1] in _CLOSING_QUOTES:
            if sentences:
                sentences[-1] += text[i + 1]
                start = i + 2
            else:
                start = i + 1
        else:
            start = i + 1
    return sentences


def iter_split_paragraph(
    text: str,
    encode: Encode | None,
    lang: str,
    token_max_n: int = TOKEN_MAX_N,
    token_min_n: int = TOKEN_MIN_N,
    merge_len: int = MERGE_LEN,
) -> Iterator[str]:
    """Upstream ``split_paragraph`` (comma_split=False) as a generator.

    Sentences are merged greedily: the current chunk is flushed when adding the next sentence makes it
    longer than ``token_max_n`` and it is already longer than ``token_min_n``; a final remainder shorter
    than ``merge_len`` joins the previous chunk.  Length is characters for zh, ``len(encode(...))`` for
    en.  A chunk is yielded as soon as a later one exists, since only the last can still change.
    One sentence longer than ``LONG_SENTENCE_FACTOR * token_max_n`` is cut first
    (``cut_long_sentence``); shorter ones merge exactly as upstream's. Where such a cut ends a
    chunk inside a ``<strong>`` or ``<laughter>`` span, the chunk closes it and the next one
    reopens it (``carry_spans``).
    """
    return carry_spans(_marked_chunks(text, encode, lang, token_max_n, token_min_n, merge_len))


def _marked_chunks(
    text: str,
    encode: Encode | None,
    lang: str,
    token_max_n: int,
    token_min_n: int,
    merge_len: int,
) -> Iterator[tuple[str, bool]]:
    """``iter_split_paragraph``'s chunks, each with whether it ends at a cut of a long sentence."""
    if not text:
        return
    if lang == "zh":
        punctuation, ending = _ZH_PUNCTUATION, "。"

        def length(part: str) -> int:
            return len(part)

    else:
        punctuation, ending = _EN_PUNCTUATION, "."
        measure = encode or _pretokens

        def length(part: str) -> int:
            return len(measure(part))

    if text[-1] not in punctuation:
        text += ending
    # the last flushed chunk, held back in case the remainder joins it; whether it ends at a cut
    pending: tuple[str, bool] | None = None
    current, at_cut = "", False
    sentences = (
        _marked(cut_long_sentence(whole, token_max_n, length))
        for whole in _cut_sentences(text, punctuation)
    )
    for sentence, cut in itertools.chain.from_iterable(sentences):
        if length(current + sentence) > token_max_n and length(current) > token_min_n:
            if pending is not None:
                yield pending
            pending, current = (current, at_cut), ""
        current, at_cut = current + sentence, cut
    if current:
        if pending is not None and length(current) < merge_len:
            pending = (pending[0] + current, at_cut)
        else:
            if pending is not None:
                yield pending
            pending = (current, at_cut)
    if pending is not None:
        yield pending


def _marked(pieces: list[str]) -> Iterator[tuple[str, bool]]:
    """The pieces of a cut sentence, each with whether a cut follows it (all but the last)."""
    return zip(pieces, [True] * (len(pieces) - 1) + [False], strict=True)


def carry_spans(chunks: Iterable[tuple[str, bool]]) -> Iterator[str]:
    """The chunks, where one ends at a cut of ours (``True``: a long sentence's, which upstream
    keeps whole) inside ``<strong>`` or ``<laughter>`` spans, with them closed at its end and
    reopened at the next chunk's start: each chunk is spoken alone, and a middle one had lost
    its emphasis. Upstream's own splits (sentence ends) stay as upstream's."""
    reopen: list[str] = []
    for chunk, at_cut in chunks:
        if is_only_punctuation(chunk):  # dropped: no tag to add
            yield chunk
            continue
        still_open = open_spans(chunk, reopen)
        chunk = "".join(f"<{name}>" for name in reopen) + chunk
        reopen = still_open if at_cut else []
        yield chunk + "".join(f"</{name}>" for name in reversed(reopen))


# One sentence longer than this many times token_max_n is cut into pieces (cut_long_sentence)
LONG_SENTENCE_FACTOR = 2
# where a long text is cut, best first: after a sentence's end (with its closing quote; a period
# only before a space, not in 3.14), after a pause, after a space
_AFTER_END = re.compile(
    r"(?:(?<=[。！？!?；;…])(?![”’\"'」』）)])|(?<=[。！？!?；;…][”’\"'」』）)])|(?<=\.\s))"
)
# not after a comma or colon between digits: 2,345,678 and 12:30 are one number
_AFTER_PAUSE = re.compile(r"(?<=[，、；;])|(?<=[,:：])(?!(?<=\d[,:：])\d)")
_AFTER_SPACE = re.compile(r"(?<=\s)")


def cut_long_sentence(sentence: str, token_max_n: int, length: Callable[[str], int]) -> list[str]:
    """``sentence``, or pieces of it if it is longer than ``LONG_SENTENCE_FACTOR * token_max_n``
    (``length``: the splitter's measure). Upstream splits only at sentence ends, so a text
    without them (a list of commas, one long line) is one segment however long, and its speech,
    bounded by 20 tokens per text token, and the flow's memory for it grow without bound. Such a
    sentence is cut at its pauses (commas and the like), else at spaces, else every
    ``token_max_n`` tokens, into pieces of about ``token_max_n``. Sentences of ordinary text
    are far shorter and stay whole. A text upstream speaks unsplit (markup, normalisation off) is
    first cut at its sentences' ends."""
    if length(sentence) <= LONG_SENTENCE_FACTOR * token_max_n:
        return [sentence]
    return _merge(_cascade(sentence, _CUT_PLACES, length, token_max_n), length, token_max_n)


_CUT_PLACES = (_AFTER_END, _AFTER_PAUSE, _AFTER_SPACE)


def _cascade(
    text: str, places: tuple[re.Pattern, ...], length: Callable[[str], int], limit: int
) -> list[str]:
    """``text`` in pieces within ``limit``: cut at the first kind of place, each piece still too
    long at the next kind, and in fixed-size pieces where none is left."""
    if length(text) <= limit:
        return [text]
    if not places:
        return _fixed_pieces(text, limit, length)
    return [
        piece
        for part in places[0].split(text)
        if part
        for piece in _cascade(part, places[1:], length, limit)
    ]


def _fixed_pieces(text: str, size: int, length: Callable[[str], int] = len) -> list[str]:
    """``text`` in pieces of at most ``size`` characters and ``size`` by ``length`` (tokens: a
    character may take several). A cut is never inside a tag (``[breath]``, ``<strong>``,
    ``<|en|>``) nor between adjacent tags (``[h][ào]`` spells one syllable): it moves to before
    the run of tags, or, for a run longer than a piece, to the last boundary between its tags
    (after its first tag if even that one is longer). Nor inside a character's cluster (a
    combining mark, an emoji's joiner), unless the cluster is longer than a piece. Nor inside an
    ASCII word or number (``React`` in unpunctuated Chinese, which loses its spaces), unless the
    word is longer than a piece."""
    size = max(size, 1)
    runs = [(m.start(), m.end()) for m in _TAG_RUN.finditer(text)]
    words = [(m.start(), m.end()) for m in _WORD_RUN.finditer(text)]

    def fits(lo: int, hi: int) -> bool:
        return _longest_within(text, lo, size, length) >= hi

    pieces, start = [], 0
    while True:
        cut = _longest_within(text, start, size, length)
        if cut >= len(text):  # (a cut after a last tag ends the text: no empty piece)
            if start < len(text) or not pieces:
                pieces.append(text[start:])
            return pieces
        # tags last: a cluster that continues past a tag ("[breath]\u200d") had moved the cut
        # back into the tag
        cut = _word_start(start, _cluster_start(text, start, cut), words, fits)
        cut = _cut_outside_tags(text, start, cut, runs)
        pieces.append(text[start:cut])
        start = cut


def _longest_within(text: str, start: int, size: int, length: Callable[[str], int]) -> int:
    """The furthest end of a piece from ``start`` within ``size`` characters and ``size`` by
    ``length`` (one character at least)."""
    cut = min(len(text), start + size)
    if length(text[start:cut]) <= size:
        return cut
    low, high = start + 1, cut - 1  # the furthest end that fits, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if length(text[start:middle]) <= size:
            low = middle
        else:
            high = middle - 1
    return low


def _cluster_start(text: str, start: int, cut: int) -> int:
    """``cut``, moved back to where the character cluster it falls in starts (after ``start``);
    ``cut`` itself if the cluster began at or before ``start``."""
    at = cut
    while at > start and at < len(text) and _continues_cluster(text, at):
        at -= 1
    return at if at > start else cut


def _word_start(
    start: int, cut: int, words: list[tuple[int, int]], fits: Callable[[int, int], bool]
) -> int:
    """``cut``, moved back to the start of the word it falls in (``_WORD_RUN``), where that word
    starts after ``start`` and fits in a piece: a longer one is cut anyway."""
    index = bisect.bisect_left(words, (cut, -1)) - 1  # the last word starting before the cut
    if index < 0 or words[index][1] <= cut:
        return cut
    word_start, word_end = words[index]
    return word_start if word_start > start and fits(word_start, word_end) else cut


def _continues_cluster(text: str, index: int) -> bool:
    char = text[index]
    return (
        unicodedata.category(char) in ("Mn", "Mc", "Me")  # combining marks (Thai vowels, accents)
        or char in _JOINERS
        or text[index - 1] in _JOINERS
        or 0x1F3FB <= ord(char) <= 0x1F3FF  # skin tones
        or 0xFE00 <= ord(char) <= 0xFE0F  # variation selectors
        or 0xE0020 <= ord(char) <= 0xE007F  # tag characters (subdivision flags)
    )


_JOINERS = "\u200d"


def _cut_outside_tags(text: str, start: int, cut: int, runs: list[tuple[int, int]]) -> int:
    """``cut``, or the nearest place before it (after ``start``) outside every run of tags; in a
    run that began at or before ``start`` (which is then a boundary between its tags), the last
    boundary before ``cut``, else the end of the tag at ``start``."""
    index = bisect.bisect_left(runs, (cut, -1)) - 1  # the last run starting before the cut
    if index < 0 or runs[index][1] <= cut:
        return cut
    run_start = runs[index][0]
    if run_start > start:
        return run_start
    ends = [m.end() for m in _TAG_AT.finditer(text, start, cut)]
    if ends:
        return ends[-1]
    first = _TAG_AT.match(text, start)  # (none where a run holds a tag inside a tag: [<strong>])
    return first.end() if first is not None else cut


# the tags check_markup knows as tags (frontend/markup.py)
_TAG_AT = re.compile("|".join(pattern.pattern for pattern in (BRACKET, CONTROL, ANGLE)))
_TAG_RUN = re.compile(f"(?:{_TAG_AT.pattern})+")
# an ASCII word or number, with the tags stuck to it (<strong>React</strong>, [h][ào]x): a fixed
# cut in it would read it as two words in two utterances
_WORD_RUN = re.compile(rf"(?:[A-Za-z0-9]|{_TAG_AT.pattern})+")
_LEADING_TAGS = re.compile(rf"(?:\s*{CONTROL.pattern})+")


def _control_prefix(text: str) -> tuple[str, str]:
    """(the control markup a text starts with, the rest): everything up to ``<|endofprompt|>``
    (a system prompt), else the leading ``<|...|>`` tags (v1 language tags)."""
    mark = "<|endofprompt|>"
    if mark in text:
        end = text.index(mark) + len(mark)
        return text[:end], text[end:]
    match = _LEADING_TAGS.match(text)
    return (match.group(0), text[match.end() :]) if match else ("", text)


def _merge(pieces: list[str], length: Callable[[str], int], limit: int) -> list[str]:
    """Neighbouring pieces joined while they stay within ``limit``; a last piece shorter than
    ``MERGE_LEN`` joins the one before (as upstream's remainder does)."""
    merged: list[str] = []
    for piece in pieces:
        if merged and length(merged[-1] + piece) <= limit:
            merged[-1] += piece
        else:
            merged.append(piece)
    if len(merged) > 1 and length(merged[-1]) < MERGE_LEN:
        last = merged.pop()
        merged[-1] += last
    return merged


_PRETOKEN = re.compile(r"\w+|[^\w\s]+")


def _pretokens(text: str) -> list[str]:
    """Words, numbers and punctuation runs: a lower bound of the BPE token count, used for English
    lengths when no tokenizer is given (e.g. ``cosyvoice-lite normalize`` without a model)."""
    return _PRETOKEN.findall(text)


def split_paragraph(text: str, encode: Encode | None, lang: str, **bounds: int) -> list[str]:
    return list(iter_split_paragraph(text, encode, lang, **bounds))


# --------------------------------------------------------------------------------------------------
# wetext over windows around digits


# Context kept around each digit run: characters for zh (the zh tagger is character based), words for
# en.  Number rules read a few neighbours ("约21196千米", "下午3点", "March 15, 2023", "$2 million").
ZH_CONTEXT_CHARS = 4
EN_CONTEXT_WORDS = 3
# A window's length at most (a longer run of ASCII is cut in pieces of it): ~20 ms of tagging
# for dense numbers, which grows faster than the window; long URLs still go whole.
MAX_WINDOW_CHARS = 128
MAX_SPACE_RUN = 8  # spaces a zh window reaches over so as not to end next to one
_WINDOW_BREAKS = frozenset(
    "\n。！？；"
)  # a window never crosses these (wetext's own hard boundaries)


def _zh_windows(text: str) -> Iterator[tuple[int, int]]:
    """Spans to normalise: each digit run with the ASCII letters and symbols stuck to it (units such as
    km/h, GHz, 3.5%), then ZH_CONTEXT_CHARS characters each side, never across a break, never cut next
    to a space (the tagger deletes a space at the end of its input) unless in a long run of them;
    at most about MAX_WINDOW_CHARS long (see _add_span)."""
    n = len(text)
    spans: list[list[int]] = []
    number_end = 0
    for match in _ZH_NUMBER.finditer(text):
        for start, end in _long_run_pieces(text, match.start(), match.end()):
            lo, hi = start, end
            for _ in range(ZH_CONTEXT_CHARS):
                if lo == 0 or text[lo - 1] in _WINDOW_BREAKS:
                    break
                lo -= 1
            for _ in range(ZH_CONTEXT_CHARS):
                if hi == n or text[hi] in _WINDOW_BREAKS:
                    break
                hi += 1
            for _ in range(MAX_SPACE_RUN):
                if lo == 0 or " " not in text[lo - 1 : lo + 1] or text[lo - 1] in _WINDOW_BREAKS:
                    break
                lo -= 1
            for _ in range(MAX_SPACE_RUN):
                if hi == n or " " not in text[hi - 1 : hi + 1] or text[hi] in _WINDOW_BREAKS:
                    break
                hi += 1
            _add_span(spans, lo, hi, number_end, start)
            number_end = end
    for lo, hi in spans:
        yield lo, hi


def _add_span(spans: list[list[int]], lo: int, hi: int, previous_end: int, start: int) -> None:
    """Add the window [lo, hi) of the number starting at ``start``, merged with the last one where
    they overlap, unless that would pass MAX_WINDOW_CHARS: tagging time grows faster than a
    window (numbers a space apart had made a 4,096-character text one window: seconds holding
    the interpreter, ~250 MB). Then the two windows meet in the gap between the numbers, the
    first half of it (a unit, "3个") with the first number."""
    if not spans or lo > spans[-1][1]:
        spans.append([lo, hi])
    elif hi - spans[-1][0] <= MAX_WINDOW_CHARS:
        spans[-1][1] = max(spans[-1][1], hi)
    else:
        cut = previous_end + (start - previous_end + 1) // 2
        cut = max(previous_end, min(cut, spans[-1][1]))
        spans[-1][1] = cut
        spans.append([cut, hi])


def _long_run_pieces(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """``text[start:end]`` (a run of ASCII, a word) in pieces of MAX_WINDOW_CHARS at most, each
    cut moved back to the start of a number it falls in (a URL's qid=1701234567 had been read
    as 170 and 1,234,567), unless that number starts the piece (is longer than one)."""
    while start < end:
        cut = min(start + MAX_WINDOW_CHARS, end)
        for number in _NUMBER.finditer(text, start, end):
            if number.start() >= cut:
                break
            if number.end() > cut and number.start() > start:
                cut = number.start()
        yield start, cut
        start = cut


_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")  # as one number: 1,234.5, 12:30


def _en_windows(text: str) -> Iterator[tuple[int, int]]:
    words = [
        piece  # a long word in pieces
        for m in _WORD.finditer(text)
        for piece in _long_run_pieces(text, m.start(), m.end())
    ]
    spans: list[list[int]] = []
    previous = previous_last = -1  # the last word with a digit, the last word of its window
    for index, (start, end) in enumerate(words):
        if not _DIGIT.search(text, start, end):
            continue
        first, last = index, index
        for _ in range(EN_CONTEXT_WORDS):
            if first == 0 or "\n" in text[words[first - 1][1] : words[first][0]]:
                break
            first -= 1
        for _ in range(EN_CONTEXT_WORDS):
            if last + 1 == len(words) or "\n" in text[words[last][1] : words[last + 1][0]]:
                break
            last += 1
        lo, hi = words[first][0], words[last][1]
        if not spans or lo > spans[-1][1] + 1:
            spans.append([lo, hi])
        elif hi - spans[-1][0] <= MAX_WINDOW_CHARS:
            spans[-1][1] = max(spans[-1][1], hi)
        else:  # as _add_span, at a word boundary: the space between stays outside both
            cut = _en_cut(text, words, max(previous + 1, first), min(index, previous_last + 1))
            spans[-1][1] = words[cut - 1][1]
            spans.append([words[cut][0], hi])
        previous, previous_last = index, last
    for lo, hi in spans:
        yield lo, hi


def _en_cut(text: str, words: list[tuple[int, int]], low: int, high: int) -> int:
    """Where two English windows meet, between the words of the gap between two numbers (the
    index of the second window's first word, from ``low`` to ``high``): after a comma or a
    semicolon or before a capitalised word (the places nearest the middle), else in the
    middle with the odd word on the first number's side. A unit follows its number ("28 cm,
    3 cm": a cut before "cm" read it as letters), a prefix precedes it ("12 kg No. 539",
    "5/8 March 10")."""
    middle = low + (high - low + 1) // 2
    places = [cut for cut in range(low, high + 1) if _en_cut_place(text, words, cut)]
    return min(places, key=lambda cut: abs(cut - middle), default=middle)


def _en_cut_place(text: str, words: list[tuple[int, int]], cut: int) -> bool:
    """Whether a window may well start at word ``cut``: after a pause, or at a prefix."""
    start, end = words[cut]
    return text[words[cut - 1][1] - 1] in ",;" or _EN_PREFIX.fullmatch(text, start, end) is not None


# a capitalised word or abbreviation, which rather opens what follows: No., Mr., March, Monday
_EN_PREFIX = re.compile(r"[A-Z][a-z]{0,3}\.|[A-Z][a-z]{2,}")


_ZH_NUMBER = re.compile(r"[!-~\d]*\d[!-~\d]*")
_WORD = re.compile(r"\S+")
_WHITESPACE_RUN = re.compile(r"\s{2,}|[^\S ]")
_ASCII_DIGIT_RUN = re.compile(r"[!-~]*\d[!-~]*")


def wetext_normalize(text: str, lang: str) -> str:
    """wetext 0.0.4 ``Normalizer.normalize`` for ``lang``: only text containing a digit is rewritten.

    The FSTs run on windows around the digit runs (see ZH_CONTEXT_CHARS / EN_CONTEXT_WORDS) instead of
    the whole text.
    """
    if not _DIGIT.search(text):
        return text
    fst = _wetext(lang)
    windows = _zh_windows(text) if lang == "zh" else _en_windows(text)
    out, last = [], 0
    for lo, hi in windows:
        gap = text[last:lo]
        if lang == "en" and last and not gap:  # two pieces of a long word: their words apart
            gap = " "  # ("equal signone seven" had glued two)
        out.append(gap)
        # spaces at a window's ends (inside a long run of them) are kept: the tagger drops one
        window = text[lo:hi]
        core = window.strip(" ")
        head = window[: len(window) - len(window.lstrip(" "))]
        tail = window[len(window.rstrip(" ")) :] if core else ""
        out.append(head + _normalize_window(fst, core) + tail if core else window)
        last = hi
    out.append(text[last:])
    return "".join(out)


def _normalize_window(fst: WetextFst, window: str) -> str:
    """One window through wetext.  Where wetext has no path for it (upstream raises), e.g. Hangul or
    '#' in the en FST, the ASCII runs holding the digits are normalised on their own instead."""
    candidates = [window]
    if fst.lang == "en" and _WHITESPACE_RUN.search(window):
        # The en FSTs have no path for whitespace runs ("a  b", blank lines) but read single spaces.
        candidates.append(_WHITESPACE_RUN.sub(" ", window))
    for candidate in candidates:
        normalized = _try_fst(fst, candidate)
        if normalized is not None:
            return normalized
    return _ASCII_DIGIT_RUN.sub(
        lambda match: _try_fst(fst, match.group(0)) or match.group(0), window
    )


def _try_fst(fst: WetextFst, text: str) -> str | None:
    try:
        normalized = fst(text)
    except WetextError:
        return None
    return normalized if normalized.strip() else None  # e.g. 'docs.python.org/3/library.' -> ''


# --------------------------------------------------------------------------------------------------
# The frontend


def _check_unicode(text: str) -> None:
    """Text that is not Unicode (a lone surrogate: a non-UTF-8 argument or file) is refused, not
    handed to wetext or a tokenizer (TypeError deep inside)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(
            "the text is not valid Unicode (a lone surrogate, e.g. from a non-UTF-8 argument "
            "or file)",
            "text",
        ) from None


def is_markup(text: str) -> bool:
    """Upstream skips normalisation for text carrying ``<|...|>`` markup (language tags, endofprompt)."""
    return "<|" in text and "|>" in text


class TextFrontend:
    """Upstream ``CosyVoiceFrontEnd.text_normalize`` (wetext path), usable without model weights.

    ``encode`` is the model's text tokenizer (``WhisperTextTokenizer.encode`` for v1, the Qwen2
    tokenizer for v2/v3): English segments are measured in its tokens.  wetext and inflect are loaded
    on first use.
    """

    def __init__(
        self,
        encode: Encode | None = None,
        *,
        token_max_n: int = TOKEN_MAX_N,
        token_min_n: int = TOKEN_MIN_N,
        merge_len: int = MERGE_LEN,
    ) -> None:
        self.encode = encode
        self.bounds = {
            "token_max_n": token_max_n,
            "token_min_n": token_min_n,
            "merge_len": merge_len,
        }
        self._inflect = None
        # requests are prepared on several threads, and inflect's number_to_words keeps its
        # state on the engine ("three hundred and forty trillion" for 340 billion, 3 in 60)
        self._inflect_lock = threading.Lock()

    @property
    def inflect_engine(self):
        if self._inflect is None:
            import inflect

            self._inflect = inflect.engine()
        return self._inflect

    def normalize_text(self, text: str, enabled: bool = True) -> str:
        """The normalised text, unsplit (upstream ``text_normalize(text, split=False)``)."""
        _check_unicode(text)
        if not enabled or is_markup(text) or text == "":
            return text
        return self._normalize(text.strip())[0]

    def normalize(
        self, text: str, split: bool = True, enabled: bool = True, encode: Encode | None = None
    ) -> list[str] | str:
        """Upstream ``text_normalize``: with ``split`` the list of segments to synthesise (one LLM call
        each), without it the normalised text as one string.  Bypassed texts (``<|...|>`` markup,
        ``enabled=False``, '') come back unchanged (as ``[text]`` when split).

        ``encode`` overrides the frontend's tokenizer for English lengths; with neither, English
        lengths are approximated by counting words and punctuation runs.
        """
        if not split:
            return self.normalize_text(text, enabled)
        return list(self.iter_segments(text, enabled, encode))

    def iter_segments(
        self, text: str, enabled: bool = True, encode: Encode | None = None
    ) -> Iterator[str]:
        """The segments of ``normalize(text)``, yielded as soon as each is final.

        The segments concatenated are the normalised text plus a final punctuation mark, less the
        punctuation marks upstream drops (a mark right after another one, segments made only of
        punctuation).  A whitespace-only text yields nothing (upstream raises IndexError).
        Text that is not Unicode (a lone surrogate: a non-UTF-8 argument or file) is refused.
        """
        _check_unicode(text)
        if not enabled or is_markup(text) or text == "":
            yield from self._unsplit(text, encode or self.encode)
            return
        normalized, lang = self._normalize(text.strip())
        encode = encode or self.encode
        for segment in iter_split_paragraph(normalized, encode, lang, **self.bounds):
            if not is_only_punctuation(segment):
                yield segment

    def _unsplit(self, text: str, encode: Encode | None) -> Iterator[str]:
        """A text upstream speaks whole (markup, normalisation off): whole, unless it is longer
        than ``LONG_SENTENCE_FACTOR * token_max_n`` tokens; then cut as one long sentence is, each
        piece starting with the control tags each segment needs: the text's system prompt up to
        ``<|endofprompt|>``, else the language tag in effect where it starts (v1: the text's
        leading ``<|zh|>``, or the last tag before it, ``<|en|>`` in ``<|zh|>…<|en|>…``)."""
        measure = encode or _pretokens
        prefix, body = _control_prefix(text)
        pieces = cut_long_sentence(body, self.bounds["token_max_n"], lambda p: len(measure(p)))
        if len(pieces) == 1:
            yield text
            return
        system_prompt = "<|endofprompt|>" in prefix
        for piece in carry_spans(_marked(pieces)):
            # a piece opening with its own tag needs no other (<|zh|><|en|> had been spoken)
            own = _LEADING_TAGS.match(piece) is not None and not system_prompt
            if not is_only_punctuation(piece):
                yield piece if own else prefix + piece
            if not system_prompt and (tags := LANGUAGE_TAG.findall(prefix + piece)):
                prefix = tags[-1]

    def _normalize(self, text: str) -> tuple[str, str]:
        if contains_chinese(text):
            text = _zh_between_tags(text)
            text = text.replace("\n", "")
            text = replace_blank(text)
            text = replace_corner_mark(text)
            text = text.replace(".", "。").replace(" - ", "，")
            text = remove_bracket(text)
            text = _TRAILING_COMMAS.sub("。", text)
            return text, "zh"
        # in English every tag is kept out: the en FSTs have no path for a number with a tag
        # stuck to it ("1.5[breath]": upstream raises), whose digits were then read one by one
        text = outside_stressed_phones(text, lambda part: wetext_normalize(part, "en"), _TAG_AT)
        if any(
            char.isdigit() for char in text
        ):  # wetext reads most numbers; inflect is slow to import
            with self._inflect_lock:  # inflect keeps a call's state on its engine
                text = outside_stressed_phones(
                    text, lambda part: spell_out_number(part, self.inflect_engine)
                )
        return text, "en"


_TRAILING_COMMAS = re.compile(r"[，,、]+$")


def _zh_between_tags(text: str) -> str:
    """wetext (zh) on the text between tags, each piece read with the text next to it
    (ZH_CONTEXT_CHARS each side, tags left out, up to a digit or a break) as context: a tag
    in a window parted a number from its unit (价格是<strong>12.5</strong>元 read as a date,
    十二月五日). Where a context is not read back as written, the text is read with its tags
    in it, as upstream reads it (stressed CMU phones still kept out: outside_stressed_phones)."""
    parts = _ZH_TAG.split(text)  # text, tag, text, ..., text
    if len(parts) == 1:
        return wetext_normalize(text, "zh")
    plain, out, offset = "".join(parts[::2]), [], 0
    for index, part in enumerate(parts):
        if index % 2:  # a tag
            out.append(part)
            continue
        read = _zh_in_context(plain, offset, offset + len(part))
        if read is None:
            return outside_stressed_phones(text, lambda piece: wetext_normalize(piece, "zh"))
        out.append(read)
        offset += len(part)
    return "".join(out)


def _zh_in_context(plain: str, start: int, end: int) -> str | None:
    """``plain[start:end]`` through wetext (zh) with its context in ``plain``; None where the
    context is not read back as written."""
    part = plain[start:end]
    if not _DIGIT.search(part):
        return part
    left = _ZH_LEFT_CONTEXT.search(plain, max(0, start - ZH_CONTEXT_CHARS), start).group(0)
    right = _ZH_RIGHT_CONTEXT.match(plain, end, end + ZH_CONTEXT_CHARS).group(0)
    read = wetext_normalize(left + part + right, "zh")
    if len(read) < len(left) + len(right) or not (read.startswith(left) and read.endswith(right)):
        return None
    return read[len(left) : len(read) - len(right)]


# the tags a zh number is read apart from: check_markup's (not [1] nor an escaped \[sic])
_ZH_TAG = re.compile(rf"({CONTROL.pattern}|{ANGLE.pattern}|(?<!\\)\[(?!\d+\])[^\[\]\s]{{1,16}}\])")
_ZH_LEFT_CONTEXT = re.compile(r"[^\d\n。！？；]*$")
_ZH_RIGHT_CONTEXT = re.compile(r"[^\d\n。！？；]*")
