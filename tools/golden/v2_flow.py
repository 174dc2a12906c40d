"""Golden data for the v2 flow (UpsampleConformerEncoder + CausalMaskedDiffWithXvec), from the official code.

Run in the reference environment (official CosyVoice + Matcha-TTS on PYTHONPATH), e.g.

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \\
        /tmp/refenv/bin/python tools/golden/v2_flow.py

The official encoder hard-codes 512 channels for its look-ahead and upsampling layers, so even a
"tiny" flow has ~10 M parameters: too big to commit. Instead every parameter is set from a seeded
CPU generator (`seeded_state`, duplicated in tests/test_v2_flow.py); the test regenerates the same
weights and first checks them against the per-tensor checksums stored here.

Writes tests/data/golden/v2_flow/:
  weights.npz     `names` (sorted state_dict keys), `sums`, `abs_sums`, `firsts` per tensor
  encoder.npz     encoder inputs/outputs: full, streaming, padded batch, with look-ahead context
  inference.npz   flow.inference mel for prompt/no prompt x streaming/full x finalize/partial
  causality.npz   streaming partial mels of the official flow for growing token prefixes, and
                  the final mels of all 22 tokens with full and with chunk attention
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from cosyvoice.flow.decoder import CausalConditionalDecoder
from cosyvoice.flow.flow import CausalMaskedDiffWithXvec
from cosyvoice.flow.flow_matching import CausalConditionalCFM
from cosyvoice.transformer.upsample_encoder import UpsampleConformerEncoder
from omegaconf import DictConfig

OUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "golden" / "v2_flow"

# Keep in sync with tests/test_v2_flow.py.
ENCODER_KW = dict(
    input_size=512,
    output_size=512,
    attention_heads=4,
    linear_units=64,
    num_blocks=2,
    dropout_rate=0.1,
    positional_dropout_rate=0.1,
    attention_dropout_rate=0.1,
    normalize_before=True,
    input_layer="linear",
    pos_enc_layer_type="rel_pos_espnet",
    selfattention_layer_type="rel_selfattn",
    use_cnn_module=False,
    macaron_style=False,
    static_chunk_size=5,
)
ESTIMATOR_KW = dict(
    in_channels=320,
    out_channels=80,
    channels=[32],
    dropout=0.0,
    attention_head_dim=16,
    n_blocks=1,
    num_mid_blocks=1,
    num_heads=2,
    act_fn="gelu",
    static_chunk_size=10,
    num_decoding_left_chunks=-1,
)
CFM_PARAMS = dict(
    sigma_min=1e-06,
    solver="euler",
    t_scheduler="cosine",
    training_cfg_rate=0.2,
    inference_cfg_rate=0.7,
    reg_loss_type="l1",
)
FLOW_KW = dict(
    input_size=512,
    output_size=80,
    spk_embed_dim=192,
    output_type="mel",
    vocab_size=50,
    input_frame_rate=25,
    only_mask_loss=True,
    token_mel_ratio=2,
    pre_lookahead_len=3,
)
WEIGHT_SEED = 2024


def seeded_state(shapes: dict[str, torch.Size], seed: int = WEIGHT_SEED) -> dict[str, torch.Tensor]:
    """Deterministic weights: 1-D weights ~ 1 + 0.1 N, 1-D biases ~ 0.1 N, others N / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        w = torch.randn(shape, generator=g)
        if len(shape) == 1:
            w = 1.0 + 0.1 * w if name.endswith("weight") else 0.1 * w
        else:
            w = w / math.sqrt(math.prod(shape[1:]))
        out[name] = w
    return out


def build() -> CausalMaskedDiffWithXvec:
    encoder = UpsampleConformerEncoder(**ENCODER_KW)
    estimator = CausalConditionalDecoder(**ESTIMATOR_KW)
    decoder = CausalConditionalCFM(
        in_channels=240,
        n_spks=1,
        spk_emb_dim=80,
        cfm_params=DictConfig(CFM_PARAMS),
        estimator=estimator,
    )
    flow = CausalMaskedDiffWithXvec(**FLOW_KW, encoder=encoder, decoder=decoder)
    shapes = {k: v.shape for k, v in flow.state_dict().items()}
    flow.load_state_dict(seeded_state(shapes), strict=True)
    return flow.eval()


def weight_checks(flow: torch.nn.Module) -> dict[str, np.ndarray]:
    state = flow.state_dict()
    names = sorted(state)
    return dict(
        names=np.array(names),
        sums=np.array([float(state[k].double().sum()) for k in names]),
        abs_sums=np.array([float(state[k].double().abs().sum()) for k in names]),
        firsts=np.array([float(state[k].reshape(-1)[0]) for k in names]),
    )


