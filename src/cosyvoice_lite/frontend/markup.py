"""Inline markup in text: pronunciation ([h][ào], [M][AY0]), sounds ([laughter], [breath]),
emphasis (<strong>...</strong>) and control tokens (<|en|>, <|endofprompt|>).

Markup reaches the tokenizer unchanged (the text frontend bypasses normalisation for <|...|> text,
and bracket tags are single special tokens for v2/v3). What we add is a check: a tag the loaded
model does not know would otherwise be spoken as literal characters, so it is an error naming it.
Brackets meant as text are written with a backslash, ``\\[sic]``: the check passes them and
``unescape`` removes the backslash before the text is spoken.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Collection, Iterable, Iterator

from ..errors import InvalidRequestError

CONTROL = re.compile(r"<\|[^<>|\s]{1,40}\|>")
BRACKET = re.compile(r"\[[^\[\]\s]{1,16}\]")
ANGLE = re.compile(r"</?[A-Za-z_][A-Za-z_-]{0,19}>")
ESCAPED_BRACKET = re.compile(r"\\(" + BRACKET.pattern + ")")  # \[sic]: text, not a tag

# CosyVoice-300M-Instruct's inline tags (official README); other v1 releases ignore them harmlessly.
V1_TAGS = frozenset(
    {"<laughter>", "</laughter>", "<strong>", "</strong>", "[laughter]", "[breath]"}
)


# Special tokens of the text tokenizers that are not CosyVoice markup: Qwen's chat template, and
# whisper's task, timestamp and other non-language tokens. Written in a text they would reach the
# LLM as control tokens (upstream lets them through); they count as unknown markup.
CHAT_TOKENS = frozenset({"<|im_start|>", "<|im_end|>", "<|endoftext|>"})
LANGUAGE_TAG = re.compile(r"<\|[a-z]{2,3}\|>")


def user_markup(special_tokens: Iterable[str], whisper: bool) -> frozenset[str]:
    """The special tokens a user may write: whisper's language tags only (v1), every CosyVoice
    token but the chat template's (v2/v3)."""
    if whisper:
        return frozenset(t for t in special_tokens if LANGUAGE_TAG.fullmatch(t))
    return frozenset(special_tokens) - CHAT_TOKENS


def find_markup(text: str) -> list[str]:
    """Every markup-looking tag in ``text``, in order (bracketed numbers like [1] and escaped
    brackets like \\[sic] are text)."""
    found = []
    for pattern in (CONTROL, BRACKET, ANGLE):
        for match in pattern.finditer(text):
            tag, start = match.group(0), match.start()
            if pattern is BRACKET and (tag[1:-1].isdigit() or text[start - 1 : start] == "\\"):
                continue
            found.append((start, tag))
    return [tag for _, tag in sorted(found)]


def unescape(text: str) -> str:
    """The text as it is spoken: composed (NFC, as ``check_markup`` reads it) and each escaped
    bracket's backslash removed (\\[sic] -> [sic])."""
    text = unicodedata.normalize("NFC", text)
    return ESCAPED_BRACKET.sub(r"\1", text) if "\\[" in text else text


def _is_phone(tag: str) -> bool:
    inner = tag[1:-1]
    return tag.startswith("[") and (inner.isupper() or not inner.isascii() or len(inner) <= 3)


def check_markup(
    texts: Iterable[str], known: frozenset[str], model_name: str, field: str | None = None
) -> None:
    """Raise InvalidRequestError (naming ``field``) for every tag in ``texts`` that the model
    does not know, or that is escaped although it is the model's own (its tokenizer reads it as
    the tag anyway)."""
    unknown: dict[str, None] = {}  # ordered and unique (a list was quadratic in tags)
    own: dict[str, None] = {}
    for text in texts:
        # composed, as spoken (``unescape``): a tone typed as a combining mark, [h][a\u0300o],
        # is the tag [h][ào]
        text = unicodedata.normalize("NFC", text)
        unknown.update((tag, None) for tag in find_markup(text) if tag not in known)
        own.update(
            (m.group(1), None) for m in ESCAPED_BRACKET.finditer(text) if m.group(1) in known
        )
    if own:
        raise InvalidRequestError(
            f"{_named(own)} {'is' if len(own) == 1 else 'are'} {model_name}'s own markup, "
            "always read as markup; write it without the backslash to use it, or differently to "
            "say it",
            field,
        )
    if not unknown:
        return
    tags = sorted(t for t in known if not (t.startswith("<|") or _is_phone(t)))
    brackets = [t[1:-1] for t in known if t.startswith("[")]
    hint = f"it knows {', '.join(tags)}" if tags else "it knows no sound or emphasis tags"
    if any(not inner.isascii() for inner in brackets):
        hint += ", pinyin ([h][ào])"
    if any(inner.isupper() for inner in brackets):
        hint += ", CMU phones ([M][AY0])"
    if any(tag.startswith("[") for tag in unknown):  # only brackets have an escape
        advice = "Remove the tag, or escape a bracket meant as text (\\[sic])."
    else:
        advice = "Remove the tag, or write it differently if it was meant as text."
    raise InvalidRequestError(
        f"{model_name} does not know the markup {_named(unknown)}; {hint}. {advice}", field
    )


