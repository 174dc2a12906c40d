"""Golden data for the CosyVoice2/3 LLMs (Qwen2LM, CosyVoice3LM) and their Qwen2 tokenizers.

Run in the reference environment (official CosyVoice on PYTHONPATH, transformers 4.51.3), e.g.

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \
        /tmp/refenv/bin/python tools/golden/v2v3_llm.py

Writes
* tests/data/CosyVoice-BlankEN-tiny/: a CosyVoice-BlankEN-format directory (config.json,
  tokenizer_config.json, vocab.json, merges.txt; no weights) with a tiny Qwen2 body (hidden 16,
  2 layers, 4 heads, 2 KV heads) and a toy byte-level BPE trained here. vocab.json is padded to
  exactly 151643 regular entries so that <|endoftext|> <|im_start|> <|im_end|> get 151643..151645 and
  the official added special tokens the same ids as with the real Qwen2 vocabulary (151646..);
* tests/data/golden/v2v3_llm/{v2,v3}_llm.pt: official Qwen2LM / CosyVoice3LM state dicts (llm.pt
  layout); embedding rows of ids the toy vocabulary never produces are zero so the files compress;
* tests/data/golden/v2v3_llm/tokenizer.json: ids and decodes from the official tokenizer classes;
* tests/data/golden/v2v3_llm/{v2,v3}_llm.npz: teacher-forced hidden states and logits, seeded
  generation (tokens + first log-prob vectors) and bistream tokens.

Random weights are shaped (see `shape_weights`) so that decoding is neither flat nor stuck: sharper
logits make top-p and the repetition fallback matter, and eos becomes reachable for both versions.
"""

from __future__ import annotations

import json
import logging
import tempfile
from functools import partial
from pathlib import Path

import cosyvoice.utils.common as common
import numpy as np
import torch
from cosyvoice.llm.llm import CosyVoice3LM, Qwen2Encoder, Qwen2LM
from cosyvoice.tokenizer.tokenizer import CosyVoice2Tokenizer, CosyVoice3Tokenizer
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
BLANK_EN = ROOT / "tests" / "data" / "CosyVoice-BlankEN-tiny"
OUT = ROOT / "tests" / "data" / "golden" / "v2v3_llm"

N_REGULAR = 151643  # regular BPE entries of the Qwen2 vocabulary; <|endoftext|> is 151643
SPEECH_TOKEN_SIZE = 6561
HIDDEN = 16
BISTREAM_SEEDS = (0, 1, 2, 3)

QWEN_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": HIDDEN,
    "initializer_range": 0.02,
    "intermediate_size": 48,
    "max_position_embeddings": 32768,
    "max_window_layers": 2,
    "model_type": "qwen2",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "transformers_version": "4.51.3",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Qwen2's tokenizer_config.json layout (three added tokens at 151643..151645), chat template omitted.
_ADDED = {
    "lstrip": False,
    "normalized": False,
    "rstrip": False,
    "single_word": False,
    "special": True,
}
TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "added_tokens_decoder": {
        "151643": {"content": "<|endoftext|>", **_ADDED},
        "151644": {"content": "<|im_start|>", **_ADDED},
        "151645": {"content": "<|im_end|>", **_ADDED},
    },
    "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    "bos_token": None,
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 32768,
    "pad_token": "<|endoftext|>",
    "split_special_tokens": False,
    "tokenizer_class": "Qwen2Tokenizer",
    "unk_token": None,
}

QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CORPUS = [
    "Hello, this is a small test of the speech synthesis system. How are you doing today?",
    "The quick brown fox jumps over the lazy dog; it's what they'll say, isn't it?",
    "You are a helpful assistant. Please speak happily and slowly.",
    "CosyVoice speaks English, Chinese, Japanese, Korean and many Chinese dialects.",
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。",
    "希望你以后能够做的比我还好呦。用四川话说这句话。今天天气真不错，我们去公园散步吧。",
    "八百标兵奔北坡，北坡炮兵并排跑。他的报道让人记忆犹新。",
    "こんにちは、今日はいい天気ですね。カタカナでかいてください。",
    "안녕하세요, 만나서 반갑습니다.",
    "In 2024 there were 365 days, 12 months and 7,000 reasons to smile: 3.14159!",
    "Line one\nLine two\r\n\tTabbed    spaces   and more...",
    "I'm sure we've seen it; you'd think they're right. DON'T SHOUT.",
]


# -- tiny BlankEN directory ---------------------------------------------------------------------


def train_toy_bpe(workdir: Path) -> tuple[dict[str, int], Path]:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    tok.model.save(str(workdir))
    vocab = json.loads((workdir / "vocab.json").read_text(encoding="utf-8"))
    return vocab, workdir / "merges.txt"


