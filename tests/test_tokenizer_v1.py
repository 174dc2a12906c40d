"""v1 text tokenizer: equal to openai-whisper's multilingual tokenizer with allowed_special='all'.

Goldens from tools/golden/tokenizer_v1.py (whisper 20250625 in the reference environment).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _assets import whisper_vocab_path

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.frontend.tokenizer import (
    WHISPER_MULTILINGUAL_SHA256,
    WhisperTextTokenizer,
    file_sha256,
    whisper_special_tokens,
)

GOLDEN = Path(__file__).parent / "data" / "golden" / "text"
CORPUS = Path(__file__).parent / "data" / "text_corpus.jsonl"


def _goldens() -> list[dict]:
    with open(GOLDEN / "whisper_tokens.jsonl", encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


@pytest.fixture(scope="module")
def tokenizer() -> WhisperTextTokenizer:
    return WhisperTextTokenizer(whisper_vocab_path())


def test_special_tokens_follow_whisper_order():
    specials = json.loads((GOLDEN / "whisper_specials.json").read_text(encoding="utf-8"))
    expected = list(specials["special_tokens"])  # sorted by id
    assert whisper_special_tokens(100) == expected
    assert expected[:4] == ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|zh|>"]
    assert expected[-1] == "<|30.00|>" and len(expected) == 2 + 100 + 6 + 1501


def test_vocabulary_file_is_whispers(tokenizer):
    assert file_sha256(whisper_vocab_path()) == WHISPER_MULTILINGUAL_SHA256
    specials = json.loads((GOLDEN / "whisper_specials.json").read_text(encoding="utf-8"))
    assert tokenizer.vocab_size == specials["n_vocab"] == 51866
    assert tokenizer.special_tokens == specials["special_tokens"]
    assert tokenizer.eot == 50257 and tokenizer.timestamp_begin == 50365


def test_encode_and_decode_equal_whisper(tokenizer):
    goldens = _goldens()
    assert len(goldens) > 400
    mismatches = [g["text"] for g in goldens if tokenizer.encode(g["text"]) != g["ids"]]
    assert not mismatches, mismatches[:5]
    for golden in goldens:
        assert tokenizer.decode(golden["ids"]) == golden["decoded"]


def test_markup_that_is_not_a_whisper_special_is_plain_bpe(tokenizer):
    lang = tokenizer.special_tokens["<|zh|>"]
    assert tokenizer.encode("<|zh|>") == [lang]
    for text in ("<|endofprompt|>", "[breath]", "<strong>", "<laughter>", "<|im_start|>"):
        ids = tokenizer.encode(text)
        assert len(ids) > 1 and all(i < tokenizer.eot for i in ids), text
        assert tokenizer.decode(ids) == text


def test_decode_leaves_out_timestamps(tokenizer):
    ids = tokenizer.encode("a<|0.00|>b<|1.00|>")
    assert tokenizer.decode(ids) == "ab"


def test_bad_vocabulary_file(tmp_path):
    with pytest.raises(ModelDirError, match="cannot read"):
        WhisperTextTokenizer(tmp_path / "missing.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-a-rank-line\n")
    with pytest.raises(ModelDirError, match="line 2"):
        WhisperTextTokenizer(bad)


def test_text_without_specials_takes_the_plain_path_with_the_same_ids(tokenizer, monkeypatch):
    """encode with allowed_special="all" costs ~0.2 ms a call (seconds to split a long v1
    text): text without "<|" (every whisper special starts so) takes encode_ordinary."""
    corpus = [json.loads(line)["text"] for line in CORPUS.read_text("utf-8").splitlines() if line]
    plain = [t for t in [g["text"] for g in _goldens()] + corpus if "<|" not in t]
    assert len(plain) > 400
    slow = [tokenizer.encoding.encode(t, allowed_special="all") for t in plain]

    def refused(*args, **kwargs):
        raise AssertionError("the special-token path for text without '<|'")

    monkeypatch.setattr(tokenizer.encoding, "encode", refused)
    assert [tokenizer.encode(t) for t in plain] == slow
