"""Traced graphs of the flow's estimators, the U-Nets and CosyVoice3's DiT
(networks/graph_capture.py): the eager floats, any length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cosyvoice_lite import Engine, Mode, SynthesisRequest
from cosyvoice_lite.device import cpu_features
from cosyvoice_lite.networks.dit import DiT
from cosyvoice_lite.networks.unet import CausalConditionalDecoder, ConditionalDecoder
from cosyvoice_lite.precision import pack_linears

MODELS = Path(__file__).parent / "data" / "models"
PROMPT = Path(__file__).parent / "data" / "audio" / "zh_16k.wav"
UNET = dict(
    in_channels=320,
    out_channels=80,
    channels=[32, 32],
    attention_head_dim=16,
    n_blocks=1,
    num_mid_blocks=2,
    num_heads=2,
)


def _unet(kind: type, dtype: torch.dtype) -> ConditionalDecoder:
    torch.manual_seed(0)
    extra = {"static_chunk_size": 10} if kind is CausalConditionalDecoder else {}
    unet = kind(**UNET, **extra).eval()
    for p in unet.parameters():  # non-trivial norms and biases
        p.data.add_(0.1 * torch.randn_like(p))
    return pack_linears(unet.to(dtype))


def _inputs(rows: int, frames: int, dtype: torch.dtype, padded: int = 0) -> tuple:
    g = torch.Generator().manual_seed(frames)
    x, mu, cond = (torch.randn(rows, 80, frames, generator=g).to(dtype) for _ in range(3))
    mask = torch.ones(rows, 1, frames, dtype=dtype)
    if padded:
        mask[-1, :, frames - padded :] = 0  # the last row is shorter: a padded batch
    t = torch.rand(rows, generator=g)
    return x, mask, mu, t, torch.randn(rows, 80, generator=g).to(dtype), cond


def _assert_captured_floats(estimator, calls: list[tuple], dtype: torch.dtype) -> None:
    """The estimator's outputs for ``calls`` (rows, frames, padded frames, streaming), eager and
    then captured: the same floats, bit for bit."""
    with torch.inference_mode():
        eager = [estimator(*_inputs(r, n, dtype, pad), streaming=s) for r, n, pad, s in calls]
        estimator.capture_graphs()
        captured = [estimator(*_inputs(r, n, dtype, pad), streaming=s) for r, n, pad, s in calls]
    for (rows, frames, _, _), a, b in zip(calls, eager, captured, strict=True):
        assert b.shape == (rows, 80, frames)
        assert torch.equal(a, b)


DTYPES = [torch.float32] + ([torch.bfloat16] if cpu_features().packs_bfloat16 else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", [ConditionalDecoder, CausalConditionalDecoder])
def test_a_captured_unet_computes_the_eager_floats_at_every_length(kind, dtype) -> None:
    unet = _unet(kind, dtype)
    calls = [(1, 24, 0, False), (1, 37, 0, False), (2, 61, 0, False), (2, 61, 9, False)]
    if unet.causal:
        calls += [(1, 33, 0, True), (2, 45, 7, True), (1, 8, 0, True)]
    _assert_captured_floats(unet, calls, dtype)
    # traced once per (streaming, rows, whether a bias is needed: padding or a chunk boundary);
    # lengths go through the same graph
    chunk = unet.static_chunk_size
    masked = {(s, r, bool(pad) or (s and n > chunk)) for r, n, pad, s in calls}
    assert len(unet.graphs) == len(masked)


DIT = dict(dim=48, depth=2, heads=3, dim_head=16, ff_mult=2, mel_dim=80, mu_dim=80, spk_dim=80,
           out_channels=80, static_chunk_size=10)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_captured_dit_computes_the_eager_floats_at_every_length(dtype) -> None:
    """Whole utterances, unpadded (no mask), padded and with the streaming chunk mask."""
    torch.manual_seed(0)
    dit = DiT(**DIT).eval()
    for p in dit.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    dit = pack_linears(dit.to(dtype))
    calls = [(1, 24, 0, False), (1, 37, 0, False), (2, 61, 0, False), (2, 61, 9, False)]
    calls += [(1, 33, 0, True), (2, 45, 7, True), (1, 8, 0, True)]
    _assert_captured_floats(dit, calls, dtype)
    # a graph per row count and whether a mask is needed (padding, or a chunk boundary)
    masked = {(r, bool(pad) or (s and n > DIT["static_chunk_size"])) for r, n, pad, s in calls}
    assert len(dit.graphs) == len(masked)


def test_a_mode_observing_operations_sees_the_eager_ones() -> None:
    """Under a dispatch mode (the benchmarks' FLOP counter) a captured U-Net runs eagerly."""
    unet = _unet(CausalConditionalDecoder, torch.float32)
    inputs = _inputs(2, 40, torch.float32, padded=5)
    counts = []
    with torch.inference_mode():
        for capture in (False, True):
            if capture:
                unet.capture_graphs()
                unet(*inputs)  # traced
            with FlopCounterMode(display=False) as counter:
                unet(*inputs)
            counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_a_captured_graph_reads_the_modules_own_weights() -> None:
    """A graph takes the module's weights as inputs rather than keeping copies or constants:
    weights changed in place after the trace change its output exactly as they change the
    eager one (a dispatch mode runs the module eagerly, see above)."""
    unet = _unet(CausalConditionalDecoder, torch.float32)
    inputs = _inputs(1, 30, torch.float32)
    with torch.inference_mode():
        unet.capture_graphs()
        before = unet(*inputs)  # traced
        for p in unet.parameters():  # packed products' weights are buffers: norms, convs, biases
            p.mul_(1.5)
        captured = unet(*inputs)
        with FlopCounterMode(display=False):
            eager = unet(*inputs)
    assert not torch.equal(before, captured)
    assert torch.equal(captured, eager)


def _audio(engine: Engine, voice: str, seed: int, stream: bool) -> np.ndarray:
    mode = Mode.PRESET if voice == "中文女" else Mode.ZERO_SHOT  # a preset / a saved prompt
    request = SynthesisRequest(mode, "你好，今天天气不错，我们出去走走吧。", voice=voice,
                               seed=seed, stream=stream, max_speech_tokens=60, ignore_eos=True)  # fmt: skip
    return np.concatenate([chunk.samples for chunk in engine.synthesize(request)])


@pytest.mark.parametrize(
    "options",
    [{}, {"stream_cache_mb": 0}, {"stream_cache_dtype": "float16"}],
    ids=["caches", "frozen", "float16-caches"],
)
def test_an_engine_captures_the_flow_of_whole_utterances_and_streams(options) -> None:
    """Whole utterances (the U-Net's forward) and streams' incremental calls (a saved voice's
    forks of its prompt frames, a preset's fresh caches; frozen past a zero budget) give the
    eager samples bit for bit."""
    plain = Engine.load(MODELS / "v2-tiny", capture_graphs=False, **options)
    captured = Engine.load(MODELS / "v2-tiny", **options)
    assert plain.pipeline.flow.decoder.estimator.graphs is None
    for voice in ("中文女", "zero_shot_zh"):
        for stream in (False, True):
            ours, eager = (_audio(e, voice, 3, stream) for e in (captured, plain))
            np.testing.assert_array_equal(ours, eager)
    graphs = captured.pipeline.flow.decoder.estimator.graphs
    # traced in the background after the load (Pipeline.warm_graphs): the whole rows, and a
    # stream's one and two rows; the requests met no other layout
    assert len(graphs) == 3


@pytest.mark.parametrize(
    "options",
    [{}, {"stream_cache_mb": 0}, {"stream_cache_dtype": "float16"}],
    ids=["caches", "frozen", "float16-caches"],
)
def test_an_engine_captures_the_dit_of_whole_utterances_and_streams(options) -> None:
    """CosyVoice3: whole utterances (the DiT's forward) and streams' incremental calls (a saved
    voice's forks of its prompt frames; frozen past a zero budget) give the eager samples bit
    for bit."""
    plain = Engine.load(MODELS / "v3-tiny", capture_graphs=False, **options)
    captured = Engine.load(MODELS / "v3-tiny", **options)
    assert plain.pipeline.flow.decoder.estimator.graphs is None
    voice = captured.encode_prompt(PROMPT, "希望你以后能够做的比我还好呦。")
    for engine in (plain, captured):
        engine.prepare_voice(voice).result()
    for stream in (False, True):
        request = SynthesisRequest(Mode.ZERO_SHOT, "你好，今天天气不错，我们出去走走吧。", seed=3,
                                   stream=stream, max_speech_tokens=60, ignore_eos=True)  # fmt: skip
        ours, eager = (
            np.concatenate([c.samples for c in e.synthesize(request, prompt=voice)])
            for e in (captured, plain)
        )
        np.testing.assert_array_equal(ours, eager)
    captured.graphs_traced.result()
    # the whole rows, and a stream's one and two rows
    assert len(captured.pipeline.flow.decoder.estimator.graphs) == 3


def test_the_official_floats_stay_uncaptured() -> None:
    exact = Engine.load(MODELS / "v2-tiny", exact_float32=True)
    assert exact.pipeline.flow.decoder.estimator.graphs is None  # the official's calls as they are
