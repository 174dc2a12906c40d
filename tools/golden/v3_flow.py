"""Golden data for the v3 flow (DiT estimator + CausalMaskedDiffWithDiT), from the official code.

Run in the reference environment (official CosyVoice + Matcha-TTS on PYTHONPATH, x_transformers
2.11.24 and einops installed), e.g.

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \
        /tmp/refenv/bin/python tools/golden/v3_flow.py

Writes tests/data/golden/v3_flow/{flow_state,estimator,inference}.npz (float32 / int64).
The model is tiny (dim 48, 3 heads of 16, so RoPE covers head 0 only, like the real 16 x 64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from cosyvoice.flow.DiT.dit import DiT
from cosyvoice.flow.flow import CausalMaskedDiffWithDiT
from cosyvoice.flow.flow_matching import CausalConditionalCFM
from cosyvoice.transformer.upsample_encoder import PreLookaheadLayer
from omegaconf import DictConfig

OUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "golden" / "v3_flow"

DIT_KW = dict(
    dim=48,
    depth=2,
    heads=3,
    dim_head=16,
    ff_mult=2,
    mel_dim=80,
    mu_dim=80,
    spk_dim=80,
    out_channels=80,
    static_chunk_size=10,
    num_decoding_left_chunks=-1,
)
FLOW_KW = dict(
    input_size=80,
    output_size=80,
    spk_embed_dim=192,
    output_type="mel",
    vocab_size=50,
    input_frame_rate=25,
    only_mask_loss=True,
    token_mel_ratio=2,
    pre_lookahead_len=3,
)
CFM_PARAMS = dict(
    sigma_min=1e-06,
    solver="euler",
    t_scheduler="cosine",
    training_cfg_rate=0.2,
    inference_cfg_rate=0.7,
    reg_loss_type="l1",
)


def build() -> CausalMaskedDiffWithDiT:
    torch.manual_seed(1234)
    estimator = DiT(**DIT_KW)
    pre = PreLookaheadLayer(in_channels=80, channels=32, pre_lookahead_len=3)
    decoder = CausalConditionalCFM(
        in_channels=240,
        cfm_params=DictConfig(CFM_PARAMS),
        n_spks=1,
        spk_emb_dim=80,
        estimator=estimator,
    )
    flow = CausalMaskedDiffWithDiT(**FLOW_KW, pre_lookahead_layer=pre, decoder=decoder)
    # Sharpen attention so that masks and rotary positions visibly change the outputs.
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for block in estimator.transformer_blocks:
            block.attn.to_q.weight.mul_(4.0)
            block.attn.to_k.weight.mul_(4.0)
            block.attn_norm.linear.bias.add_(
                0.5 * torch.randn(block.attn_norm.linear.bias.shape, generator=g)
            )
        estimator.norm_out.linear.bias.add_(
            0.5 * torch.randn(estimator.norm_out.linear.bias.shape, generator=g)
        )
    return flow.eval()


def estimator_cases(estimator: DiT) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(11)
    b, t = 2, 23
    x = torch.randn(b, 80, t, generator=g)
    mu = torch.randn(b, 80, t, generator=g)
    cond = torch.randn(b, 80, t, generator=g)
    spks = torch.randn(b, 80, generator=g)
    tt = torch.rand(b, generator=g)
    mask = torch.ones(b, 1, t)
    mask[1, :, 17:] = 0
    out: dict[str, np.ndarray] = dict(x=x, mu=mu, cond=cond, spks=spks, t=tt, mask=mask)
    with torch.no_grad():
        out["out_full"] = estimator(x, mask, mu, tt, spks, cond, streaming=False)
        out["out_stream"] = estimator(x, mask, mu, tt, spks, cond, streaming=True)
        out["t_scalar"] = tt[0]
        out["out_scalar_t"] = estimator(x, mask, mu, tt[0], spks, cond, streaming=False)
    return {k: v.numpy() for k, v in out.items()}


def inference_cases(flow: CausalMaskedDiffWithDiT) -> dict[str, np.ndarray]:
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
                mel, _ = flow.inference(
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
                name = (
                    f"mel_{'prompt' if prompt else 'noprompt'}_{'stream' if streaming else 'full'}_"
                    f"{'final' if finalize else 'partial'}"
                )
                out[name] = mel
    return {k: v.numpy() for k, v in out.items()}


def main() -> None:
    torch.use_deterministic_algorithms(True)
    flow = build()
    OUT.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().numpy() for k, v in flow.state_dict().items()}
    np.savez(OUT / "flow_state.npz", **state)
    np.savez(OUT / "estimator.npz", **estimator_cases(flow.decoder.estimator))
    np.savez(OUT / "inference.npz", **inference_cases(flow))
    for f in sorted(OUT.glob("*.npz")):
        print(f.name, f.stat().st_size)


if __name__ == "__main__":
    main()
