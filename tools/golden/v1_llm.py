"""Golden data for the v1 LLM (TransformerLM with its Conformer text encoder and Transformer LLM).

Runs the OFFICIAL CosyVoice code on tiny, randomly initialised modules and writes their
state_dicts, inputs and outputs to tests/data/golden/v1_llm/. Run it in the reference
environment, e.g.

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \\
        /tmp/refenv/bin/python tools/golden/v1_llm.py

Files written:
  llm_state.pt       TransformerLM state_dict (official keys, float32)
  encoder_state.pt   a stand-alone full-context ConformerEncoder (static_chunk_size 0) state_dict
  cases.npz          per case `<case>.<name>`: inputs text/prompt_text/prompt_speech_token/
                     embedding, `forced` speech tokens and `forced_logp` (official decode-loop
                     log-probs for them), `tokens_seed<s>` (official inference + ras_sampling after
                     torch.manual_seed(s)),
                     `tokens_seed0_maxratio3` (same with max_token_text_ratio=3)
  encoder.npz        padded batch `xs`, `xs_lens`, official `out` and `mask`
  config.json        constructor kwargs of every module
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from cosyvoice.llm.llm import TransformerLM
from cosyvoice.transformer.encoder import ConformerEncoder, TransformerEncoder
from cosyvoice.utils.common import ras_sampling

OUT_DIR = Path(__file__).resolve().parents[2] / "tests" / "data" / "golden" / "v1_llm"

TEXT_ENCODER = {
    "input_size": 16,
    "output_size": 32,
    "attention_heads": 4,
    "linear_units": 128,
    "num_blocks": 2,
    "dropout_rate": 0.1,
    "positional_dropout_rate": 0.1,
    "attention_dropout_rate": 0.0,
    "normalize_before": True,
    "input_layer": "linear",
    "pos_enc_layer_type": "rel_pos_espnet",
    "selfattention_layer_type": "rel_selfattn",
    "use_cnn_module": False,
    "macaron_style": False,
    "use_dynamic_chunk": False,
    "use_dynamic_left_chunk": False,
    "static_chunk_size": 1,
}
LLM_ENCODER = {
    "input_size": 64,
    "output_size": 64,
    "attention_heads": 4,
    "linear_units": 128,
    "num_blocks": 2,
    "dropout_rate": 0.1,
    "positional_dropout_rate": 0.1,
    "attention_dropout_rate": 0.0,
    "input_layer": "linear_legacy",
    "pos_enc_layer_type": "rel_pos_espnet",
    "selfattention_layer_type": "rel_selfattn",
    "static_chunk_size": 1,
}
LM = {
    "text_encoder_input_size": 16,
    "llm_input_size": 64,
    "llm_output_size": 64,
    "text_token_size": 51866,
    "speech_token_size": 4096,
    "length_normalized_loss": True,
    "lsm_weight": 0,
    "spk_embed_dim": 192,
}
SAMPLING = {"top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1}
FULL_CONTEXT_ENCODER = {
    "input_size": 16,
    "output_size": 32,
    "attention_heads": 4,
    "linear_units": 64,
    "num_blocks": 2,
    "dropout_rate": 0.1,
    "positional_dropout_rate": 0.1,
    "attention_dropout_rate": 0.1,
    "normalize_before": True,
    "input_layer": "linear",
    "pos_enc_layer_type": "rel_pos_espnet",
    "selfattention_layer_type": "rel_selfattn",
    "use_cnn_module": False,
    "macaron_style": False,
}
SEEDS = (0, 1)
N_FORCED = 8


def randomize(module: torch.nn.Module) -> None:
    """Give LayerNorms and biases non-trivial values so that every parameter matters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if isinstance(_owner(module, name), torch.nn.LayerNorm):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))


def _owner(module: torch.nn.Module, name: str) -> torch.nn.Module:
    return module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module


def build_lm() -> TransformerLM:
    torch.manual_seed(1986)
    model = TransformerLM(
        **LM,
        text_encoder=ConformerEncoder(**TEXT_ENCODER),
        llm=TransformerEncoder(**LLM_ENCODER),
        sampling=partial(ras_sampling, **SAMPLING),
    )
    randomize(model)
    with torch.no_grad():
        # Peaky next-token distributions, so that nucleus sampling keeps few tokens and RAS
        # (repetition fallback) triggers; an EOS bias so some runs stop before max_len.
        model.llm_decoder.weight.mul_(12.0)
        model.llm_decoder.bias[LM["speech_token_size"]] += 17.0
    return model.eval()


