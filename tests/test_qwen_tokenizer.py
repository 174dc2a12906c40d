"""Qwen2 text tokenizer parity with the official CosyVoice2Tokenizer / CosyVoice3Tokenizer
(transformers 4.51.3 AutoTokenizer), on the toy CosyVoice-BlankEN-format directory made by
tools/golden/v2v3_llm.py (a small BPE padded to Qwen2's 151643 regular ids)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.frontend.qwen_tokenizer import (
    V2_SPECIAL_TOKENS,
    V3_SPECIAL_TOKENS,
    QwenTextTokenizer,
)

DATA = Path(__file__).parent / "data"
BLANK_EN = DATA / "CosyVoice-BlankEN-tiny"
GOLDEN = json.loads((DATA / "golden" / "v2v3_llm" / "tokenizer.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=["v2", "v3"])
def tok(request: pytest.FixtureRequest) -> tuple[str, QwenTextTokenizer]:
    return request.param, QwenTextTokenizer(BLANK_EN, request.param)


def test_encode_matches_official(tok) -> None:
    version, t = tok
    for text, ids in zip(GOLDEN["strings"], GOLDEN[version]["ids"], strict=True):
        assert t.encode(text) == ids, text


def test_decode_matches_official(tok) -> None:
    version, t = tok
    for ids, text in zip(GOLDEN[version]["ids"], GOLDEN[version]["decoded"], strict=True):
        assert t.decode(ids) == text


def test_special_token_ids_match_official(tok) -> None:
    version, t = tok
    assert len(t) == GOLDEN[version]["vocab_size"]
    for token, token_id in GOLDEN[version]["special_ids"].items():
        assert t.token_to_id(token) == token_id, token


def test_special_id_layout() -> None:
    v2, v3 = QwenTextTokenizer(BLANK_EN, "v2"), QwenTextTokenizer(BLANK_EN, "v3")
    for t in (v2, v3):
        assert [t.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
            151643,
            151644,
            151645,
        ]
        # Hard-coded by the official CosyVoice3LM.
        assert t.token_to_id("<|endofprompt|>") == 151646
        assert t.token_to_id("[breath]") == 151647
        assert t.token_to_id("[mn]") == 151662
    assert v3.token_to_id("<|endofsystem|>") == 151663
    assert v3.token_to_id("[ǜ]") == 151923
    assert v2.token_to_id("<|endofsystem|>") is None
    assert len(V2_SPECIAL_TOKENS) == 20 and len(V3_SPECIAL_TOKENS) == 281


def test_markup_is_one_token_only_where_the_model_knows_it() -> None:
    v2, v3 = QwenTextTokenizer(BLANK_EN, "v2"), QwenTextTokenizer(BLANK_EN, "v3")
    for markup in ("[breath]", "<strong>", "</strong>", "[laughter]", "<laughter>", "[mn]"):
        assert markup in v2.special_tokens and markup in v3.special_tokens
        assert len(v2.encode(markup)) == 1 and len(v3.encode(markup)) == 1
    for markup in ("[h]", "[ào]", "[M]", "[AY0]", "<|endofsystem|>"):
        assert markup not in v2.special_tokens and markup in v3.special_tokens
        assert len(v2.encode(markup)) > 1 and len(v3.encode(markup)) == 1
    assert v3.encode("[h][ào]") == [v3.token_to_id("[h]"), v3.token_to_id("[ào]")]


def test_missing_files_are_model_dir_errors(tmp_path: Path) -> None:
    shutil.copytree(BLANK_EN, tmp_path / "blank")
    (tmp_path / "blank" / "merges.txt").unlink()
    with pytest.raises(ModelDirError, match="merges.txt"):
        QwenTextTokenizer(tmp_path / "blank", "v2")


def test_vocab_size_mismatch_is_detected(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    shutil.copytree(BLANK_EN, blank)
    vocab = json.loads((blank / "vocab.json").read_text(encoding="utf-8"))
    vocab.pop(max(vocab, key=vocab.get))  # one regular id short: <|endoftext|> would move
    (blank / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ModelDirError, match="151643"):
        QwenTextTokenizer(blank, "v3")


def test_unknown_version() -> None:
    with pytest.raises(ValueError, match="version"):
        QwenTextTokenizer(BLANK_EN, "v1")
