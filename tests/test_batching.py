"""The batched core: rows stepped together give what each gives alone.

Networks: B rows of different lengths, each on its own KV cache, against each row alone (1e-4).
Engine: requests submitted together (different modes, lengths, streaming or not, joining and
leaving mid-way, cancelled, failing) against each request run alone with the same seed.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_server_support import wait_for

from cosyvoice_lite import Engine, Mode, SynthesisRequest
from cosyvoice_lite.device import Placement
from cosyvoice_lite.engine import QueueSink, utterance_batch_size
from cosyvoice_lite.errors import AudioError, InvalidRequestError
from cosyvoice_lite.heap import release_freed_memory
from cosyvoice_lite.networks.qwen2 import Qwen2Encoder
from cosyvoice_lite.networks.qwen2_lm import CosyVoice3LM, Qwen2LM
from cosyvoice_lite.pipelines.common import utterance_groups

DATA = Path(__file__).resolve().parent / "data"
PROMPT = DATA / "audio" / "zh_16k.wav"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
TOL = 1e-4


# ---------------------------------------------------------------------------------- networks
def _qwen_lm(cls) -> Qwen2LM:
    torch.manual_seed(0)
    lm = cls(
        llm_input_size=16,
        llm_output_size=16,
        speech_token_size=6561,
        llm=Qwen2Encoder(DATA / "CosyVoice-BlankEN-tiny"),
    )
    for p in lm.parameters():  # the default init of an untrained decoder is too flat to test
        torch.nn.init.normal_(p, std=0.5)
    return lm.eval()


def _v1_lm(v1_dir: Path):
    return Engine.load(v1_dir).pipeline.llm


def _check_rows_match_alone(lm, prefixes: list[torch.Tensor], steps: int) -> None:
    """Prefill each row alone, then decode ``steps`` tokens batched and alone: same log-probs."""
    torch.manual_seed(1)
    with torch.inference_mode():
        batched = [lm.new_cache() for _ in prefixes]
        alone = [lm.new_cache() for _ in prefixes]
        for prefix, a, b in zip(prefixes, batched, alone, strict=True):
            lm.log_probs(prefix, [a])
            lm.log_probs(prefix, [b])
        for _ in range(steps):
            tokens = torch.randint(0, 100, (len(prefixes),)).tolist()
            inputs = torch.cat([lm.speech_input(t) for t in tokens])
            together = lm.log_probs(inputs, batched)
            for row, (token, cache) in enumerate(zip(tokens, alone, strict=True)):
                single = lm.log_probs(lm.speech_input(token), [cache])[0]
                torch.testing.assert_close(together[row], single, atol=TOL, rtol=0)
    assert [c.length for c in batched] == [c.length for c in alone]


@pytest.mark.parametrize("cls", [Qwen2LM, CosyVoice3LM])
def test_qwen_rows_of_different_lengths_match_alone(cls) -> None:
    lm = _qwen_lm(cls)
    eop = CosyVoice3LM.END_OF_PROMPT_ID
    prefixes = [lm.prefix([eop, 5, 6, 7], [], list(range(n)), None) for n in (3, 11, 25)]
    _check_rows_match_alone(lm, prefixes, steps=6)


def test_v1_rows_of_different_lengths_match_alone(v1_dir: Path) -> None:
    lm = _v1_lm(v1_dir)
    embedding = torch.randn(1, 192)
    prefixes = [
        lm.prefix(
            torch.tensor([[5, 6, 7] * n]),
            torch.zeros(1, 0, dtype=torch.int32),
            torch.zeros(1, 0, dtype=torch.int32),
            embedding,
        )
        for n in (1, 3, 7)
    ]
    _check_rows_match_alone(lm, prefixes, steps=6)


def test_batched_rows_need_one_position_each() -> None:
    lm = _qwen_lm(Qwen2LM)
    with torch.inference_mode(), pytest.raises(ValueError, match="one position per row"):
        lm.log_probs(torch.zeros(2, 3, 16), [lm.new_cache(), lm.new_cache()])


# ---------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def v2() -> Engine:
    return Engine.load(DATA / "models" / "v2-tiny", max_batch=8)


def _request(text: str, seed: int, **kwargs) -> SynthesisRequest:
    kwargs.setdefault("mode", Mode.ZERO_SHOT)
    kwargs.setdefault("max_speech_tokens", 40)  # bounds the work of random weights
    if kwargs["mode"] in (Mode.ZERO_SHOT, Mode.CROSS_LINGUAL, Mode.INSTRUCT):
        kwargs.setdefault("prompt_audio", PROMPT)
    if kwargs["mode"] == Mode.ZERO_SHOT:
        kwargs.setdefault("prompt_text", PROMPT_TEXT)
    return SynthesisRequest(text=text, seed=seed, **kwargs)


REQUESTS = [
    _request("你好。", 1),
    _request("今天天气真好，我们出去走走吧。", 2, stream=True),
    _request("Nice to meet you.", 3, mode=Mode.CROSS_LINGUAL),
    _request("你好。", 4, mode=Mode.PRESET, voice="中文女", prompt_audio=None),
    _request("慢慢说。", 5, mode=Mode.INSTRUCT, instruct="用四川话说这句话"),
]


def _alone(engine: Engine, request: SynthesisRequest) -> np.ndarray:
    return np.concatenate([c.samples for c in engine.synthesize(request)])


def _together(engine: Engine, requests: list[SynthesisRequest]) -> list:
    """Submit every request at once; returns each one's audio, or the exception it ended with."""
    sinks = [QueueSink() for _ in requests]
    for request, sink in zip(requests, sinks, strict=True):
        engine.submit(request, sink)
    results = []
    for sink in sinks:
        try:
            results.append(np.concatenate([c.samples for c in sink]))
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            results.append(exc)
    return results


@pytest.fixture(scope="module")
def alone(v2: Engine) -> list[np.ndarray]:
    return [_alone(v2, r) for r in REQUESTS]


def test_mixed_requests_together_equal_each_alone(v2: Engine, alone: list[np.ndarray]) -> None:
    steps, rows = v2.loop.steps, v2.loop.rows_stepped
    together = _together(v2, REQUESTS)
    assert v2.loop.rows_stepped - rows > v2.loop.steps - steps > 0  # rows really shared steps
    for request, a, b in zip(REQUESTS, alone, together, strict=True):
        assert a.shape == b.shape, request
        np.testing.assert_allclose(b, a, atol=TOL, rtol=0, err_msg=str(request.mode))
    assert v2.loop.active == 0


