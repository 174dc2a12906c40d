"""Text tokenizers.

v1 (CosyVoice-300M): openai-whisper's multilingual tokenizer, i.e. the official yaml's
``get_tokenizer(multilingual=True, num_languages=100, language='en', task='transcribe')`` encoding with
``allowed_special='all'``: the 50257 byte-level BPE ranks of ``multilingual.tiktoken`` followed by
whisper's 1609 special tokens (51866 ids).  Special strings such as ``<|zh|>`` become single ids;
``<|endofprompt|>``, ``[breath]`` or ``<strong>`` are not whisper specials and are plain BPE text.

The vocabulary file is not shipped with this package: callers pass its path (``cosyvoice_lite.hub``
downloads it).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cosyvoice_lite.errors import ModelDirError

# sha256 of whisper/assets/multilingual.tiktoken (as shipped in openai-whisper 20250625).
WHISPER_MULTILINGUAL_SHA256 = "b34b360dbb493e781e479794586d661700670d65564001f23024971d1f2fa126"
WHISPER_MULTILINGUAL_RANKS = 50257

# whisper.tokenizer.LANGUAGES, in order; the first ``num_languages`` get a <|xx|> token.
WHISPER_LANGUAGES = (  # noqa: SIM905 (one line of codes reads better than 100 list items)
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur "
    "hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si "
    "km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha "
    "ba jw su yue"
).split()

# whisper's pre-tokenisation regex (whisper/tokenizer.py get_encoding).
WHISPER_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def whisper_special_tokens(num_languages: int = 100) -> list[str]:
    """whisper's special tokens in id order (they follow the BPE ranks)."""
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{lang}|>" for lang in WHISPER_LANGUAGES[:num_languages]],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *[f"<|{i * 0.02:.2f}|>" for i in range(1501)],
    ]


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file: one ``base64(token) rank`` pair per line."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as error:
        raise ModelDirError(f"cannot read tokenizer vocabulary {path}: {error}") from error
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as error:
            raise ModelDirError(f"{path} line {number} is not a tiktoken rank line") from error
    return ranks


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class WhisperTextTokenizer:
    """The v1 text tokenizer: ``encode`` equals whisper's ``encode(text, allowed_special='all')``."""

    def __init__(self, vocab_path: str | Path, num_languages: int = 100) -> None:
        import tiktoken

        ranks = read_tiktoken_ranks(vocab_path)
        specials = whisper_special_tokens(num_languages)
        self.special_tokens = {token: len(ranks) + i for i, token in enumerate(specials)}
        self.encoding = tiktoken.Encoding(
            name=Path(vocab_path).name,
            explicit_n_vocab=len(ranks) + len(specials),
            pat_str=WHISPER_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.eot = self.special_tokens["<|endoftext|>"]
        self.timestamp_begin = self.special_tokens["<|0.00|>"]

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        # every whisper special starts with "<|": text without one takes tiktoken's plain path,
        # the same ids (allowed_special="all" costs ~0.2 ms a call: seconds to split a long text)
        if "<|" not in text:
            return self.encoding.encode_ordinary(text)
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, token_ids: list[int]) -> str:
        """Text of ``token_ids``; timestamp tokens are left out, as whisper's ``decode``."""
        return self.encoding.decode([t for t in token_ids if t < self.timestamp_begin])
