"""Incremental v3 streaming: flow (flow_v3_stream.py) and causal vocoder (hift_causal_stream.py).

Parity is checked two ways: against the official `CosyVoice3Model.token2wav` stream (golden from
tools/golden/v3_stream.py) and, for more schedules and longer inputs, against the official re-run
semantics computed with our own `inference` (itself golden-tested in test_v3_flow.py and
test_hift.py): the flow re-run over `token[:offset + hop + 3]` sliced at `2 * offset`, and the
vocoder re-run over all mel so far minus the samples already emitted.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from _golden import golden_file
from test_hift import loaded as loaded_hift
from test_v3_flow import new_flow

from cosyvoice_lite.networks import hift_causal_stream
from cosyvoice_lite.networks.flow_matching import CFG_ROWS
from cosyvoice_lite.networks.flow_v3 import CausalMaskedDiffWithDiT
from cosyvoice_lite.networks.flow_v3_stream import kv_cache_bytes_per_frame
from cosyvoice_lite.networks.hift_causal import (
    CausalConvRNNF0Predictor,
    CausalHiFTGenerator,
)

GOLDEN = Path(__file__).parent / "data" / "golden"
TOL = 1e-4
LOOK = 3  # pre_lookahead_len


# ------------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def flow() -> CausalMaskedDiffWithDiT:
    with np.load(GOLDEN / "v3_flow" / "flow_state.npz") as z:
        state = {k: torch.from_numpy(z[k]) for k in z.files}
    return new_flow(state)


@pytest.fixture(scope="module")
def hift() -> CausalHiFTGenerator:
    return loaded_hift("v3")[0]


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(golden_file("v3_stream/token2wav.npz")) as z:
        return {k: z[k] for k in z.files}


def chunk_tokens(flow: CausalMaskedDiffWithDiT) -> int:
    return flow.decoder.estimator.static_chunk_size // flow.token_mel_ratio


def official_schedule(n_tokens: int, n_prompt: int, hop: int) -> list[int]:
    """Token counts fed at each official step (CosyVoice2Model.tts, stream=True): the first hop
    is `hop + prompt pad` so that prompt + hop is a multiple of hop, then it doubles up to 4 hops;
    a step runs once hop + 3 look-ahead tokens are there; the rest goes to the final call."""
    ends, offset, this_hop = [], 0, hop
    pad = -n_prompt % hop
    while True:
        step = this_hop + pad if offset == 0 else this_hop
        if n_tokens - offset < step + LOOK:
            break
        ends.append(offset + step + LOOK)
        offset += step
        this_hop = min(4 * hop, 2 * this_hop)
    return ends


def flow_inputs(seed: int, n_tokens: int, n_prompt: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    token = torch.randint(0, 50, (1, n_tokens), generator=g)
    prompt_token = torch.randint(0, 50, (1, n_prompt), generator=g)
    prompt_feat = torch.randn(1, 2 * n_prompt, 80, generator=g)
    embedding = torch.randn(1, 192, generator=g)
    return token, prompt_token, prompt_feat, embedding


def flow_rerun(
    flow: CausalMaskedDiffWithDiT,
    token: torch.Tensor,
    p_tok: torch.Tensor,
    p_feat: torch.Tensor,
    emb: torch.Tensor,
    finalize: bool,
) -> torch.Tensor:
    mel, _ = flow.inference(
        token,
        torch.tensor([token.shape[1]]),
        p_tok,
        torch.tensor([p_tok.shape[1]]),
        p_feat,
        torch.tensor([p_feat.shape[1]]),
        emb,
        streaming=True,
        finalize=finalize,
    )
    return mel


def max_err(a: torch.Tensor, b: torch.Tensor | np.ndarray) -> float:
    b = torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


# ----------------------------------------------------------------------- official token2wav


def official_calls(golden: dict[str, np.ndarray]) -> list[int]:
    return golden["chunk_token_end"].tolist()


def test_flow_stream_matches_official_token2wav_mel(
    flow: CausalMaskedDiffWithDiT, golden: dict[str, np.ndarray]
) -> None:
    token = torch.from_numpy(golden["token"])
    p_tok, p_feat = (
        torch.from_numpy(golden["prompt_token"]),
        torch.from_numpy(golden["prompt_feat"]),
    )
    ends = official_calls(golden)
    assert ends == [
        *official_schedule(token.shape[1], p_tok.shape[1], chunk_tokens(flow)),
        token.shape[1],
    ]
    state = flow.new_stream(p_tok, p_feat, torch.from_numpy(golden["embedding"]))
    fed, mels = 0, []
    for i, end in enumerate(ends):
        mels.append(flow.stream_step(state, token[:, fed:end], finalize=i == len(ends) - 1))
        fed = end
    # chunk k is the mel of tokens [offset_k, offset_k + hop_k)
    offsets = [0] + [end - LOOK for end in ends[:-1]] + [ends[-1]]
    assert [m.shape[2] for m in mels] == [2 * (b - a) for a, b in pairwise(offsets)]
    assert max_err(torch.cat(mels, dim=2), golden["mel_chunks"]) < TOL


def test_vocoder_stream_matches_official_token2wav_speech(
    hift: CausalHiFTGenerator, golden: dict[str, np.ndarray]
) -> None:
    """The official vocoder fed the official flow chunks; ours fed the same chunks."""
    ends = official_calls(golden)
    offsets = [0] + [end - LOOK for end in ends[:-1]] + [ends[-1]]
    mel = torch.from_numpy(golden["mel_chunks"])
    state = hift.new_stream()
    chunks, frame = [], 0
    for i, (a, b) in enumerate(pairwise(offsets)):
        size = 2 * (b - a)
        chunks.append(
            hift.stream_step(state, mel[:, :, frame : frame + size], finalize=i == len(ends) - 1)
        )
        frame += size
    assert [c.shape[1] for c in chunks] == golden["chunk_samples"].tolist()
    assert max_err(torch.cat(chunks, dim=1), golden["speech"]) < TOL


def test_flow_to_vocoder_chain_matches_the_official_stream_semantics(
    flow: CausalMaskedDiffWithDiT, hift: CausalHiFTGenerator, golden: dict[str, np.ndarray]
) -> None:
    token = torch.from_numpy(golden["token"])
    p_tok, p_feat = (
        torch.from_numpy(golden["prompt_token"]),
        torch.from_numpy(golden["prompt_feat"]),
    )
    flow_state = flow.new_stream(p_tok, p_feat, torch.from_numpy(golden["embedding"]))
    voc_state = hift.new_stream()
    ends = official_calls(golden)
    fed, mels, chunks = 0, [], []
    for i, end in enumerate(ends):
        final = i == len(ends) - 1
        mels.append(flow.stream_step(flow_state, token[:, fed:end], finalize=final))
        chunks.append(hift.stream_step(voc_state, mels[-1], finalize=final))
        fed = end
    # exact semantics on our own mel: the official vocoder re-run over the chunks
    expected = vocoder_rerun_chunks(hift, torch.cat(mels, dim=2), [m.shape[2] for m in mels])
    for got, want in zip(chunks, expected, strict=True):
        assert max_err(got, want) < TOL
    # Against the official end to end the error is larger, and not from streaming: our mel
    # differs from the official one by ~1e-6, and the official vocoder's source phase (a float32
    # cumsum times 2 pi x 480) turns that into ~1e-2 (the same happens between any two
    # implementations or devices).
    assert max_err(torch.cat(chunks, dim=1), golden["speech"]) < 0.05


# ---------------------------------------------------------------------------------------- flow


@pytest.mark.parametrize(("n_prompt", "n_tokens"), [(6, 70), (0, 47), (10, 33)])
def test_flow_stream_matches_official_rerun_chunk_by_chunk(
    flow: CausalMaskedDiffWithDiT, n_prompt: int, n_tokens: int
) -> None:
    token, p_tok, p_feat, emb = flow_inputs(n_prompt + n_tokens, n_tokens, n_prompt)
    state = flow.new_stream(p_tok, p_feat, emb)
    fed = offset = 0
    ends = official_schedule(n_tokens, n_prompt, chunk_tokens(flow))
    assert len(ends) >= 2
    for end in ends:
        mel = flow.stream_step(state, token[:, fed:end])
        expected = flow_rerun(flow, token[:, :end], p_tok, p_feat, emb, finalize=False)
        assert max_err(mel, expected[:, :, 2 * offset :]) < TOL
        fed, offset = end, end - LOOK
    mel = flow.stream_step(state, token[:, fed:], finalize=True)
    expected = flow_rerun(flow, token, p_tok, p_feat, emb, finalize=True)
    assert max_err(mel, expected[:, :, 2 * offset :]) < TOL


def test_flow_stream_fed_token_by_token_gives_the_same_mel(flow: CausalMaskedDiffWithDiT) -> None:
    token, p_tok, p_feat, emb = flow_inputs(5, 41, 6)
    state = flow.new_stream(p_tok, p_feat, emb)
    pieces, first_at = [], None
    for i in range(token.shape[1]):
        mel = flow.stream_step(state, token[:, i : i + 1])
        if mel.shape[2] and first_at is None:
            first_at = i + 1
        pieces.append(mel)
    pieces.append(flow.stream_step(state, token[:, :0], finalize=True))
    # mel comes out as soon as prompt + tokens complete a DiT chunk and its 3 look-ahead tokens
    # are in (here the chunk the prompt started: earlier than the official first hop)
    chunk = chunk_tokens(flow)
    assert first_at == (6 // chunk + 1) * chunk - 6 + LOOK
    expected = flow_rerun(flow, token, p_tok, p_feat, emb, finalize=True)
    assert max_err(torch.cat(pieces, dim=2), expected) < TOL


def test_two_interleaved_flow_streams_do_not_affect_each_other(
    flow: CausalMaskedDiffWithDiT,
) -> None:
    inputs = [flow_inputs(11, 40, 6), flow_inputs(12, 37, 9)]

    def run_alone(k: int) -> list[torch.Tensor]:
        token, p_tok, p_feat, emb = inputs[k]
        state = flow.new_stream(p_tok, p_feat, emb)
        outs = [flow.stream_step(state, token[:, i : i + 7]) for i in range(0, token.shape[1], 7)]
        return [*outs, flow.stream_step(state, token[:, :0], finalize=True)]

    alone = [run_alone(0), run_alone(1)]
    states = [flow.new_stream(*inputs[k][1:]) for k in range(2)]
    together: list[list[torch.Tensor]] = [[], []]
    for i in range(0, 42, 7):
        for k in (1, 0):
            together[k].append(flow.stream_step(states[k], inputs[k][0][:, i : i + 7]))
    for k in (0, 1):
        together[k].append(flow.stream_step(states[k], inputs[k][0][:, :0], finalize=True))
        assert len(together[k]) == len(alone[k])
        for a, b in zip(alone[k], together[k], strict=True):
            assert torch.equal(a, b)


def test_streams_stepped_together_equal_each_stream_alone(flow: CausalMaskedDiffWithDiT) -> None:
    """`stream_steps` batches the DiT solves of streams at different positions (different
    prompts, push sizes, a fork of a primed prompt, one past its cache budget, streams ending at
    different calls); every stream's mel equals the same stream stepped alone within 1e-4."""
    inputs = [flow_inputs(51, 44, 6), flow_inputs(52, 37, 9), flow_inputs(53, 50, 23)]
    pushes = [7, 5, 7]
    primed = flow.new_stream(*inputs[2][1:])
    flow.stream_step(primed, inputs[2][0][:, :0])

    def streams() -> list:
        made = [flow.new_stream(*inputs[0][1:]), flow.new_stream(*inputs[1][1:]), primed.fork()]
        made[1].cache_budget = 1  # frozen from its first frames: re-solves alone each call
        return made

    def pieces(k: int) -> list[torch.Tensor]:
        token, push = inputs[k][0], pushes[k]
        return [token[:, i : i + push] for i in range(0, token.shape[1], push)]

    alone = []
    for k, state in enumerate(streams()):
        outs = [flow.stream_step(state, piece) for piece in pieces(k)]
        alone.append([*outs, flow.stream_step(state, inputs[k][0][:, :0], finalize=True)])
    states, together = streams(), [[], [], []]
    calls = max(len(pieces(k)) for k in range(3)) + 1
    for call in range(calls):
        live = [k for k in range(3) if call <= len(pieces(k))]
        feeds = [pieces(k)[call] if call < len(pieces(k)) else inputs[k][0][:, :0] for k in live]
        finals = [call == len(pieces(k)) for k in live]
        mels = flow.stream_steps([states[k] for k in live], feeds, finals)
        for k, mel in zip(live, mels, strict=True):
            together[k].append(mel)
    for k in range(3):
        assert [m.shape[2] for m in together[k]] == [m.shape[2] for m in alone[k]]
        assert max_err(torch.cat(together[k], dim=2), torch.cat(alone[k], dim=2)) < TOL
    assert states[1].frozen_at is not None
    with pytest.raises(ValueError, match="one token tensor"):
        flow.stream_steps(states[:2], [inputs[0][0]], [False])