def test_streams_chunks_are_computed_together_and_equal_alone(v2: Engine) -> None:
    """Streams that decode together reach their pieces at the same steps: their flow calls run
    as one batch (fewer flow calls than streams' pieces) and each stream's audio equals it
    alone."""
    fixed = dict(stream=True, ignore_eos=True)  # every stream reaches its first two pieces
    streams = [
        _request("今天天气真好，我们出去走走吧。", 11, max_speech_tokens=90, **fixed),
        _request("今天天气真好，我们出去走走吧。", 12, max_speech_tokens=90, **fixed),
        _request("Nice to meet you, how are you?", 13, max_speech_tokens=80, **fixed),
        # several text segments: each segment's end runs before the next segment's chunks
        _request(
            "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。"
            * 3,
            14,
            stream=True,
            max_speech_tokens=30,
        ),
    ]
    solo = [_alone(v2, r) for r in streams]
    calls, chunks = v2.loop.flow_calls
    together = _together(v2, streams)
    new_calls, new_chunks = v2.loop.flow_calls
    assert new_chunks - chunks > new_calls - calls > 0  # chunks really shared flow calls
    for a, b in zip(solo, together, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=TOL, rtol=0)


@pytest.mark.parametrize("version", [2, 3])
def test_streams_pieces_vocoded_together_equal_alone(version: int) -> None:
    """With ``vocoder_batch`` (the default on accelerators) the pieces that streams' shared flow
    calls complete are vocoded as one padded batch too, and each stream's audio equals it
    alone (the v2 cross-fade and the v3 window: f0 and source per stream, the convolutions
    batched: float32 convolutions of several rows round differently from one row's, which put
    one sample of 86,400 of a tiny v3 stream 1.01e-4 away, hence 2e-4 here)."""
    engine = Engine.load(DATA / "models" / f"v{version}-tiny", max_batch=8, audio_workers=1)
    assert not engine.pipeline.vocoder_batch  # on a CPU one piece after another
    engine.pipeline.vocoder_batch = True  # as on an accelerator
    fixed = dict(stream=True, ignore_eos=True)
    streams = [
        _request("今天天气真好，我们出去走走吧。", 21, max_speech_tokens=90, **fixed),
        _request("Nice to meet you, how are you?", 22, max_speech_tokens=70, **fixed),
        _request("你好。", 23, mode=Mode.CROSS_LINGUAL, max_speech_tokens=80, **fixed),
    ]
    try:
        solo = [_alone(engine, r) for r in streams]
        assert engine.pipeline.vocoder_batches == 0
        together = _together(engine, streams)
        assert engine.pipeline.vocoder_batches > 0
    finally:
        engine.close()
    for a, b in zip(solo, together, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=2 * TOL, rtol=0)