def make_cases() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    text = torch.randint(0, LM["text_token_size"], (1, 5), generator=g)
    prompt_text = torch.randint(0, LM["text_token_size"], (1, 4), generator=g)
    prompt_speech = torch.randint(0, LM["speech_token_size"], (1, 6), generator=g)
    embedding = torch.randn(1, 192, generator=g)
    no_tokens = torch.zeros(1, 0, dtype=torch.int64)
    no_embedding = torch.zeros(0, 192)
    return {
        "full": dict(
            text=text,
            prompt_text=prompt_text,
            prompt_speech_token=prompt_speech,
            embedding=embedding,
        ),
        "speaker_only": dict(
            text=text, prompt_text=no_tokens, prompt_speech_token=no_tokens, embedding=embedding
        ),
        "prompt_only": dict(
            text=text,
            prompt_text=prompt_text,
            prompt_speech_token=prompt_speech,
            embedding=no_embedding,
        ),
        "bare": dict(
            text=text, prompt_text=no_tokens, prompt_speech_token=no_tokens, embedding=no_embedding
        ),
    }


def official_inference(model: TransformerLM, case: dict[str, torch.Tensor], **kwargs) -> list[int]:
    def length(t: torch.Tensor) -> torch.Tensor:
        return torch.tensor([t.shape[1]], dtype=torch.int32)

    return list(
        model.inference(
            text=case["text"],
            text_len=length(case["text"]),
            prompt_text=case["prompt_text"],
            prompt_text_len=length(case["prompt_text"]),
            prompt_speech_token=case["prompt_speech_token"],
            prompt_speech_token_len=length(case["prompt_speech_token"]),
            embedding=case["embedding"],
            **kwargs,
        )
    )


def forced_log_probs(
    model: TransformerLM, case: dict[str, torch.Tensor], forced: list[int]
) -> np.ndarray:
    """Run official `inference` with a recording sampler that replays `forced`.

    min_token_text_ratio=0 keeps EOS unmasked, so the recorded scores are the raw log-softmax.
    """
    recorded: list[torch.Tensor] = []

    def replay(scores: torch.Tensor, decoded: list[int], sampling: int) -> int:
        recorded.append(scores.clone())
        return forced[len(decoded)] if len(decoded) < len(forced) else LM["speech_token_size"]

    original = model.sampling
    model.sampling = replay
    try:
        out = official_inference(model, case, min_token_text_ratio=0, max_token_text_ratio=20)
    finally:
        model.sampling = original
    assert out == forced, (out, forced)
    return torch.stack(recorded[: len(forced)]).numpy().astype(np.float32)


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    model = build_lm()
    torch.save(model.state_dict(), OUT_DIR / "llm_state.pt")

    arrays: dict[str, np.ndarray] = {}
    g = torch.Generator().manual_seed(11)
    forced = torch.randint(0, LM["speech_token_size"], (N_FORCED,), generator=g).tolist()
    for name, case in make_cases().items():
        for key, value in case.items():
            arrays[f"{name}.{key}"] = value.numpy()
        arrays[f"{name}.forced"] = np.array(forced, dtype=np.int64)
        arrays[f"{name}.forced_logp"] = forced_log_probs(model, case, forced)
        for seed in SEEDS:
            torch.manual_seed(seed)
            tokens = official_inference(model, case)
            arrays[f"{name}.tokens_seed{seed}"] = np.array(tokens, dtype=np.int64)
            print(f"{name} seed {seed}: {len(tokens)} tokens", tokens[:12])
        # A run cut by max_len (5 text tokens * 3 = 15) instead of by EOS.
        torch.manual_seed(0)
        tokens = official_inference(model, case, max_token_text_ratio=3)
        arrays[f"{name}.tokens_seed0_maxratio3"] = np.array(tokens, dtype=np.int64)
    np.savez_compressed(OUT_DIR / "cases.npz", **arrays)

    torch.manual_seed(3)
    encoder = ConformerEncoder(**FULL_CONTEXT_ENCODER)
    randomize(encoder)
    encoder.eval()
    torch.save(encoder.state_dict(), OUT_DIR / "encoder_state.pt")
    xs = torch.randn(2, 9, FULL_CONTEXT_ENCODER["input_size"])
    xs_lens = torch.tensor([9, 6], dtype=torch.int32)
    with torch.inference_mode():
        out, mask = encoder(xs, xs_lens)
    np.savez_compressed(
        OUT_DIR / "encoder.npz",
        xs=xs.numpy(),
        xs_lens=xs_lens.numpy(),
        out=out.numpy(),
        mask=mask.numpy(),
    )

    config = {
        "text_encoder": TEXT_ENCODER,
        "llm_encoder": LLM_ENCODER,
        "lm": LM,
        "sampling": SAMPLING,
        "full_context_encoder": FULL_CONTEXT_ENCODER,
        "seeds": list(SEEDS),
    }
    (OUT_DIR / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in sorted(OUT_DIR.iterdir()):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
