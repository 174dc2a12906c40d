"""Qwen2 BPE text tokenizer of CosyVoice2/3, built with the `tokenizers` library only.

Reproduces what the official `CosyVoice2Tokenizer` / `CosyVoice3Tokenizer`
(`cosyvoice/tokenizer/tokenizer.py`) get from `transformers.AutoTokenizer` on
`CosyVoice-BlankEN` (vocab.json + merges.txt, no tokenizer.json): transformers' slow-to-fast
`Qwen2Converter` pipeline (NFC normalizer, the Qwen pre-tokenizer regex split "isolated", byte-level
BPE without prefix space, byte-level decoder), the added tokens of `tokenizer_config.json`
(`<|endoftext|> <|im_start|> <|im_end|>` = 151643..151645 in Qwen2) and then the official
`add_special_tokens` list, in its order, so new ids follow the base vocabulary:
`<|endofprompt|>` = 151646, `[breath]` = 151647, ... (v2 ends at `[mn]` = 151662; v3 continues with
`<|endofsystem|>` = 151663, 84 CMU phones and 176 pinyin initials/finals up to 151923).
Special tokens are matched in the raw text before normalization and are never split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from cosyvoice_lite.errors import ModelDirError

__all__ = ["QwenTextTokenizer", "V2_SPECIAL_TOKENS", "V3_SPECIAL_TOKENS"]

# transformers' Qwen2Converter pre-tokenizer pattern.
_QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Official `CosyVoice2Tokenizer` special tokens: eos/pad first, then additional_special_tokens.
V2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endofprompt|>",
    "[breath]",
    "<strong>",
    "</strong>",
    "[noise]",
    "[laughter]",
    "[cough]",
    "[clucking]",
    "[accent]",
    "[quick_breath]",
    "<laughter>",
    "</laughter>",
    "[hissing]",
    "[sigh]",
    "[vocalized-noise]",
    "[lipsmack]",
    "[mn]",
)

# ARPAbet: 15 vowels with bare/0/1/2 stress variants and 24 consonants, in the official order.
_CMU_PHONES = (  # noqa: SIM905 (a word list reads better than 84 quoted items)
    "AA AA0 AA1 AA2 AE AE0 AE1 AE2 AH AH0 AH1 AH2 AO AO0 AO1 AO2 AW AW0 AW1 AW2 AY AY0 AY1 AY2 "
    "B CH D DH EH EH0 EH1 EH2 ER ER0 ER1 ER2 EY EY0 EY1 EY2 F G HH IH IH0 IH1 IH2 IY IY0 IY1 IY2 "
    "JH K L M N NG OW OW0 OW1 OW2 OY OY0 OY1 OY2 P R S SH T TH UH UH0 UH1 UH2 UW UW0 UW1 UW2 "
    "V W Y Z ZH"
).split()

# Pinyin initials and finals with tone marks, in the official order.
_PINYIN = (  # noqa: SIM905
    "a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié "
    "iòng ióng iù iú iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s "
    "sh t u uang ue un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī "
    "uō uǎ uǎi uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào á ái án áng áo è èi èn èng èr é éi én éng "
    "ér ì ìn ìng í ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn "
    "īng ō ōng ōu ū ūn ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ"
).split()

# Official `CosyVoice3Tokenizer`: the v2 list, <|endofsystem|>, CMU phones, pinyin.
V3_SPECIAL_TOKENS: tuple[str, ...] = (
    V2_SPECIAL_TOKENS
    + ("<|endofsystem|>",)
    + tuple(f"[{p}]" for p in _CMU_PHONES)
    + tuple(f"[{p}]" for p in _PINYIN)
)

_VERSIONS = {
    "v2": V2_SPECIAL_TOKENS,
    "cosyvoice2": V2_SPECIAL_TOKENS,
    "v3": V3_SPECIAL_TOKENS,
    "cosyvoice3": V3_SPECIAL_TOKENS,
}
TOKENIZER_VERSIONS = tuple(_VERSIONS)  # the yaml's get_qwen_tokenizer(version=...) values


def _config_added_tokens(config: dict) -> list[tuple[int, AddedToken]]:
    """`added_tokens_decoder` of tokenizer_config.json as (id, AddedToken), sorted by id."""
    tokens = []
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        tokens.append(
            (
                int(key),
                AddedToken(
                    entry["content"],
                    single_word=entry.get("single_word", False),
                    lstrip=entry.get("lstrip", False),
                    rstrip=entry.get("rstrip", False),
                    normalized=entry.get("normalized", True),
                    special=entry.get("special", False),
                ),
            )
        )
    return sorted(tokens, key=lambda t: t[0])


class QwenTextTokenizer:
    """Text <-> token ids for CosyVoice2 (`version="v2"`) or CosyVoice3 (`version="v3"`).

    `blank_en_dir` is `<model_dir>/CosyVoice-BlankEN` (vocab.json, merges.txt,
    tokenizer_config.json). `encode` adds no BOS/EOS, like the official `tokenizer([text])`;
    `decode` drops special tokens (the official `skip_special_tokens=True`).
    """

    def __init__(self, blank_en_dir: str | os.PathLike[str], version: str) -> None:
        if version not in _VERSIONS:
            raise ValueError(f"version must be one of {sorted(_VERSIONS)}, not {version!r}")
        self.version = version
        blank_en_dir = Path(blank_en_dir)
        vocab, merges = blank_en_dir / "vocab.json", blank_en_dir / "merges.txt"
        config_path = blank_en_dir / "tokenizer_config.json"
        for path in (vocab, merges, config_path):
            if not path.is_file():
                raise ModelDirError(f"missing tokenizer file {path}")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            model = BPE.from_file(
                str(vocab),
                str(merges),
                dropout=None,
                unk_token=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
                byte_fallback=False,
            )
            added = _config_added_tokens(config)
        except Exception as e:  # unreadable json / BPE files
            raise ModelDirError(f"cannot build the Qwen2 tokenizer from {blank_en_dir}: {e}") from e

        tokenizer = Tokenizer(model)
        n_regular = tokenizer.get_vocab_size(with_added_tokens=False)
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(
                    add_prefix_space=bool(config.get("add_prefix_space", False)), use_regex=False
                ),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        # ByteLevel post-processing only touches offsets, which are not used here.

        # Added tokens take the next free ids in order, so the config's ids must come out as stated.
        for token_id, token in added:
            tokenizer.add_tokens([token])
            if tokenizer.token_to_id(token.content) != token_id:
                raise ModelDirError(
                    f"{config_path}: added token {token.content!r} should have id {token_id}, but "
                    f"{vocab} has {n_regular} entries (the added tokens follow the regular ids)"
                )
        tokenizer.add_special_tokens(
            [
                AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=True)
                for t in _VERSIONS[version]
            ]
        )
        self._tokenizer = tokenizer
        self.special_tokens: frozenset[str] = frozenset(
            [t.content for _, t in added] + list(_VERSIONS[version])
        )

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)
