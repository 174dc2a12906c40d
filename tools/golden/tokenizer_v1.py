"""Write whisper's v1 text-tokenizer outputs for the tokenizer tests.

Runs openai-whisper's ``get_tokenizer(multilingual=True, num_languages=100, language='en',
task='transcribe')`` (the CosyVoice-300M yaml) in the reference environment and records
``encode(text, allowed_special='all')`` for a list of mixed strings plus every text of
tests/data/text_corpus.jsonl, and the id of every special token.

Usage (reference environment)::

    /tmp/refenv/bin/python tools/golden/tokenizer_v1.py
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

EXTRA = [
    "Hello, world!",
    "<|zh|>你好，世界。",
    "<|en|>Hello<|ja|>こんにちは<|yue|>你食咗飯未呀<|ko|>안녕하세요",
    "You are a helpful assistant.<|endofprompt|>今天天气很好。",
    "追求卓越不是终点，它需要你每天都[breath]付出和精进。",
    "在面对挑战时，他展现了非凡的<strong>勇气</strong>与<strong>智慧</strong>。",
    "Well that's kind of scary <laughter>[laughter]</laughter>.",
    "<|endoftext|><|startoftranscript|><|en|><|transcribe|><|notimestamps|>",
    "<|0.00|>timestamps<|30.00|><|15.02|>",
    "<|translate|><|startoflm|><|startofprev|><|nospeech|>",
    "<|haw|><|jw|><|su|>",
    "<|xx|> is not a special token, nor is <|endofprompt|> or <|im_start|>",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 and flags 🇨🇳🇺🇸",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "",
    " ",
    "I'm sure they'll say we've done it; you'd agree?",
    "数字1234567890和小数3.14159",
    "ＡＢＣ１２３ full width",
    "\u200bzero width\u200d joiner",
]


def main() -> None:
    import whisper.tokenizer

    tokenizer = whisper.tokenizer.get_tokenizer(
        multilingual=True, num_languages=100, language="en", task="transcribe"
    )
    with open(REPO / "tests/data/text_corpus.jsonl", encoding="utf-8") as file:
        corpus = [json.loads(line)["text"] for line in file if line.strip()]
    out_dir = REPO / "tests/data/golden/text"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "whisper_tokens.jsonl", "w", encoding="utf-8") as out:
        for text in EXTRA + corpus:
            ids = tokenizer.encode(text, allowed_special="all")
            record = {"text": text, "ids": ids, "decoded": tokenizer.decode(ids)}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    specials = dict(sorted(tokenizer.special_tokens.items(), key=lambda item: item[1]))
    summary = {"n_vocab": tokenizer.encoding.n_vocab, "special_tokens": specials}
    with open(out_dir / "whisper_specials.json", "w", encoding="utf-8") as out:
        json.dump(summary, out, ensure_ascii=False, indent=0)
    print(
        f"wrote {len(EXTRA) + len(corpus)} encodings and {len(specials)} special ids to {out_dir}"
    )


if __name__ == "__main__":
    main()