def pad_vocab(vocab: dict[str, int]) -> dict[str, int]:
    """Fill ids len(vocab)..151642 with unreachable entries ('Ā' is byte 0x00, never in the text)."""
    assert sorted(vocab.values()) == list(range(len(vocab)))
    digits = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    padded = dict(vocab)
    i = 0
    while len(padded) < N_REGULAR:
        n, code = i, ""
        for _ in range(3):
            n, r = divmod(n, len(digits))
            code += digits[r]
        padded["Ā" + code] = len(padded)
        i += 1
    return padded


def write_blank_en() -> int:
    BLANK_EN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = train_toy_bpe(Path(tmp))
        (BLANK_EN / "merges.txt").write_text(merges.read_text(encoding="utf-8"), encoding="utf-8")
    (BLANK_EN / "vocab.json").write_text(
        json.dumps(pad_vocab(vocab), ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )
    (BLANK_EN / "config.json").write_text(json.dumps(QWEN_CONFIG, indent=2) + "\n")
    (BLANK_EN / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    return len(vocab)


# -- tokenizer goldens --------------------------------------------------------------------------

TOKENIZER_STRINGS = [
    "Hello, this is a small test.",
    "收到好友从远方寄来的生日礼物。",
    "You are a helpful assistant.<|endofprompt|>希望你以后能够做的比我还好呦。",
    "在他讲述那个荒诞故事的过程中，他突然[laughter]停下来，因为他自己也被逗笑了[laughter]。",
    "追求卓越不是终点，它需要你每天都<strong>付出</strong>和精进，最终才能达到巅峰。",
    "[breath]因为他们那一辈人[breath]在乡里面住的要习惯一点，[breath]邻居都很活络。",
    "他的报道[h][ào]让人[j][ǐ]予厚望, I [M][AY0] be right [AY1][AE2].",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|endofsystem|>[mn][lipsmack]",
    "In 2024 there were 365 days and 7,000 reasons: 3.14159!",
    "Line one\nLine two\r\n\tTabbed    spaces  ",
    "Café vs Cafe\u0301 (NFC), ｆｕｌｌｗｉｄｔｈ, emoji 😀, 안녕하세요, カタカナ.",
    "[a][ai][xyz][ǜ][ZH][zh]<laughter>ha</laughter>[quick_breath][vocalized-noise]",
    "",
    " leading and trailing spaces ",
]


def tokenizer_goldens() -> dict:
    result = {"strings": TOKENIZER_STRINGS}
    for name, cls in (("v2", CosyVoice2Tokenizer), ("v3", CosyVoice3Tokenizer)):
        tok = cls(str(BLANK_EN), skip_special_tokens=True)
        ids = [tok.encode(s) for s in TOKENIZER_STRINGS]
        result[name] = {
            "ids": ids,
            "decoded": [tok.decode(i) for i in ids],
            "vocab_size": len(tok.tokenizer),
            "special_ids": {
                t: tok.tokenizer.convert_tokens_to_ids(t)
                for t in [tok.special_tokens["eos_token"]]
                + tok.special_tokens["additional_special_tokens"]
            },
        }
    return result


# -- LLM goldens --------------------------------------------------------------------------------


def build_encoder(tmp: Path) -> Qwen2Encoder:
    """The official Qwen2Encoder loads weights with from_pretrained; give it throwaway ones."""
    work = tmp / "blank_en_with_weights"
    Qwen2ForCausalLM(Qwen2Config(**QWEN_CONFIG)).save_pretrained(work)
    return Qwen2Encoder(str(work))


def shape_weights(lm: torch.nn.Module, version: str, n_used_text_ids: int) -> None:
    g = torch.Generator().manual_seed(2024 if version == "v2" else 2025)
    with torch.no_grad():
        body = lm.llm.model.model
        for name, p in body.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        # Sharper attention so that positions and the cache visibly matter.
        for layer in body.layers:
            layer.self_attn.q_proj.weight.mul_(2.0)
            layer.self_attn.k_proj.weight.mul_(2.0)
        emb = body.embed_tokens.weight
        emb[n_used_text_ids:151643] = 0.0  # never produced by the toy vocabulary
        emb[151924:] = 0.0
        speech = lm.speech_embedding.weight
        speech.copy_(torch.randn(speech.shape, generator=g))
        # A constant offset in hidden channel 0 of every input keeps that channel positive through
        # the (shallow) body, so decoder rows that read channel 0 give stable logits (for eos).
        emb[:n_used_text_ids, 0] += 4.0
        emb[151643:151924, 0] += 4.0
        speech[:, 0] += 4.0
        if version == "v2":
            lm.llm_embedding.weight[:, 0] += 4.0
        dec = lm.llm_decoder.weight
        dec.mul_(10.0)  # logits spread of a few nats: top-p and repetition both matter
        dec[SPEECH_TOKEN_SIZE:] = 0.0  # stop/fill ids: logit 0, far below the speech tokens
        dec[:SPEECH_TOKEN_SIZE, 0] = 0.0
        if version == "v2":
            lm.llm_decoder.bias.zero_()
            lm.llm_decoder.bias[SPEECH_TOKEN_SIZE] = 13.0  # eos: a few % per step
        else:
            dec[SPEECH_TOKEN_SIZE + 1, 0] = 3.5  # eos: well under 1 % per step
            dec[SPEECH_TOKEN_SIZE, 0] = 3.0  # sos: the index v3 masks as "eos" while i < min_len


class Recorder:
    """Official ras_sampling, remembering the first log-prob vectors it is given."""

    def __init__(self, keep: int = 3) -> None:
        self.keep, self.scores = keep, []

    def __call__(self, scores, decoded, sampling):
        if len(self.scores) < self.keep:
            self.scores.append(scores.detach().clone())
        return common.ras_sampling(
            scores, decoded, sampling, top_p=0.8, top_k=25, win_size=10, tau_r=0.1
        )


def ids_tensor(ids) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.int32)


def run_generate(lm, text, prompt_text, prompt_speech, seed) -> tuple[list[int], np.ndarray, int]:
    recorder = Recorder()
    lm.sampling = recorder
    fallbacks = []
    original = common.random_sampling
    common.random_sampling = lambda *a: fallbacks.append(1) or original(*a)
    try:
        torch.manual_seed(seed)
        tokens = list(
            lm.inference(
                text=ids_tensor(text),
                text_len=torch.tensor([len(text)], dtype=torch.int32),
                prompt_text=ids_tensor(prompt_text),
                prompt_text_len=torch.tensor([len(prompt_text)], dtype=torch.int32),
                prompt_speech_token=ids_tensor(prompt_speech),
                prompt_speech_token_len=torch.tensor([len(prompt_speech)], dtype=torch.int32),
                embedding=torch.zeros(1, 192),
            )
        )
    finally:
        common.random_sampling = original
    return [int(t) for t in tokens], torch.stack(recorder.scores).numpy(), len(fallbacks)


def run_bistream(lm, pieces, prompt_text, prompt_speech, seed) -> tuple[list[int], str]:
    lm.sampling = partial(common.ras_sampling, top_p=0.8, top_k=25, win_size=10, tau_r=0.1)
    torch.manual_seed(seed)
    tokens: list[int] = []
    outcome = "eos"
    try:
        for t in lm.inference_bistream(
            text=(ids_tensor(p) for p in pieces),
            prompt_text=ids_tensor(prompt_text),
            prompt_text_len=torch.tensor([len(prompt_text)], dtype=torch.int32),
            prompt_speech_token=ids_tensor(prompt_speech),
            prompt_speech_token_len=torch.tensor([len(prompt_speech)], dtype=torch.int32),
            embedding=torch.zeros(1, 192),
        ):
            tokens.append(int(t))
            if len(tokens) > 2000:
                outcome = "runaway"
                break
    except ValueError as e:
        outcome = f"error: {e}"
    return tokens, outcome


def llm_goldens(lm, version: str, tok) -> dict[str, np.ndarray]:
    system = "You are a helpful assistant.<|endofprompt|>" if version == "v3" else ""
    prompt_text = tok.encode(system + "希望你以后能够做的比我还好呦。")
    text = tok.encode("收到好友从远方寄来的生日礼物，Hello!")
    g = torch.Generator().manual_seed(99)
    prompt_speech = torch.randint(0, SPEECH_TOKEN_SIZE, (20,), generator=g).tolist()
    target_speech = torch.randint(0, SPEECH_TOKEN_SIZE, (12,), generator=g).tolist()
    out: dict[str, np.ndarray] = {
        "text": np.array(text, dtype=np.int64),
        "prompt_text": np.array(prompt_text, dtype=np.int64),
        "prompt_speech": np.array(prompt_speech, dtype=np.int64),
        "target_speech": np.array(target_speech, dtype=np.int64),
    }

    # Teacher forcing: the official layout through the official Qwen2Encoder.forward.
    with torch.no_grad():
        all_text = torch.tensor([prompt_text + text])
        speech = torch.tensor([prompt_speech + target_speech])
        if version == "v3":
            sos = lm.speech_embedding.weight[lm.sos].reshape(1, 1, -1)
            task = lm.speech_embedding.weight[lm.task_id].reshape(1, 1, -1)
        else:
            sos = lm.llm_embedding.weight[lm.sos].reshape(1, 1, -1)
            task = lm.llm_embedding.weight[lm.task_id].reshape(1, 1, -1)
        lm_input = torch.cat(
            [sos, lm.llm.model.model.embed_tokens(all_text), task, lm.speech_embedding(speech)],
            dim=1,
        )
        hidden, _ = lm.llm(lm_input, torch.tensor([lm_input.shape[1]]))
        logits = lm.llm_decoder(hidden)[0]
    cols = np.unique(
        np.concatenate(
            [np.arange(0, logits.shape[1], 11), np.arange(SPEECH_TOKEN_SIZE, logits.shape[1])]
        )
    )
    out["tf_hidden"] = hidden[0].numpy()
    out["tf_logit_cols"] = cols
    out["tf_logits"] = logits[:, cols].numpy()

    # Seeded generation, zero-shot style and without any prompt.
    cases = {"zs": (text, prompt_text, prompt_speech), "noprompt": (text, [], [])}
    if version == "v3":
        cases["noprompt"] = (
            tok.encode("You are a helpful assistant.<|endofprompt|>") + text,
            [],
            [],
        )
    for case, (t, pt, ps) in cases.items():
        for seed in (0, 1):
            tokens, scores, n_fallback = run_generate(lm, t, pt, ps, seed)
            key = f"gen_{case}_seed{seed}"
            out[key + "_tokens"] = np.array(tokens, dtype=np.int64)
            out[key + "_logp"] = scores.astype(np.float32)
            print(
                f"{version} {key}: {len(tokens)} tokens (min {2 * len(t)}, max {20 * len(t)}), "
                f"{n_fallback} RAS fallbacks"
            )
        if case == "noprompt":
            out["noprompt_text"] = np.array(t, dtype=np.int64)

    # Bistream: text arriving in pieces, with and without prompt speech.
    pieces_text = [
        "收到好友",
        "从远方寄来的",
        "生日礼物，",
        "那份意外的惊喜",
        "与深深的祝福",
        "让我心中充满了",
        "甜蜜的快乐。",
        " Hello, how are you",
        " today?",
    ]
    pieces = [tok.encode(p) for p in pieces_text]
    bistream_cases = {
        "bi_zs": (pieces, prompt_text, prompt_speech),
        "bi_short": (pieces[:2], prompt_text, prompt_speech),  # text ends before prompt speech
    }
    if version == "v2":
        bistream_cases["bi_noprompt"] = (pieces, [], [])
    else:
        bistream_cases["bi_noprompt"] = (
            pieces,
            tok.encode("You are a helpful assistant.<|endofprompt|>"),
            [],
        )
    flat = np.concatenate([np.array(p, dtype=np.int64) for p in pieces])
    out["bi_pieces_flat"] = flat
    out["bi_pieces_lens"] = np.array([len(p) for p in pieces], dtype=np.int64)
    for case, (ps_, pt, sp) in bistream_cases.items():
        for seed in BISTREAM_SEEDS:
            tokens, outcome = run_bistream(lm, ps_, pt, sp, seed)
            print(f"{version} {case} seed {seed}: {len(tokens)} tokens, {outcome}")
            key = f"{case}_seed{seed}"
            out[key + "_tokens"] = np.array(tokens, dtype=np.int64)
            out[key + "_outcome"] = np.array(outcome)
        out[case + "_prompt_text"] = np.array(pt, dtype=np.int64)
        out[case + "_prompt_speech"] = np.array(sp, dtype=np.int64)
        out[case + "_n_pieces"] = np.array(len(ps_), dtype=np.int64)
    return out


def main() -> None:
    logging.disable(logging.INFO)  # the official bistream logs every step
    n_vocab = write_blank_en()
    OUT.mkdir(parents=True, exist_ok=True)
    toks = tokenizer_goldens()
    (OUT / "tokenizer.json").write_text(
        json.dumps(toks, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    tokenizers_by_version = {
        "v2": CosyVoice2Tokenizer(str(BLANK_EN)),
        "v3": CosyVoice3Tokenizer(str(BLANK_EN)),
    }
    sampling = partial(common.ras_sampling, top_p=0.8, top_k=25, win_size=10, tau_r=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        for version, cls in (("v2", Qwen2LM), ("v3", CosyVoice3LM)):
            torch.manual_seed(0)
            lm = cls(
                llm_input_size=HIDDEN,
                llm_output_size=HIDDEN,
                speech_token_size=SPEECH_TOKEN_SIZE,
                llm=build_encoder(Path(tmp)),
                sampling=sampling,
                length_normalized_loss=True,
                lsm_weight=0,
                mix_ratio=[5, 15],
            ).eval()
            shape_weights(lm, version, n_vocab)
            torch.save(lm.state_dict(), OUT / f"{version}_llm.pt")
            data = llm_goldens(lm, version, tokenizers_by_version[version])
            np.savez(OUT / f"{version}_llm.npz", **data)
    print("wrote", OUT, "and", BLANK_EN)


if __name__ == "__main__":
    main()