def test_forks_of_a_primed_prompt_match_the_official_rerun(flow: CausalMaskedDiffWithDiT) -> None:
    """A voice's prompt is computed once (`stream_step` with no new tokens encodes the prompt's
    whole chunks whose look-ahead is in the prompt); every fork attends over those keys/values,
    shared, and matches the official re-run chunk by chunk; forks do not affect each other."""
    token, p_tok, p_feat, emb = flow_inputs(31, 40, 23)
    template = flow.new_stream(p_tok, p_feat, emb)
    assert flow.stream_step(template, token[:, :0]).shape[2] == 0
    chunk = chunk_tokens(flow)
    assert template.tokens_done == (23 - LOOK) // chunk * chunk > 0
    template = template.fork()  # what a voice keeps: prefix only, compacted
    ends = official_schedule(token.shape[1], 23, chunk)
    for order in ((0, 1), (1, 0)):  # two forks interleaved, each equal to the re-run
        forks = [template.fork(), template.fork()]
        fed, offset = [0, 0], [0, 0]
        for end in ends:
            for k in order:
                mel = flow.stream_step(forks[k], token[:, fed[k] : end])
                expected = flow_rerun(flow, token[:, :end], p_tok, p_feat, emb, finalize=False)
                assert max_err(mel, expected[:, :, 2 * offset[k] :]) < TOL
                fed[k], offset[k] = end, end - LOOK
        shared = forks[0].steps[0][0].kv[0].keys.shared
        assert shared is forks[1].steps[0][0].kv[0].keys.shared
        assert shared is template.steps[0][0].kv[0].keys.shared
        assert shared.shape[-2] == 2 * template.tokens_done
        mel = flow.stream_step(forks[0], token[:, fed[0] :], finalize=True)
        expected = flow_rerun(flow, token, p_tok, p_feat, emb, finalize=True)
        assert max_err(mel, expected[:, :, 2 * offset[0] :]) < TOL
    with pytest.raises(ValueError):
        forks[0].fork()  # finalized