def encoder_cases(encoder: UpsampleConformerEncoder) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(11)
    t = 13
    xs = torch.randn(2, t, 512, generator=g)
    lens = torch.tensor([t, t - 4])
    context = torch.randn(1, 3, 512, generator=g)
    out: dict[str, torch.Tensor] = dict(xs=xs, lens=lens, context=context)
    with torch.no_grad():
        for streaming in (False, True):
            name = "stream" if streaming else "full"
            h, m = encoder(xs[:1], lens[:1], streaming=streaming)
            out[f"out_{name}"], out[f"mask_{name}"] = h, m.float()
            h, m = encoder(xs, lens, streaming=streaming)
            out[f"out_batch_{name}"], out[f"mask_batch_{name}"] = h, m.float()
            h, _ = encoder(xs[:1], lens[:1], context=context, streaming=streaming)
            out[f"out_context_{name}"] = h
    return {k: v.numpy() for k, v in out.items()}


def run(flow, token, p_tok, p_feat, embedding, streaming: bool, finalize: bool) -> torch.Tensor:
    mel, extra = flow.inference(
        token,
        torch.tensor([token.shape[1]]),
        p_tok,
        torch.tensor([p_tok.shape[1]]),
        p_feat,
        torch.tensor([p_feat.shape[1]]),
        embedding,
        streaming=streaming,
        finalize=finalize,
    )
    assert extra is None
    return mel


def inference_cases(flow: CausalMaskedDiffWithXvec) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(21)
    token = torch.randint(0, 50, (1, 14), generator=g)
    prompt_token = torch.randint(0, 50, (1, 6), generator=g)
    prompt_feat = torch.randn(1, 12, 80, generator=g)
    embedding = torch.randn(1, 192, generator=g)
    out = dict(token=token, prompt_token=prompt_token, prompt_feat=prompt_feat, embedding=embedding)
    empty_token = torch.zeros(1, 0, dtype=torch.long)
    empty_feat = torch.zeros(1, 0, 80)
    for prompt in (True, False):
        p_tok, p_feat = (prompt_token, prompt_feat) if prompt else (empty_token, empty_feat)
        for streaming in (False, True):
            for finalize in (True, False):
                name = (
                    f"mel_{'prompt' if prompt else 'noprompt'}_{'stream' if streaming else 'full'}_"
                    f"{'final' if finalize else 'partial'}"
                )
                out[name] = run(flow, token, p_tok, p_feat, embedding, streaming, finalize)
    return {k: v.numpy() for k, v in out.items()}


def causality_cases(flow: CausalMaskedDiffWithXvec) -> dict[str, np.ndarray]:
    """Streaming, finalize=False mels of the official flow for token prefixes of several lengths.

    With prompt 6 tokens and chunk 5, prefixes of n tokens give 6 + n - 3 encoder frames:
    n = 12, 17, 22 end on chunk boundaries, n = 14, 19 do not.
    """
    g = torch.Generator().manual_seed(31)
    token = torch.randint(0, 50, (1, 22), generator=g)
    prompt_token = torch.randint(0, 50, (1, 6), generator=g)
    prompt_feat = torch.randn(1, 12, 80, generator=g)
    embedding = torch.randn(1, 192, generator=g)
    out = dict(token=token, prompt_token=prompt_token, prompt_feat=prompt_feat, embedding=embedding)
    for n in (12, 14, 17, 19, 22):
        out[f"mel_{n}"] = run(flow, token[:, :n], prompt_token, prompt_feat, embedding, True, False)
    # The official stream's last call: finalize=True with full attention (stream=False) ...
    out["mel_22_full_final"] = run(flow, token, prompt_token, prompt_feat, embedding, False, True)
    # ... and the chunk-causal alternative an incremental flow can compute.
    out["mel_22_stream_final"] = run(flow, token, prompt_token, prompt_feat, embedding, True, True)
    return {k: v.numpy() for k, v in out.items()}


def main() -> None:
    torch.use_deterministic_algorithms(True)
    flow = build()
    print("parameters:", sum(p.numel() for p in flow.parameters()))
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(OUT / "weights.npz", **weight_checks(flow))
    np.savez(OUT / "encoder.npz", **encoder_cases(flow.encoder))
    np.savez(OUT / "inference.npz", **inference_cases(flow))
    causality = causality_cases(flow)
    np.savez(OUT / "causality.npz", **causality)
    for n in (14, 17, 19, 22):
        short, long = causality["mel_12"], causality[f"mel_{n}"]
        diff = np.abs(short - long[:, :, : short.shape[2]]).max()
        print(
            f"official streaming: mel of 12 tokens vs first frames of {n} tokens: max diff {diff:.3g}"
        )
    for f in sorted(OUT.glob("*.npz")):
        print(f.name, f.stat().st_size)


if __name__ == "__main__":
    main()