def test_a_request_joining_mid_way_equals_alone(v2: Engine, alone: list[np.ndarray]) -> None:
    first, later = QueueSink(), QueueSink()
    v2.submit(REQUESTS[1], first)  # streaming: its first chunk comes while it still decodes
    chunks = iter(first)
    head = [next(chunks)]
    v2.submit(REQUESTS[0], later)
    rest = list(chunks)
    joined = np.concatenate([c.samples for c in later])
    np.testing.assert_allclose(
        np.concatenate([c.samples for c in head + rest]), alone[1], atol=TOL, rtol=0
    )
    np.testing.assert_allclose(joined, alone[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_int8_requests_together_or_joining_equal_each_alone(version: int) -> None:
    """With ``quantize="int8"`` too a seeded request's tokens do not depend on the requests that
    share its steps. onnxruntime's ``MatMulNBits`` computes rows in pairs and a row left over (a
    lone row) on another path (up to 7e-7 apart), and the next layer's block-wise activation
    codes can turn that into a whole quantisation step: these requests' tokens diverged mid-way
    (the v1 voice at token 16, the v2 stream at token 40) before ``Int8Linear`` paired a leftover
    row with its copy. Equal waveforms (same length, 1e-4) mean equal tokens: a changed token
    moves them by ~1."""
    engine = Engine.load(DATA / "models" / f"v{version}-tiny", max_batch=8, quantize="int8")
    requests = [
        _request("今天天气真好，我们出去走走吧。", 6, stream=True, max_speech_tokens=90,
                 ignore_eos=True),
        _request("你好。", 4, mode=Mode.PRESET, voice="中文女", prompt_audio=None),
        _request("Nice to meet you.", 3, mode=Mode.CROSS_LINGUAL),
    ]  # fmt: skip
    try:
        solo = [_alone(engine, r) for r in requests]
        steps, rows = engine.loop.steps, engine.loop.rows_stepped
        together = _together(engine, requests)
        assert engine.loop.rows_stepped - rows > engine.loop.steps - steps  # shared steps
        # joins: the stream decodes alone until its first piece, then the others join it
        sinks = [QueueSink() for _ in requests]
        engine.submit(requests[0], sinks[0])
        chunks = iter(sinks[0])
        stream = [next(chunks)]
        for request, sink in zip(requests[1:], sinks[1:], strict=True):
            engine.submit(request, sink)
        stream += list(chunks)
        joined = [np.concatenate([c.samples for c in stream])]
        joined += [np.concatenate([c.samples for c in sink]) for sink in sinks[1:]]
    finally:
        engine.close()
    for request, a, b, c in zip(requests, solo, together, joined, strict=True):
        for other in (b, c):
            assert a.shape == other.shape, request
            np.testing.assert_allclose(other, a, atol=TOL, rtol=0, err_msg=str(request.mode))


def test_cancelled_row_leaves_and_frees_while_others_go_on(v2: Engine, alone) -> None:
    cancelled, other = QueueSink(), QueueSink()
    long = _request(
        "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。",
        9,
        stream=True,
        max_speech_tokens=400,
    )
    job = v2.submit(long, cancelled)
    v2.submit(REQUESTS[0], other)
    first = next(iter(cancelled))
    assert first.samples.size > 0
    job.cancel()
    np.testing.assert_allclose(
        np.concatenate([c.samples for c in other]), alone[0], atol=TOL, rtol=0
    )
    deadline = time.monotonic() + 10
    while v2.loop.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert v2.loop.active == 0  # the cancelled row (its caches) is gone


def test_a_failing_request_fails_alone(v2: Engine, alone) -> None:
    bad_prompt = _request("你好。", 7, prompt_audio=b"not audio at all")
    results = _together(v2, [REQUESTS[0], bad_prompt, REQUESTS[2]])
    assert isinstance(results[1], AudioError)
    np.testing.assert_allclose(results[0], alone[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(results[2], alone[2], atol=TOL, rtol=0)


def test_an_exception_inside_a_row_fails_only_that_row(v2: Engine, alone) -> None:
    def broken_prompt():
        raise RuntimeError("the voice store went away")

    sink, other = QueueSink(), QueueSink()
    v2.submit(REQUESTS[0], other)
    v2.submit(REQUESTS[0], sink, prompt=broken_prompt)
    with pytest.raises(RuntimeError, match="voice store"):
        list(sink)
    np.testing.assert_allclose(
        np.concatenate([c.samples for c in other]), alone[0], atol=TOL, rtol=0
    )


@contextlib.contextmanager
def _value_error_inside_one_stream_s_encoding(flow: torch.nn.Module, victim_frames: int):
    """Raise a ValueError inside one stream's part of the v2 flow's shared ``stream_steps``
    (the stream whose voice has at most ``victim_frames`` prompt frames, past its first call),
    after the streams before it in the call have advanced. No public hook sees which stream an
    increment belongs to, so this wraps the flow's per-stream encoder step, a private method."""
    encode = flow._encode_increment

    def failing_for_the_victim(state, *args, **kwargs):
        if state.prompt_feat.shape[1] <= victim_frames and state.tokens_done > 0:
            raise ValueError("a network's internal check failed for this stream")
        return encode(state, *args, **kwargs)

    flow._encode_increment = failing_for_the_victim
    try:
        yield
    finally:
        del flow._encode_increment


def test_an_error_inside_one_stream_of_a_shared_flow_call_never_gives_others_wrong_audio() -> None:
    """A ValueError raised inside one stream's part of a batched flow call (after the streams
    before it had advanced) was taken for a bad call found before any change: every stream was
    run again alone, feeding the advanced ones their tokens twice, and the others ended "done"
    with 89,280 samples where alone gives 86,400. Only a bad call (StreamCallError) reruns the
    streams alone; any other error fails the call's rows, never wrong audio."""
    engine = Engine.load(DATA / "models" / "v2-tiny", max_batch=8, audio_workers=1)
    fixed = dict(stream=True, ignore_eos=True, max_speech_tokens=90)
    other_prompt = DATA / "audio" / "en_22k.wav"
    victim_text = "Hello, this is a short prompt for testing."
    streams = [
        _request("今天天气真好，我们出去走走吧。", 11, **fixed),
        _request("Nice to meet you, how are you?", 13, **fixed),
        _request(
            "你好，你好，你好。", 14, prompt_audio=other_prompt, prompt_text=victim_text, **fixed
        ),
    ]
    victim_frames = engine.encode_prompt(other_prompt, victim_text).speech_feat.shape[1]
    try:
        solo = [_alone(engine, r) for r in streams[:2]]
        with _value_error_inside_one_stream_s_encoding(engine.pipeline.flow, victim_frames):
            together = _together(engine, streams)
    finally:
        engine.close()
    assert isinstance(together[2], ValueError)
    for a, b in zip(solo, together[:2], strict=True):
        if not isinstance(b, BaseException):  # a row failed with the call is fine, wrong audio not
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, atol=TOL, rtol=0)


def test_a_bad_flow_call_of_one_stream_fails_it_alone_and_the_others_go_on() -> None:
    """A stream whose flow call is bad (here: past the flow's fixed noise, shortened for the
    test) is found before any stream of the shared call changes (``StreamCallError``): that
    stream fails, and the others, computed again one by one, sound as alone."""
    engine = Engine.load(DATA / "models" / "v2-tiny", max_batch=8, audio_workers=1)
    fixed = dict(stream=True, ignore_eos=True, max_speech_tokens=90)
    short_prompt = dict(
        prompt_audio=DATA / "audio" / "en_22k.wav",
        prompt_text="Hello, this is a short prompt for testing.",
    )
    streams = [
        _request("今天天气真好，我们出去走走吧。", 11, **short_prompt, **fixed),
        _request("Nice to meet you, how are you?", 13, **short_prompt, **fixed),
        _request("你好，你好，你好。", 14, **fixed),  # a longer prompt: more frames
    ]
    cfm = engine.pipeline.flow.decoder
    noise = cfm.rand_noise
    frames = [
        engine.encode_prompt(r.prompt_audio, r.prompt_text).speech_feat.shape[1] for r in streams
    ]
    try:
        solo = [_alone(engine, r) for r in streams[:2]]
        cfm.rand_noise = noise[:, :, : max(frames[:2]) + 2 * 90 + 10]
        assert frames[2] + 2 * 90 > cfm.rand_noise.shape[2]
        calls, chunks = engine.loop.flow_calls
        together = _together(engine, streams)
        after = engine.loop.flow_calls
        assert after[0] - calls < after[1] - chunks  # streams shared flow calls
    finally:
        cfm.rand_noise = noise
        engine.close()
    assert isinstance(together[2], ValueError) and "at most" in str(together[2])
    for a, b in zip(solo, together[:2], strict=True):
        assert not isinstance(b, BaseException), b
        np.testing.assert_allclose(b, a, atol=TOL, rtol=0)


def test_a_base_exception_vocoding_one_stream_s_piece_fails_that_stream_alone() -> None:
    """The pieces of a shared flow call are vocoded one stream after another (on a CPU): a
    BaseException there (SystemExit from a library, say) failed every stream of the call, and
    fails the stream whose piece raised it alone now."""
    engine = Engine.load(DATA / "models" / "v2-tiny", max_batch=8, audio_workers=1)
    fixed = dict(stream=True, ignore_eos=True, max_speech_tokens=60)
    streams = [
        _request("今天天气真好，我们出去走走吧。", 11, **fixed),
        _request("Nice to meet you, how are you?", 13, **fixed),
        _request("你好，你好，你好。", 14, **fixed),
    ]
    vocoded = itertools.count()

    def exit_on_the_first_piece(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if next(vocoded) == 0:
            raise SystemExit(3)

    try:
        solo = [_alone(engine, r) for r in streams]
        calls, chunks = engine.loop.flow_calls
        handle = engine.pipeline.hift.f0_predictor.register_forward_pre_hook(
            exit_on_the_first_piece
        )
        try:
            together = _together(engine, streams)
        finally:
            handle.remove()
        after = engine.loop.flow_calls
        assert after[0] - calls < after[1] - chunks  # streams shared flow calls
    finally:
        engine.close()
    failed = [i for i, result in enumerate(together) if isinstance(result, BaseException)]
    assert len(failed) == 1 and "SystemExit(3)" in str(together[failed[0]])
    for i, (a, b) in enumerate(zip(solo, together, strict=True)):
        if i not in failed:
            np.testing.assert_allclose(b, a, atol=TOL, rtol=0)


def test_a_failed_batched_step_goes_on_from_clean_caches() -> None:
    """A step of several rows that raises (say, out of memory in one layer) is retried row by
    row. It had reserved every row's new positions before failing: rewound, each row goes on
    exactly as alone, not attending over the failed step's half-written keys and values."""
    engine = Engine.load(DATA / "models" / "v2-tiny", max_batch=8, capture_graphs=False)
    requests = [
        _request("你好。", 1, max_speech_tokens=30, ignore_eos=True),
        _request("今天天气真好。", 2, mode=Mode.PRESET, voice="中文女", prompt_audio=None,
                 max_speech_tokens=30, ignore_eos=True),
    ]  # fmt: skip
    try:
        alone = [_alone(engine, request) for request in requests]
        two_row_calls = itertools.count()

        def fail_once(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if inputs[0].size(0) == 2 and next(two_row_calls) == 9:
                raise RuntimeError("one batched step failed")

        layer = engine.pipeline.llm.llm.model.model.layers[1]
        handle = layer.mlp.register_forward_pre_hook(fail_once)
        try:
            together = _together(engine, requests)
        finally:
            handle.remove()
        assert next(two_row_calls) > 10  # the fault fired mid-way through batched steps
        for a, b in zip(alone, together, strict=True):
            np.testing.assert_allclose(b, a, atol=TOL, rtol=0)
    finally:
        engine.close()


@pytest.mark.parametrize("model", ["v1-tiny", "v2-tiny"])
def test_a_seeded_request_of_several_segments_does_not_depend_on_timing(model: str) -> None:
    """Without streaming, sampling and the audio stage's noise (the vocoder's; v1's flow too)
    draw from one generator in the official order, segment by segment. The next segment's
    sampling waits for the previous segment's audio, so a slow vocoder changes nothing."""
    engine = Engine.load(DATA / "models" / model)
    text = "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。" * 3
    request = SynthesisRequest(
        Mode.PRESET, text, voice="中文女", seed=3, max_speech_tokens=30, ignore_eos=True
    )
    try:
        chunks = list(engine.synthesize(request))
        assert len({chunk.segment for chunk in chunks}) > 1
        quick = np.concatenate([chunk.samples for chunk in chunks])

        def slow_down(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            time.sleep(0.3)  # before the vocoder draws its source noise

        handle = engine.pipeline.hift.f0_predictor.register_forward_pre_hook(slow_down)
        waits = engine.loop.waits
        try:
            slow = _alone(engine, request)
        finally:
            handle.remove()
        np.testing.assert_array_equal(slow, quick)
        # the next segment is woken when the audio before it is out, not looked for every 5 ms
        assert engine.loop.waits - waits < 10
    finally:
        engine.close()


def test_a_stream_cancelled_during_its_first_piece_does_not_hold_the_others() -> None:
    """Decoding waits (5 s at most) while a stream's first piece is computed. A stream cancelled
    meanwhile (its client gone) will never deliver it: the other rows go on at once."""
    engine = Engine.load(DATA / "models" / "v2-tiny", capture_graphs=False)
    steps: list[float] = []
    first_piece = threading.Event()

    def slow_first_piece(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not first_piece.is_set():
            first_piece.set()
            time.sleep(1.0)

    hooks = [
        engine.pipeline.llm.llm_decoder.register_forward_pre_hook(
            lambda module, inputs: steps.append(time.monotonic())
        ),
        engine.pipeline.hift.f0_predictor.register_forward_pre_hook(slow_first_piece),
    ]
    text = "今天天气真好，我们出去走走吧。"
    try:
        stream, other = QueueSink(), QueueSink()
        options = dict(mode=Mode.PRESET, voice="中文女", max_speech_tokens=300, ignore_eos=True)
        job = engine.submit(SynthesisRequest(text=text, seed=1, stream=True, **options), stream)
        engine.submit(SynthesisRequest(text=text, seed=2, **options), other)
        assert first_piece.wait(60)
        cancelled_at = time.monotonic()
        job.cancel()
        assert np.concatenate([c.samples for c in other]).size > 0
        gaps = np.diff([cancelled_at] + [t for t in steps if t > cancelled_at])
        assert gaps.max() < 2.5, gaps.max()  # the piece's own second, not the 5 s bound
    finally:
        for hook in hooks:
            hook.remove()
        engine.close()


class _TimedSink(QueueSink):
    """A sink that notes when its request ended."""

    ended_at: float | None = None

    def end(self, error: BaseException | None) -> None:
        self.ended_at = time.monotonic()
        super().end(error)


def _preset(seed: int, tokens: int, text: str = "今天天气真好。", **kwargs) -> SynthesisRequest:
    return SynthesisRequest(
        Mode.PRESET, text, voice="中文女", seed=seed, max_speech_tokens=tokens, ignore_eos=True,
        **kwargs,
    )  # fmt: skip


def test_a_queued_request_cancelled_ends_before_a_row_frees() -> None:
    """A request waiting for a free row (the batch is full) whose client leaves ends at the next
    step: it must not hold its place (a server's worker slot) until some row finishes."""
    engine = Engine.load(DATA / "models" / "v2-tiny", max_batch=1)
    try:
        running, queued = _TimedSink(), _TimedSink()
        first = engine.submit(_preset(1, 3000), running)
        assert wait_for(lambda: engine.loop.decoding == 1, timeout=60)
        job = engine.submit(_preset(2, 20), queued)
        cancelled_at = time.monotonic()
        job.cancel()
        assert list(queued) == []
        assert queued.ended_at - cancelled_at < 1.0
        assert running.ended_at is None  # the row it waited for is still decoding
        first.cancel()
        list(running)
    finally:
        engine.close()


def test_a_request_being_prepared_holds_up_no_other_that_could_start() -> None:
    """A slow preparation (a long text, a new prompt) ahead of or behind a request does not
    delay it where it could not have joined its step anyway (here one row at most), and a queued
    request cancelled meanwhile ends at once, with the loop idle."""
    engine = Engine.load(DATA / "models" / "v2-tiny", max_batch=1)
    features = engine.encode_prompt(PROMPT, PROMPT_TEXT)

    def slow_prompt():
        time.sleep(2.0)
        return features

    slow_request = _request("你好。", 2, max_speech_tokens=5, ignore_eos=True)
    try:
        list(engine.synthesize(_preset(9, 5)))  # warm
        stream, slow = _TimedSink(), _TimedSink()
        start = time.monotonic()
        engine.submit(_preset(1, 5, stream=True), stream)
        engine.submit(slow_request, slow, prompt=slow_prompt)
        first = next(iter(stream))
        assert first.samples.size > 0 and time.monotonic() - start < 1.5
        list(stream), list(slow)

        waiting, busy = _TimedSink(), _TimedSink()
        long = engine.submit(_preset(4, 3000), busy)  # holds the one row
        engine.submit(slow_request, _TimedSink(), prompt=slow_prompt)
        job = engine.submit(_preset(3, 5), waiting)
        time.sleep(0.2)
        cancelled_at = time.monotonic()
        job.cancel()
        assert list(waiting) == []
        assert waiting.ended_at - cancelled_at < 0.5
        long.cancel()
        list(busy)
    finally:
        engine.close()


def test_a_sink_that_fails_at_its_end_fails_no_other_request(v2: Engine) -> None:
    """A caller's sink that raises when its request ends (here: cancelled mid-way) is logged;
    the loop and the other rows go on."""

    class Failing(QueueSink):
        def end(self, error: BaseException | None) -> None:
            raise RuntimeError("the caller's sink broke")

    request = _preset(2, 200)
    alone = _alone(v2, request)
    good = QueueSink()
    v2.submit(request, good)
    job = v2.submit(_preset(3, 3000), Failing())
    assert wait_for(lambda: v2.loop.decoding == 2, timeout=60)
    job.cancel()
    np.testing.assert_allclose(np.concatenate([c.samples for c in good]), alone, atol=TOL, rtol=0)


def test_closing_with_requests_in_flight_lets_go_of_them() -> None:
    """close() ends every request with EngineClosedError and drops their rows: their caches and
    a streaming text's feeder thread, which stops pulling from the caller's iterator. (With
    several rows decoding, every second one had been skipped: never ended, its feeder alive.)"""
    from cosyvoice_lite.errors import EngineClosedError

    engine = Engine.load(DATA / "models" / "v2-tiny")
    pulled: list[int] = []

    def endless_text():
        while True:
            pulled.append(1)
            time.sleep(0.02)
            yield "今天天气真好，"

    sinks = [QueueSink() for _ in range(4)]
    for seed, sink in enumerate(sinks[:2]):
        engine.submit(_preset(seed, 3000, endless_text(), stream=True), sink)
    for seed, sink in enumerate(sinks[2:], start=2):
        engine.submit(_preset(seed, 3000), sink)
    assert wait_for(lambda: engine.loop.decoding == 4 and len(pulled) > 10, timeout=60)
    engine.close()
    for sink in sinks:
        with pytest.raises(EngineClosedError):
            list(sink)
    assert engine.loop.decoding == 0 and engine.loop.active == 0
    before = len(pulled)
    time.sleep(0.5)
    assert len(pulled) - before <= 3  # what the feeder had in hand, then nothing
    assert "text-source" not in {thread.name for thread in threading.enumerate()}


def test_preparing_a_request_does_not_stop_the_others_decoding() -> None:
    """A request's preparation (its text normalised, its prompt's features: seconds for a long
    text or a long new prompt) runs beside the loop, which goes on decoding the other rows."""
    engine = Engine.load(DATA / "models" / "v2-tiny", capture_graphs=False)
    steps: list[float] = []
    hook = engine.pipeline.llm.llm_decoder.register_forward_pre_hook(
        lambda module, inputs: steps.append(time.monotonic())
    )
    features = engine.encode_prompt(PROMPT, PROMPT_TEXT)

    def slow_prompt():
        time.sleep(1.5)
        return features

    try:
        running = QueueSink()
        engine.submit(_preset(1, 3000), running)
        assert wait_for(lambda: len(steps) > 5, timeout=60)
        slow, submitted_at = QueueSink(), time.monotonic()
        engine.submit(_request("你好。", 2, max_speech_tokens=10), slow, prompt=slow_prompt)
        assert np.concatenate([c.samples for c in slow]).size > 0
        gaps = np.diff([t for t in steps if t > submitted_at])
        assert gaps.size > 10 and gaps.max() < 1.0, gaps.max()
    finally:
        hook.remove()
        engine.close()


def test_a_slow_preparation_does_not_hold_back_later_requests(v2: Engine) -> None:
    """Requests are prepared on more than one thread: a request whose preparation is slow (a
    long new prompt's features: seconds) does not hold back the start of the requests submitted
    after it, which had each waited for it with rows free."""
    features = v2.encode_prompt(PROMPT, PROMPT_TEXT)
    release = threading.Event()

    def blocked_prompt():
        release.wait(timeout=60)
        return features

    slow = QueueSink()
    v2.submit(_request("你好。", 2, max_speech_tokens=10), slow, prompt=blocked_prompt)
    try:
        quick = v2.synthesize(_preset(3, 10))
        assert np.concatenate([chunk.samples for chunk in quick]).size > 0
        assert not release.is_set()  # done while the other was still being prepared
    finally:
        release.set()
    assert np.concatenate([chunk.samples for chunk in slow]).size > 0


def test_fixed_length_decoding_for_benchmarks(v2: Engine) -> None:
    request = _request("你好。", 3, max_speech_tokens=17, ignore_eos=True)
    audio = _alone(v2, request)
    assert audio.size == 17 * 2 * 480  # 17 tokens, 2 mel frames each, 480 samples per frame


@pytest.mark.parametrize("version", [2, 3])
def test_whole_utterances_ending_together_share_one_flow_batch(version: int) -> None:
    """Whole (not streamed) utterances that end at one step, with prompts of different lengths
    (two voices, none; two voice conversions), have their flow and vocoder computed as padded
    batches (``batch_utterances`` and ``vocoder_batch``, the defaults on accelerators) and each
    sounds as alone. The mels agree within 1e-4 (the flow tests) and a batch's vocoder gives each
    row's waveform within 1e-4 of the same mel alone (test_hift.py); the vocoder's source phase
    accumulates the mels' ~1e-6 float differences over the utterance, so the waveforms agree to
    ~1e-2 (up to 2.3e-2 measured in float32; bound 5e-2, as the parity tests' phase bound; a wrong
    row would be off by its whole scale)."""
    engine = Engine.load(
        DATA / "models" / f"v{version}-tiny", max_batch=8, audio_workers=1, batch_utterances=True
    )
    assert engine.pipeline.utterance_batch == 8
    assert not engine.pipeline.vocoder_batch  # on a CPU one utterance after another
    engine.pipeline.vocoder_batch = True  # as on an accelerator
    same_end = dict(ignore_eos=True, max_speech_tokens=30)
    requests = [
        _request("你好。", 1, **same_end),
        _request(
            "今天天气真好，我们出去走走吧。", 2, prompt_audio=DATA / "audio" / "en_22k.wav",
            prompt_text="Hello, this is a short prompt for testing.", **same_end,
        ),
        _request("Nice to meet you.", 3, mode=Mode.CROSS_LINGUAL, **same_end),
    ]  # fmt: skip
    # voice conversion: every token at the first step, prompt mel not aligned to its tokens
    requests += [
        SynthesisRequest(
            mode=Mode.VOICE_CONVERSION, source_audio=DATA / "audio" / "en_22k.wav",
            prompt_audio=prompt, seed=4,
        )
        for prompt in (PROMPT, DATA / "audio" / "zh_24k.wav")
    ]  # fmt: skip
    try:
        solo = [_alone(engine, r) for r in requests]
        batches = engine.loop.utterance_batches
        together = _together(engine, requests)
        assert engine.loop.utterance_batches == batches + 2
    finally:
        engine.close()
    for a, b in zip(solo, together, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=5e-2, rtol=0)


def test_a_base_exception_in_one_whole_utterance_of_a_batch_fails_that_request_alone() -> None:
    """A BaseException (SystemExit from a library, say) inside a batch of whole utterances got
    past the batch's retry, which caught only Exception, and failed every request on that audio
    worker. It goes the way of any error now: the batch is computed again utterance by
    utterance, and only the utterance that raises fails (its row's error names it)."""
    engine = Engine.load(
        DATA / "models" / "v2-tiny", max_batch=8, audio_workers=1, batch_utterances=True
    )
    engine.pipeline.vocoder_batch = True  # as on an accelerator
    same_end = dict(ignore_eos=True, max_speech_tokens=20)
    requests = [
        _request("你好。", 1, **same_end),
        _request("Nice to meet you.", 3, mode=Mode.CROSS_LINGUAL, **same_end),
        _request(
            "今天天气真好。", 2, prompt_audio=DATA / "audio" / "en_22k.wav",
            prompt_text="Hello, this is a short prompt for testing.", **same_end,
        ),
    ]  # fmt: skip
    lengths: list[set[int]] = []  # each solo request's encoder rows (prompt and speech tokens)

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        lengths[-1].update(inputs[1].tolist())

    def exit_for_the_victim(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if victim & set(inputs[1].tolist()):
            raise SystemExit(3)

    encoder = engine.pipeline.flow.encoder  # run by whole utterances only, not by streams
    try:
        handle = encoder.register_forward_pre_hook(record)
        solo = []
        for request in requests:
            lengths.append(set())
            solo.append(_alone(engine, request))
        handle.remove()
        victim = lengths[2] - lengths[0] - lengths[1]
        assert victim
        batches = engine.loop.utterance_batches
        handle = encoder.register_forward_pre_hook(exit_for_the_victim)
        try:
            together = _together(engine, requests)
        finally:
            handle.remove()
        assert engine.loop.utterance_batches == batches  # the batch failed: each alone
    finally:
        engine.close()
    assert isinstance(together[2], RuntimeError) and "SystemExit(3)" in str(together[2])
    for a, b in zip(solo[:2], together[:2], strict=True):
        assert not isinstance(b, BaseException), b
        np.testing.assert_array_equal(b, a)


def test_utterance_groups_bound_rows_and_padding() -> None:
    assert utterance_groups([100, 400, 110, 105, 390], max_rows=8) == [[0, 3, 2], [4, 1]]
    assert utterance_groups([100] * 5, max_rows=2) == [[0, 1], [2, 3], [4]]
    assert utterance_groups([50], max_rows=1) == [[0]]


def test_whole_utterances_are_batched_by_default_on_accelerators_only() -> None:
    cpu = Placement(torch.device("cpu"), torch.bfloat16)
    cuda = Placement(torch.device("cuda"), torch.bfloat16)
    assert utterance_batch_size(cpu, "torch", 16, None) == 1
    assert utterance_batch_size(cuda, "torch", 16, None) == 16
    assert utterance_batch_size(cpu, "torch", 16, True) == 16
    assert utterance_batch_size(cuda, "torch", 16, False) == 1
    assert utterance_batch_size(cuda, "onnxruntime", 16, True) == 1


def test_max_batch_bounds_the_rows_stepped_together(tmp_path: Path) -> None:
    engine = Engine.load(DATA / "models" / "v2-tiny", max_batch=2)
    seen: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(engine.loop.decoding)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = _together(engine, [_request("你好。", s, max_speech_tokens=15) for s in range(4)])
    finally:
        stop.set()
        watcher.join()
        engine.close()
    assert all(isinstance(r, np.ndarray) and r.size for r in results)
    assert max(seen) == 2


def test_a_process_exits_cleanly_after_synthesis_without_close(tmp_path: Path) -> None:
    """Engine threads still inside a torch op when the interpreter finalizes would abort the
    process (status 134): running loops are closed at exit, and close() waits for its workers."""
    script = tmp_path / "speak.py"
    script.write_text(
        "from pathlib import Path\n"
        "from cosyvoice_lite import Engine, Mode, SynthesisRequest\n"
        f"engine = Engine.load(Path({str(DATA / 'models' / 'v2-tiny')!r}))\n"
        "request = SynthesisRequest(\n"
        f"    mode=Mode.ZERO_SHOT, text='你好。', prompt_audio=Path({str(PROMPT)!r}).read_bytes(),\n"
        f"    prompt_text={PROMPT_TEXT!r}, stream=True, max_speech_tokens=40, seed=1)\n"
        "print(sum(c.samples.size for c in engine.synthesize(request)))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 0


def test_closing_stops_background_work_between_its_steps() -> None:
    """Work of no row (the flow's graphs traced after a load: ~20 s for a full-size CosyVoice2 on
    2 AVX2 cores) stops at its next step once the engine closes, so a process that exits right
    after loading neither waits for all of it nor aborts inside a torch op (status 134)."""
    from cosyvoice_lite.errors import EngineClosedError
    from cosyvoice_lite.networks.abort import check

    engine = Engine.load(DATA / "models" / "v2-tiny", capture_graphs=False)
    started = threading.Event()

    def long_computation() -> None:
        started.set()
        while True:
            check("the next step")
            time.sleep(0.01)

    work = engine.loop.background(long_computation)
    assert started.wait(10)
    begin = time.monotonic()
    engine.close()
    assert time.monotonic() - begin < 5
    with pytest.raises(EngineClosedError):
        work.result(timeout=1)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_first_piece_tokens_is_when_a_stream_gives_its_first_audio(
    version: int, v1_dir: Path
) -> None:
    """The loop holds decoding once a stream has the tokens its first piece needs
    (``Segment.first_piece_tokens``), so that count must be exactly where the audio stage gives
    its first piece: any later and decoding would wait for tokens it holds back."""
    from cosyvoice_lite.pipelines.common import ModelInputs

    engine = Engine.load(v1_dir if version == 1 else DATA / "models" / f"v{version}-tiny")
    prompt = 7  # v2/v3: the first piece pads prompt + hop to whole 25-token chunks
    frames = 0 if version == 1 else 2 * prompt
    inputs = ModelInputs(
        text=None,
        prompt_text=torch.zeros(1, 0, dtype=torch.int32),
        llm_prompt_speech_token=torch.zeros(1, 0, dtype=torch.int32),
        llm_embedding=torch.zeros(1, 192),
        flow_prompt_speech_token=torch.arange(prompt if version > 1 else 0, dtype=torch.int32)[
            None
        ],
        prompt_speech_feat=torch.zeros(1, frames, 80),
        flow_embedding=torch.zeros(1, 192),
    )
    pipeline = engine.pipeline
    assert pipeline.start(inputs, torch.Generator(), False, 1.0).first_piece_tokens is None
    segment = pipeline.start(inputs, torch.Generator().manual_seed(0), True, 1.0)
    with torch.inference_mode():
        for count in range(1, 200):
            if segment.push(count % 50) is not None:
                break
    assert count == segment.first_piece_tokens
    engine.close()


def test_decoding_waits_for_a_late_voices_first_piece() -> None:
    """A new voice's prompt frames go through the flow first (here made to take longer than the
    loop's bounded wait for a first piece), so the stream's first flow call starts after that
    wait has run out. The call then gets the cores: decoding waits between its start and the
    first audio (22 steps there before)."""
    from cosyvoice_lite.engine_loop import FIRST_CHUNK_PRIORITY_SECONDS

    engine = Engine.load(DATA / "models" / "v2-tiny")
    engine.graphs_traced.result()  # not on the worker while the calls are timed
    pipeline, cache = engine.pipeline, engine.pipeline.prompt_flows
    steps: list[float] = []
    calls: list[float] = []
    log_probs, flow_steps, prime = pipeline.llm.log_probs, pipeline.flow_steps, cache.stream

    def timed_step(*args, **kwargs):
        steps.append(time.monotonic())
        time.sleep(0.01)  # a step of a full-size LLM is slower than the tiny one's
        return log_probs(*args, **kwargs)

    def timed_flow(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(0.2)
        return flow_steps(*args, **kwargs)

    def slow_prime(*args, **kwargs):
        time.sleep(FIRST_CHUNK_PRIORITY_SECONDS + 0.5)
        return prime(*args, **kwargs)

    pipeline.llm.log_probs, pipeline.flow_steps, cache.stream = timed_step, timed_flow, slow_prime
    request = _request(
        "今天天气真好，我们出去走走吧。", 7, stream=True, max_speech_tokens=200, ignore_eos=True
    )
    try:
        chunks = engine.synthesize(request)
        next(chunks)
        first_audio = time.monotonic()
        before = [t for t in calls if t < first_audio]
        during = [t for t in steps if before[0] < t < first_audio]
        # (a step may slip in as each call starts, checked just before the worker said it was busy)
        assert len(before) >= 1 and len(during) <= len(before), (len(before), len(during))
        assert sum(c.samples.size for c in chunks) > 0
    finally:
        engine.close()


def test_stream_flow_calls_leave_decoding_a_core_and_whole_utterances_never() -> None:
    """On 2 threads a stream's flow calls computed while the loop decodes take one row thread
    (one share of the CFG rows: row_parallel.at_most), those made while nothing decodes both
    (two shares); the audio equals an engine's that never narrows. A whole utterance computed
    while a stream decodes is never narrowed (its rows may round differently in another share):
    the same audio as alone, to the bit. (Shares on every host: the engine's choice on a CPU
    with packed products, and the one whose narrowing the slices show.)"""
    from cosyvoice_lite.row_parallel import RowSplit

    class Recording(RowSplit):
        def __init__(self, loop) -> None:
            super().__init__(2, shares=True)
            self.loop = loop
            self.calls: list[tuple[int, bool]] = []  # (slices, decoding when it started)

        def map(self, fn, rows: int) -> torch.Tensor:
            parts: list[slice] = []
            decoding = self.loop.decoding > 0
            out = super().map(lambda part: parts.append(part) or fn(part), rows)
            self.calls.append((len(parts), decoding))
            return out

    def slow(step):
        def decode(*args, **kwargs):
            time.sleep(0.005)  # a step of a full-size LLM is slower than the tiny one's
            return step(*args, **kwargs)

        return decode

    # 120 tokens: its second piece's flow call is made while the loop decodes on
    request = _request(
        "今天天气真好，我们出去走走吧。", 7, stream=True, max_speech_tokens=120, ignore_eos=True
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        narrowing = Engine.load(DATA / "models" / "v2-tiny")
        wide = Engine.load(DATA / "models" / "v2-tiny", flow_threads_while_decoding=2)
    finally:
        torch.set_num_threads(before)
    try:
        for engine in (narrowing, wide):
            engine.graphs_traced.result()  # its flow calls done before the row splits change
            decoder = engine.pipeline.flow.decoder
            decoder.close_row_split()
            decoder.set_row_split(Recording(engine.loop), utterances=False)
            decoder.utterance_rows = Recording(engine.loop)
            engine.pipeline.llm.log_probs = slow(engine.pipeline.llm.log_probs)
        audio = [_alone(engine, request) for engine in (narrowing, wide)]
        np.testing.assert_array_equal(audio[0], audio[1])
        narrow_calls = narrowing.pipeline.flow.decoder.stream_rows.calls
        assert (1, True) in narrow_calls, narrow_calls
        assert {slices for slices, decoding in narrow_calls if not decoding} == {2}, narrow_calls
        assert {slices for slices, _ in wide.pipeline.flow.decoder.stream_rows.calls} == {2}
        whole = _request("你好。", 8, max_speech_tokens=20)
        solo = _alone(narrowing, whole)
        beside = _together(narrowing, [request, whole])
        np.testing.assert_array_equal(beside[1], solo)
        np.testing.assert_array_equal(beside[0], audio[0])
        utterance_calls = narrowing.pipeline.flow.decoder.utterance_rows.calls
        assert {slices for slices, _ in utterance_calls} == {2}
    finally:
        narrowing.close()
        wide.close()


def test_the_loop_hands_freed_memory_back_once_idle() -> None:
    """Once no request is live for ``idle_release_seconds``, the loop runs its idle hook (the
    heap's free pages back to the OS) once; never while a request is being computed."""
    idle = 1.0
    engine = Engine.load(DATA / "models" / "v2-tiny", idle_release_seconds=idle)
    try:
        loop = engine.loop
        request = _request("今天天气真好。", 5, stream=True, max_speech_tokens=60, ignore_eos=True)
        for round_ in (1, 2):
            for _ in engine.synthesize(request):
                assert loop.idle_calls == round_ - 1
            assert loop.idle_calls == round_ - 1  # not as soon as the request ends
            done = time.monotonic()
            while loop.idle_calls < round_ and time.monotonic() < done + 3 * idle + 5:
                time.sleep(0.02)
            assert loop.idle_calls == round_
            time.sleep(2 * idle)
            assert loop.idle_calls == round_  # once per idle period
    finally:
        engine.close()


def test_idle_release_can_be_turned_off_and_is_checked() -> None:
    engine = Engine.load(DATA / "models" / "v2-tiny", idle_release_seconds=None)
    try:
        assert sum(c.samples.size for c in engine.synthesize(_request("你好。", 1))) > 0
        time.sleep(1)
        assert engine.loop.idle_calls == 0
    finally:
        engine.close()
    with pytest.raises(InvalidRequestError, match="idle_release_seconds"):
        Engine.load(DATA / "models" / "v2-tiny", idle_release_seconds=0)


def test_a_stream_hands_freed_heap_back_after_each_flow_call(v2: Engine) -> None:
    """On a CPU the pipeline's after-call hook (the heap's free pages back to the OS) runs after
    every streaming flow call (its chunks and its end), and not for a whole utterance."""
    pipeline = v2.pipeline
    assert pipeline.after_stream_call is release_freed_memory
    calls: list[int] = []
    pipeline.after_stream_call = lambda: calls.append(1)
    try:
        before = v2.loop.flow_calls[0]
        assert _alone(v2, REQUESTS[1]).size > 0  # streamed, one segment
        chunk_calls = v2.loop.flow_calls[0] - before
        assert chunk_calls > 0
        assert len(calls) == chunk_calls + 1  # + the call that ends the stream
        _alone(v2, REQUESTS[0])  # not streamed
        assert len(calls) == chunk_calls + 1
    finally:
        pipeline.after_stream_call = release_freed_memory


def test_work_pending_at_close_ends_with_an_error(v1_dir: Path) -> None:
    """Calls and background work queued when the engine closes end (with EngineClosedError
    where they did not run), and a request cut off reports the same error."""
    from cosyvoice_lite import EngineClosedError

    engine = Engine.load(v1_dir)
    try:
        futures = [engine.call(lambda: 1) for _ in range(3)]
        futures += [engine.loop.background(lambda: 2) for _ in range(3)]
    finally:
        engine.close()
    for future in futures:  # each one ends: with its result, or with the engine's closing
        error = future.exception(timeout=20)
        assert isinstance(error, EngineClosedError) or future.result() in (1, 2)
    with pytest.raises(EngineClosedError):
        engine.call(lambda: 1)


def test_a_voice_conversion_source_is_read_beside_decoding_not_on_the_loop(v2: Engine) -> None:
    """A voice conversion's source was decoded and tokenised as its segment started, on the
    loop thread: every row (and the loop's health probe) waited meanwhile, 17 s for a crafted
    file. It is read on the preparing thread, as prompts are."""
    reading, release = threading.Event(), threading.Event()
    data = (DATA / "audio" / "en_22k.wav").read_bytes()

    class SlowUpload(io.RawIOBase):  # a client that sends its file slowly
        def read(self, size: int = -1) -> bytes:
            reading.set()
            release.wait(30)
            return data

    request = SynthesisRequest(Mode.VOICE_CONVERSION, source_audio=SlowUpload(),
                               prompt_audio=PROMPT, seed=4)  # fmt: skip
    result: list = []
    worker = threading.Thread(target=lambda: result.append(_alone(v2, request)))
    worker.start()
    try:
        assert reading.wait(30)
        assert v2.call(lambda: "answered").result(timeout=5) == "answered"
    finally:
        release.set()
        worker.join(60)
    assert result and result[0].size > 0


def test_threads_started_while_the_engine_rests_get_the_process_count(v2: Engine) -> None:
    """The loop thread's products switch its torch threads for each call, which also sets the
    count threads starting later take: after one float32 request, a program's new threads (a
    second engine's load, its own pool) got one thread."""

    def fresh_thread_count() -> int:
        counts: list[int] = []
        thread = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return counts[0]

    _alone(v2, REQUESTS[0])
    assert wait_for(lambda: fresh_thread_count() == v2.loop.threads, timeout=10)