def test_a_stream_past_its_cache_budget_recomputes_and_matches_the_official(
    flow: CausalMaskedDiffWithDiT,
) -> None:
    """Past `cache_budget` the caches stop growing; each call re-solves the frames after them
    (as the official re-runs its history), so memory stays flat and the mel is unchanged."""
    token, p_tok, p_feat, emb = flow_inputs(41, 70, 23)
    template = flow.new_stream(p_tok, p_feat, emb)
    flow.stream_step(template, token[:, :0])
    template = template.fork()  # a voice's prompt, shared
    chunk = chunk_tokens(flow)
    ends = official_schedule(token.shape[1], 23, chunk)
    assert len(ends) >= 3
    state = template.fork()
    state.cache_budget = 1  # frozen at the second call: only the first call's frames are kept
    fed = offset = 0
    sizes, frames = [], []
    for end in ends:
        mel = flow.stream_step(state, token[:, fed:end])
        expected = flow_rerun(flow, token[:, :end], p_tok, p_feat, emb, finalize=False)
        assert max_err(mel, expected[:, :, 2 * offset :]) < TOL
        sizes.append(state.cache_bytes())
        frames.append(state.last_step_frames)
        fed, offset = end, end - LOOK
    mel = flow.stream_step(state, token[:, fed:], finalize=True)
    expected = flow_rerun(flow, token, p_tok, p_feat, emb, finalize=True)
    assert max_err(mel, expected[:, :, 2 * offset :]) < TOL
    assert state.frozen_at is not None and len(set(sizes[1:])) == 1  # no growth once frozen
    assert frames == sorted(frames) and frames[-1] > frames[1]  # the re-solved frames grow


