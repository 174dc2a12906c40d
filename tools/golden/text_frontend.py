"""Write the official text-frontend outputs for tests/data/text_corpus.jsonl.

Runs the unmodified official ``CosyVoiceFrontEnd.text_normalize`` (cosyvoice/cli/frontend.py) in the
reference environment.  The frontend object is built without model files: only the attributes that
``text_normalize`` reads are set (whisper tokenizer, ``allowed_special``, inflect engine, the two wetext
normalizers), exactly as ``CosyVoiceFrontEnd.__init__`` sets them on the wetext path.

wetext 0.0.4 (the version upstream pins) downloads its FSTs with
``modelscope.snapshot_download("pengzhendong/wetext")`` on construction.  This script never downloads:
``--wetext-fsts`` names a local copy of that repository (layout ``{zh,en}/tn/{tagger,verbalizer}.fst``).
Two FST sets matter:

* the current one: what a fresh install of the official code fetches today (modelscope master); the
  current wetext wheel bundles the same files, e.g. ``.venv/.../site-packages/wetext/fsts``;
* the 2025 one: what 0.0.4 fetched while it was current, bundled unchanged in wetext 0.0.5-0.1.0
  (``pip download --no-deps wetext==0.1.0`` and unzip).

Usage (reference environment)::

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \\
    /tmp/refenv/bin/python tools/golden/text_frontend.py \\
        --wetext-fsts .venv/lib/python3.11/site-packages/wetext/fsts \\
        --out tests/data/golden/text/official.jsonl

Each output line: ``{"id", "text", "segments", "joined"}`` where ``segments`` is
``text_normalize(text, split=True)`` and ``joined`` is ``text_normalize(text, split=False)``; when the
official code raises, the line carries ``"error": "<ExceptionClass>"`` instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_official_frontend(fst_dir: str):
    import inflect
    import wetext.wetext
    import whisper.tokenizer
    from cosyvoice.cli.frontend import CosyVoiceFrontEnd

    # wetext 0.0.4 calls snapshot_download("pengzhendong/wetext") and reads FSTs below the returned dir.
    wetext.wetext.snapshot_download = lambda *args, **kwargs: fst_dir
    from wetext import Normalizer

    frontend = CosyVoiceFrontEnd.__new__(CosyVoiceFrontEnd)
    # CosyVoice-300M yaml: get_tokenizer = whisper.tokenizer.get_tokenizer(multilingual=True,
    # num_languages=100, language='en', task='transcribe'), allowed_special = 'all'.
    frontend.tokenizer = whisper.tokenizer.get_tokenizer(
        multilingual=True, num_languages=100, language="en", task="transcribe"
    )
    frontend.allowed_special = "all"
    frontend.inflect_parser = inflect.engine()
    frontend.zh_tn_model = Normalizer(remove_erhua=False)
    frontend.en_tn_model = Normalizer()
    frontend.text_frontend = "wetext"
    return frontend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(REPO / "tests/data/text_corpus.jsonl"))
    parser.add_argument("--out", default=str(REPO / "tests/data/golden/text/official.jsonl"))
    parser.add_argument(
        "--wetext-fsts", required=True, help="local copy of the wetext FST repository"
    )
    args = parser.parse_args()

    frontend = build_official_frontend(str(Path(args.wetext_fsts).resolve()))
    with open(args.corpus, encoding="utf-8") as file:
        rows = [json.loads(line) for line in file if line.strip()]
    with open(args.out, "w", encoding="utf-8") as out:
        for row in rows:
            record = {"id": row["id"], "text": row["text"]}
            try:
                record["segments"] = frontend.text_normalize(row["text"], split=True)
                record["joined"] = frontend.text_normalize(row["text"], split=False)
            except Exception as error:  # the official code crashes on some inputs; record which
                record.pop("segments", None)
                record["error"] = type(error).__name__
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} records to {args.out}")


if __name__ == "__main__":
    main()
