"""Golden data for v3 streaming (flow + causal HiFT), from the official `CosyVoice3Model.token2wav`.

Run in the reference environment (official CosyVoice + Matcha-TTS on PYTHONPATH), e.g.

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \
        /tmp/refenv/bin/python tools/golden/v3_stream.py

It reuses the tiny official models of tools/golden/v3_flow.py (tests/data/golden/v3_flow/
flow_state.npz) and tools/golden/hift.py (tests/data/golden/hift/v3.npz; the vocoder is rebuilt
in the released construction order so that its fixed source buffers are the official ones) and
runs the official streaming loop of `CosyVoice2Model.tts` by hand: the hop schedule (first hop
`token_hop_len + prompt_token_pad`, then doubling up to 4 hops), `token2wav(token[:offset + hop +
3], token_offset=offset, stream=True, finalize=False)` per chunk, which re-runs the flow over all
tokens, accumulates the mel and re-vocodes all of it. The tiny DiT's chunk is 10 frames, so
`token_hop_len` is 5 tokens instead of 25. The final call is recorded twice: as the official
stream makes it (`stream=False`, full attention) and with `stream=True` (chunk masks), which is
what cosyvoice-lite's incremental stream computes.

Writes tests/data/golden/v3_stream/token2wav.npz: the inputs, the token count of each call, the
speech of each call (concatenated), the mel chunks the official flow emitted (concatenated) and
the flow's one-pass mel for comparison.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import numpy as np
import torch
from cosyvoice.cli.model import CosyVoice3Model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hift as hift_golden  # noqa: E402  (tools/golden/hift.py)
import v3_flow as flow_golden  # noqa: E402  (tools/golden/v3_flow.py)

ROOT = HERE.parents[1]
# GOLDEN_ROOT: where the goldens go (tests/data/golden; tests/data/golden/avx2 from an AVX2 CPU)
OUT = Path(os.environ.get("GOLDEN_ROOT", ROOT / "tests" / "data" / "golden")) / "v3_stream"

TOKEN_HOP = 5  # the tiny DiT's static_chunk_size (10 frames) in tokens
N_TOKENS = 123
PROMPT_TOKENS = 6


def build_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    flow = flow_golden.build()
    with np.load(ROOT / "tests" / "data" / "golden" / "v3_flow" / "flow_state.npz") as z:
        flow.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files}, strict=True)
    hift = hift_golden.build_v3_in_release_order()
    with np.load(ROOT / "tests" / "data" / "golden" / "hift" / "v3.npz") as z:
        sd = {k[3:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("sd/")}
    hift.load_state_dict(sd, strict=True)
    return flow.eval(), hift.eval()


def official_model(flow: torch.nn.Module, hift: torch.nn.Module) -> CosyVoice3Model:
    model = CosyVoice3Model(llm=None, flow=flow, hift=hift, fp16=False)
    model.token_hop_len = TOKEN_HOP
    model.token_max_hop_len = 4 * TOKEN_HOP
    return model


def run_stream(
    model: CosyVoice3Model,
    token: torch.Tensor,
    prompt_token: torch.Tensor,
    prompt_feat: torch.Tensor,
    embedding: torch.Tensor,
    final_stream: bool,
) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """The streaming branch of CosyVoice2Model.tts with all tokens already generated.

    Returns the token count of each call, the speech of each call and all the mel the official
    vocoder saw (the concatenated flow chunks)."""
    this_uuid = str(uuid.uuid1())
    model.hift_cache_dict[this_uuid] = None
    model.token_hop_len = TOKEN_HOP  # the official mutates it on the instance; reset per request
    offsets, speech = [], []
    token_offset = 0
    pad = int(
        np.ceil(prompt_token.shape[1] / model.token_hop_len) * model.token_hop_len
        - prompt_token.shape[1]
    )
    while True:
        hop = model.token_hop_len + pad if token_offset == 0 else model.token_hop_len
        if token.shape[1] - token_offset < hop + model.flow.pre_lookahead_len:
            break
        chunk = token[:, : token_offset + hop + model.flow.pre_lookahead_len]
        out = model.token2wav(
            chunk,
            prompt_token,
            prompt_feat,
            embedding,
            token_offset,
            this_uuid,
            stream=True,
            finalize=False,
        )
        offsets.append(token_offset + hop + model.flow.pre_lookahead_len)
        speech.append(out.numpy())
        token_offset += hop
        model.token_hop_len = min(
            model.token_max_hop_len, model.token_hop_len * model.stream_scale_factor
        )
    out = model.token2wav(
        token,
        prompt_token,
        prompt_feat,
        embedding,
        token_offset,
        this_uuid,
        stream=final_stream,
        finalize=True,
    )
    offsets.append(token.shape[1])
    speech.append(out.numpy())
    mel = model.hift_cache_dict.pop(this_uuid)["mel"]
    return offsets, speech, mel.numpy()


def main() -> None:
    torch.use_deterministic_algorithms(True)
    flow, hift = build_models()
    model = official_model(flow, hift)
    g = torch.Generator().manual_seed(31)
    token = torch.randint(0, 50, (1, N_TOKENS), generator=g)
    prompt_token = torch.randint(0, 50, (1, PROMPT_TOKENS), generator=g)
    prompt_feat = torch.randn(1, 2 * PROMPT_TOKENS, 80, generator=g)
    embedding = torch.randn(1, 192, generator=g)
    out: dict[str, np.ndarray] = dict(
        token=token.numpy(),
        prompt_token=prompt_token.numpy(),
        prompt_feat=prompt_feat.numpy(),
        embedding=embedding.numpy(),
    )
    ends, chunks, mel_chunks = run_stream(
        model, token, prompt_token, prompt_feat, embedding, final_stream=True
    )
    _, chunks_official_final, _ = run_stream(
        model, token, prompt_token, prompt_feat, embedding, final_stream=False
    )
    out["chunk_token_end"] = np.array(ends)
    out["chunk_samples"] = np.array([c.shape[1] for c in chunks])
    out["speech"] = np.concatenate(chunks, axis=1).astype(np.float32)
    out["mel_chunks"] = mel_chunks.astype(np.float32)
    out["last_chunk_official_final"] = chunks_official_final[-1].astype(np.float32)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "token2wav.npz", **out)
    print("chunks", out["chunk_token_end"].tolist(), out["chunk_samples"].tolist())
    print("speech", out["speech"].shape, "std", float(out["speech"].std()))
    for f in sorted(OUT.glob("*.npz")):
        print(f.name, f.stat().st_size)


if __name__ == "__main__":
    main()