def test_a_stream_frozen_before_its_first_frame_matches_the_official(
    flow: CausalMaskedDiffWithDiT,
) -> None:
    token, p_tok, p_feat, emb = flow_inputs(43, 40, 0)
    state = flow.new_stream(p_tok, p_feat, emb)
    state.cache_budget = 0  # nothing is ever cached: every call re-solves all frames
    mels = [flow.stream_step(state, token[:, i : i + 9]) for i in range(0, 40, 9)]
    mels.append(flow.stream_step(state, token[:, :0], finalize=True))
    expected = flow_rerun(flow, token, p_tok, p_feat, emb, finalize=True)
    assert state.frozen_at == 0 and state.cache_bytes() < 1_000
    assert max_err(torch.cat(mels, dim=2), expected) < TOL


def test_flow_step_cost_stays_flat_and_cache_grows_linearly(flow: CausalMaskedDiffWithDiT) -> None:
    token, p_tok, p_feat, emb = flow_inputs(21, 160, 5)
    state = flow.new_stream(p_tok, p_feat, emb)
    hop = 2 * chunk_tokens(flow)
    state_steps = []
    flow.stream_step(state, token[:, : hop + LOOK])
    for i in range(hop + LOOK, token.shape[1] - hop, hop):
        flow.stream_step(state, token[:, i : i + hop])
        state_steps.append(state.last_step_frames)
    # every call runs the estimator on the new frames only, however long the history
    assert state_steps == [2 * hop] * len(state_steps)
    frames = 2 * state.tokens_done
    estimator = flow.decoder.estimator
    used = sum(kv.length for step in state.steps for row in step for kv in row.kv)
    assert used == frames * len(state.steps) * CFG_ROWS * estimator.depth
    per_frame = kv_cache_bytes_per_frame(estimator)
    assert per_frame == 10 * 2 * 2 * 2 * 48 * 4  # steps, depth, k/v, CFG rows, width, float32
    assert (
        frames * per_frame
        <= state.cache_bytes()
        <= 1.3 * frames * per_frame + 20 * per_frame + 100_000
    )