NAMED_AT_MOST = 10


def _named(tags: Collection[str]) -> str:
    """The first tags, then how many more: a message stays short whatever the text holds."""
    first = list(itertools.islice(tags, NAMED_AT_MOST))
    more = len(tags) - len(first)
    return ", ".join(first) + (f" and {more} more" if more else "")


def held_back(text: str) -> int:
    """Where a streamed piece's end may still be the start of a tag or of a bracket's escape (a
    trailing backslash, an unclosed ``[``, ``<`` or ``<|`` that could close in the next piece):
    the index from which to keep it for the next piece, ``len(text)`` when nothing is open."""
    match = _OPEN_AT_END.search(text)
    return len(text) if match is None else match.start()


_OPEN_AT_END = re.compile(
    r"\\?(?:\[[^\[\]\s]{0,16})?$|\[[^\[\]\s]{0,16}$"  # a bracket tag, its escape
    r"|<(?:\|[^<>|\s]{0,40}\|?|/?(?:[A-Za-z_][A-Za-z_-]{0,19})?)?$"  # a control or angle tag
)


# the paired tags, which make a span of text: <strong>...</strong>, <laughter>...</laughter>
SPAN_TAG = re.compile(r"<(/?)(strong|laughter)>")


def open_spans(text: str, names: Iterable[str] = ()) -> list[str]:
    """The spans (``strong``, ``laughter``) open at the end of ``text``, innermost last, with
    ``names`` open at its start; a closing tag closes the innermost span of its name."""
    spans = list(names)
    for match in SPAN_TAG.finditer(text):
        closing, name = match.groups()
        if not closing:
            spans.append(name)
        elif name in spans:
            del spans[len(spans) - 1 - spans[::-1].index(name)]
    return spans


# streamed text that opens as CosyVoice3's system prompt does is held back up to this many
# characters (past them, the rest of a mark) while its <|endofprompt|> may still come
SYSTEM_PROMPT_HOLD = 128


def own_system_prompt(text: str, mark: str) -> tuple[str, str]:
    """(what a text says before its first ``mark`` (<|endofprompt|>), its system prompt or
    instruction, stripped; the text after the mark), or (None, text) if it has no mark."""
    head, found, rest = text.partition(mark)
    return (head.strip(), rest) if found else (None, text)


def instruction_in_text(model_name: str, problem: str, advice: str = "") -> InvalidRequestError:
    """The error for an instruction (or its <|endofprompt|>) where a text cannot carry it;
    ``advice``: a first way out, before the general ones."""
    ways = [advice] if advice else []
    ways += [
        "give the instruction as instruct (mode instruct)",
        "when cloning, at the head of prompt_text ('You are a helpful assistant. 请用广东话表达。"
        "<|endofprompt|>' and the transcript)",
    ]
    ways_out = ", or ".join(ways)
    return InvalidRequestError(
        f"{problem}: {model_name} would speak it. {ways_out[0].upper()}{ways_out[1:]}", "text"
    )


def without_system_prompt(
    pieces: Iterable[object],
    mark: str,
    canonical: str,
    model_name: str = "CosyVoice3",
    hold: int = SYSTEM_PROMPT_HOLD,
) -> Iterator[object]:
    """Streamed text pieces less the system prompt they start with, up to ``mark``
    (<|endofprompt|>), wherever the mark arrives in the text's first characters: the
    ``canonical`` one ("You are a helpful assistant.", which the engine puts before the stream)
    or none is dropped. Any other instruction there is an InvalidRequestError: CosyVoice3 reads
    a stream's system prompt before its first piece, so it would be spoken. Pieces are held back
    only while the text may still be one: blank so far, ending in the start of the mark (split
    between pieces), or opening with ``canonical``, for at most ``hold`` characters and the
    mark's length. Any other text goes on at once: holding every stream's first words would
    delay its first audio (a mark after it is the caller's to refuse). A piece that is not a
    str ends the holding (the caller refuses it)."""
    iterator = iter(pieces)
    held: list[object] = []
    text = ""
    for piece in iterator:
        held.append(piece)
        if not isinstance(piece, str):
            break
        text += piece
        if mark in text:
            instruction, rest = own_system_prompt(text, mark)
            if instruction not in ("", canonical):
                raise instruction_in_text(
                    model_name,
                    f"streamed text cannot carry its own instruction ({instruction[:40]!r} "
                    "before <|endofprompt|>; the LLM reads one before the stream)",
                    "send the text whole (cross-lingual reads it there)",
                )
            held = [rest]
            break
        if not _may_be_system_prompt(text, mark, canonical) or len(text) >= hold + len(mark):
            break
    yield from held
    yield from iterator


def _may_be_system_prompt(text: str, mark: str, opening: str) -> bool:
    start = text.lstrip()
    if not start or opening.startswith(start) or start.startswith(opening):
        return True
    return any(text.endswith(mark[:n]) for n in range(1, len(mark)))