def test_flow_low_precision_cache_halves_memory_with_small_error(
    flow: CausalMaskedDiffWithDiT,
) -> None:
    token, p_tok, p_feat, emb = flow_inputs(8, 60, 6)
    mels = {}
    for dtype in (None, torch.bfloat16, torch.float16):
        state = flow.new_stream(p_tok, p_feat, emb, cache_dtype=dtype)
        pieces = [
            flow.stream_step(state, token[:, :33]),
            flow.stream_step(state, token[:, 33:], finalize=True),
        ]
        mels[dtype] = (torch.cat(pieces, dim=2), state.cache_bytes())
    exact, exact_bytes = mels[None]
    # measured: bf16 ~7e-3, fp16 ~1e-3 (mel std ~1.4)
    for dtype, bound in ((torch.bfloat16, 0.03), (torch.float16, 0.005)):
        mel, nbytes = mels[dtype]
        assert nbytes < 0.55 * exact_bytes
        assert 0 < max_err(mel, exact) < bound


def test_flow_stream_misuse_raises(flow: CausalMaskedDiffWithDiT) -> None:
    token, p_tok, p_feat, emb = flow_inputs(1, 20, 6)
    state = flow.new_stream(p_tok, p_feat, emb)
    with pytest.raises(ValueError):
        flow.stream_step(state, token[0])
    flow.stream_step(state, token, finalize=True)
    with pytest.raises(ValueError, match="finalized"):
        flow.stream_step(state, token)
    with pytest.raises(ValueError):
        flow.new_stream(torch.zeros(2, 3, dtype=torch.long), p_feat, emb)


# ------------------------------------------------------------------------------------- vocoder


def vocoder_mel(seed: int, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 80, frames, generator=g) * 2.0 - 5.0


def vocoder_rerun_chunks(
    hift: CausalHiFTGenerator, mel: torch.Tensor, sizes: list[int]
) -> list[torch.Tensor]:
    """What the official stream emits: re-vocode all mel so far, keep the samples not yet out."""
    outs, offset, frames = [], 0, 0
    for size in sizes:
        frames += size
        final = frames == mel.shape[2]
        if not final and frames < 8:  # the official vocoder needs 8 frames before finalize
            outs.append(torch.zeros(1, 0))
            continue
        speech, _ = hift.inference(mel[:, :, :frames], finalize=final)
        outs.append(speech[:, offset:])
        offset = speech.shape[1]
    return outs


def split(total: int, pattern: list[int]) -> list[int]:
    sizes, i = [], 0
    while sum(sizes) < total:
        sizes.append(min(pattern[i % len(pattern)], total - sum(sizes)))
        i += 1
    return sizes


@pytest.mark.parametrize(
    ("frames", "pattern"), [(300, [18, 20, 40]), (260, [50, 100]), (140, [9]), (90, [1, 2, 13, 0])]
)
def test_vocoder_stream_matches_official_rerun_chunk_by_chunk(
    hift: CausalHiFTGenerator, frames: int, pattern: list[int]
) -> None:
    mel = vocoder_mel(frames, frames)
    sizes = split(frames, pattern)
    expected = vocoder_rerun_chunks(hift, mel, sizes)
    state = hift.new_stream()
    done = 0
    for size, want in zip(sizes, expected, strict=True):
        got = hift.stream_step(state, mel[:, :, done : done + size], finalize=done + size == frames)
        done += size
        assert max_err(got, want) < TOL
    assert state.speech_offset == frames * hift.upsample_scale


def test_vocoder_receptive_field_is_computed_and_holds(hift: CausalHiFTGenerator) -> None:
    released = CausalHiFTGenerator(
        in_channels=80,
        base_channels=32,
        nb_harmonics=8,
        sampling_rate=24000,
        upsample_rates=[8, 5, 3],
        upsample_kernel_sizes=[16, 11, 7],
        istft_params={"n_fft": 16, "hop_len": 4},
        resblock_kernel_sizes=[3, 7, 11],
        resblock_dilation_sizes=[[1, 3, 5]] * 3,
        source_resblock_kernel_sizes=[7, 7, 11],
        source_resblock_dilation_sizes=[[1, 3, 5]] * 3,
        conv_pre_look_right=4,
        f0_predictor=CausalConvRNNF0Predictor(1, 80, 16),
    )
    # the released geometry (the width does not matter): 28.6 frames of 480 samples
    assert hift_causal_stream.decoder_left_context_samples(released) == 13736
    assert hift_causal_stream.f0_left_context_frames(released) == 8

    # decoding a window cut out of a longer signal (exact mel and source from its first frame):
    # the edge disturbs the first samples, and none from the computed bound on
    context = hift_causal_stream.decoder_left_context_samples(hift)
    mel = vocoder_mel(3, 100)
    with torch.inference_mode():
        f0 = hift.f0_predictor(mel).to(mel.dtype)
        source = hift.m_source(hift._upsample_f0(f0)).transpose(1, 2)
        full = hift.decode(mel, source)
        start = 40
        window = hift.decode(mel[:, :, start:], source[:, :, start * 480 :])
    diff = (window - full[:, start * 480 :]).abs()[0]
    assert float(diff[: context // 2].max()) > 1e-3
    assert float(diff[context:].max()) < 1e-5


def test_vocoder_source_phase_is_carried_bit_exactly_over_a_long_history(
    hift: CausalHiFTGenerator,
) -> None:
    # 30 s: one float32 ulp of the phase sum would already move the sines by ~0.1 rad
    frames = 1500
    mel = vocoder_mel(4, frames)
    with torch.inference_mode():
        f0 = hift.f0_predictor(mel).to(mel.dtype)
        full = hift.m_source(hift._upsample_f0(f0)).transpose(1, 2)
        state = hift.new_stream()
        state.f0, state.f0_done = f0, frames
        start = 0
        for stop in (37, 400, 401, 999, 1500):
            source, phase = hift_causal_stream._source(hift, state, start, stop)
            assert torch.equal(source, full[:, :, start * 480 : stop * 480])
            state.phase, start = phase[:, -1:], stop


def test_two_interleaved_vocoder_streams_do_not_affect_each_other(
    hift: CausalHiFTGenerator,
) -> None:
    mels = [vocoder_mel(1, 120), vocoder_mel(2, 97)]

    def chunks(k: int) -> list[torch.Tensor]:
        return [mels[k][:, :, i : i + 15] for i in range(0, 135, 15)]

    alone = []
    for k in (0, 1):
        state = hift.new_stream()
        alone.append([hift.stream_step(state, c, finalize=i == 8) for i, c in enumerate(chunks(k))])
    states = [hift.new_stream(), hift.new_stream()]
    together: list[list[torch.Tensor]] = [[], []]
    for i in range(9):
        for k in (1, 0):
            together[k].append(hift.stream_step(states[k], chunks(k)[i], finalize=i == 8))
    for k in (0, 1):
        for a, b in zip(alone[k], together[k], strict=True):
            assert torch.equal(a, b)


def test_vocoder_step_cost_stays_flat(hift: CausalHiFTGenerator) -> None:
    mel = vocoder_mel(6, 600)
    state = hift.new_stream()
    context_frames = -(
        -hift_causal_stream.decoder_left_context_samples(hift) // hift.upsample_scale
    )
    window = []
    for i in range(0, 600, 40):
        out = hift.stream_step(state, mel[:, :, i : i + 40])
        assert out.shape[1] == (40 if i else 40 - 8) * hift.upsample_scale
        window.append(state.last_step_frames)
        # the state keeps a bounded stretch of mel and f0, not the history
        assert state.mel is not None and state.mel.shape[2] <= 40 + context_frames + 16
    assert max(window) <= 40 + context_frames + 8
    assert window[5:] == [window[5]] * len(window[5:])


def test_vocoder_single_final_call_equals_inference(hift: CausalHiFTGenerator) -> None:
    mel = vocoder_mel(7, 30)
    state = hift.new_stream()
    assert hift.stream_step(state, mel[:, :, :5]).shape == (1, 0)  # not enough frames yet
    speech = hift.stream_step(state, mel[:, :, 5:], finalize=True)
    expected, _ = hift.inference(mel, finalize=True)
    assert max_err(speech, expected) < TOL
    with pytest.raises(ValueError, match="finalized"):
        hift.stream_step(state, mel)
    with pytest.raises(ValueError):
        hift.stream_step(hift.new_stream(), mel[0])
