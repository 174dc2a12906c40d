"""Closing the engine: every caller gets an answer at once, and no engine thread is left.

A request may be queued, being prepared, decoding, or in its audio stage (its flow and vocoder
on an audio worker) when the engine closes; each ends with EngineClosedError, whatever the loop
thread is doing (a step may outlast close()'s wait), and the workers stop at their next step.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from test_server_support import wait_for

from cosyvoice_lite import Engine, EngineClosedError, Mode, SynthesisRequest
from cosyvoice_lite.engine import QueueSink
from cosyvoice_lite.engine_loop import MAX_AUDIO_WORKERS, MAX_IDLE_RELEASE_SECONDS, LoopLimits
from cosyvoice_lite.errors import InvalidRequestError

DATA = Path(__file__).resolve().parent / "data"
V2 = DATA / "models" / "v2-tiny"
PROMPT = DATA / "audio" / "zh_16k.wav"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"


def _preset(seed: int, tokens: int, **kwargs) -> SynthesisRequest:
    return SynthesisRequest(
        Mode.PRESET, "今天天气真好。", voice="中文女", seed=seed, max_speech_tokens=tokens,
        ignore_eos=True, **kwargs,
    )  # fmt: skip


def _engine_threads(before: set[threading.Thread]) -> list[str]:
    """The engine threads started since ``before`` that are still alive."""
    return [
        t.name for t in threading.enumerate() if t not in before and t.name.startswith("engine")
    ]


def _ends_with(sink: QueueSink, timeout: float) -> BaseException | str | None:
    """What the request ended with (its error; "audio" if it ended well), None if it did not end
    within ``timeout`` seconds."""
    result: list[BaseException | str] = []

    def read() -> None:
        try:
            list(sink)
            result.append("audio")
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            result.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else None


def test_closing_ends_a_request_in_its_audio_stage_and_stops_its_worker() -> None:
    """A request not streamed has finished decoding and its whole utterance is in the flow (many
    seconds on a CPU for a long one): close() ends it with EngineClosedError, its worker stops
    at the flow's next step, and close() returns with no engine thread left. (close() only ended
    the rows still decoding: it returned after its 10 s wait with the worker in the flow, the
    request delivered its audio a minute later, and the process aborted at exit, status 134.)"""
    before = set(threading.enumerate())
    engine = Engine.load(V2, capture_graphs=False)
    sink = QueueSink()
    engine.submit(_preset(1, 1000), sink)  # ~10 s of flow on 2 CPU cores
    assert wait_for(lambda: engine.loop.active == 1 and engine.loop.decoding == 0, timeout=60)
    time.sleep(0.3)  # into the flow
    begin = time.monotonic()
    engine.close()
    assert time.monotonic() - begin < 5
    assert isinstance(_ends_with(sink, 1), EngineClosedError)
    assert engine.loop.active == 0
    assert _engine_threads(before) == []


def test_closing_during_a_long_step_answers_every_caller_at_once() -> None:
    """The loop thread is inside a long step (here a call through the public Engine.call; a step
    prefilling long prompts of a full-size model on a CPU takes long too) when the engine closes.
    A request prepared and waiting for a row, a request still being prepared and a queued call
    end with EngineClosedError at once, not when the step is over; the step then admits nothing.
    (The step admitted the waiting request and handed its audio to a worker close() had
    stopped: its caller got neither audio nor an error.)"""
    before = set(threading.enumerate())
    engine = Engine.load(V2, capture_graphs=False)
    features = engine.encode_prompt(PROMPT, PROMPT_TEXT)
    assert sum(c.samples.size for c in engine.synthesize(_preset(1, 1))) > 0  # warm
    step_started = threading.Event()
    slow_step = engine.call(lambda: (step_started.set(), time.sleep(4)))
    assert step_started.wait(10)
    waiting = QueueSink()
    engine.submit(_preset(2, 1), waiting)
    assert wait_for(lambda: engine.loop.waiting == 1, timeout=3)  # prepared, waiting for a row
    queued_call = engine.call(lambda: 1)
    preparing = QueueSink()
    slow_prompt = threading.Event()

    def prompt():  # a saved voice's features on slow storage, say
        slow_prompt.set()
        time.sleep(3)
        return features

    request = SynthesisRequest(Mode.ZERO_SHOT, "你好。", seed=3, max_speech_tokens=1)
    engine.submit(request, preparing, None, prompt)
    assert slow_prompt.wait(3)

    closer = threading.Thread(target=engine.close)
    closer.start()
    assert isinstance(_ends_with(waiting, 1.5), EngineClosedError)
    assert isinstance(_ends_with(preparing, 0.5), EngineClosedError)
    assert isinstance(queued_call.exception(timeout=0.5), EngineClosedError)
    assert not slow_step.done()  # all that while the step was still under way
    closer.join(20)
    assert not closer.is_alive()
    assert slow_step.result(timeout=1) == (None, None)
    assert engine.loop.active == 0 and engine.loop.waiting == 0
    assert wait_for(lambda: _engine_threads(before) == [], timeout=5), _engine_threads(before)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("idle_release_seconds", 1e10),  # past threading.TIMEOUT_MAX: the loop's wait raised
        ("idle_release_seconds", MAX_IDLE_RELEASE_SECONDS * 2),
        ("audio_workers", MAX_AUDIO_WORKERS + 1),  # 100000 left ~22k threads close() never saw
    ],
)
def test_loop_limits_are_bounded_at_load(option: str, value: float) -> None:
    """Values the loop cannot honour are refused at load, naming the option (an
    idle_release_seconds of 1e10 killed the loop thread at its first idle wait, and a request
    being prepared then never started)."""
    with pytest.raises(InvalidRequestError, match=option):
        Engine.check_load_options(**{option: value})
    with pytest.raises(InvalidRequestError, match=option):
        LoopLimits(**{option: value})


def test_the_largest_loop_limits_are_accepted() -> None:
    limits = LoopLimits(
        audio_workers=MAX_AUDIO_WORKERS, idle_release_seconds=MAX_IDLE_RELEASE_SECONDS
    )
    Engine.check_load_options(
        audio_workers=limits.audio_workers, idle_release_seconds=limits.idle_release_seconds
    )


def test_audio_workers_started_before_one_fails_to_start_are_stopped_at_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The system refusing a thread (its limit reached) fails the submit that needed it; the
    workers started before are the engine's, which close() stops, and nothing is left queued.
    (They were started in a list that was never kept: 100000 audio_workers left ~22k threads.)"""
    before = set(threading.enumerate())
    engine = Engine.load(V2, audio_workers=8, capture_graphs=False)
    start = threading.Thread.start
    started: list[str] = []

    def start_until_refused(thread: threading.Thread) -> None:
        if thread.name == "engine-audio" and len(started) == 3:
            raise RuntimeError("can't start new thread")  # as the OS past its limit
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_until_refused)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        engine.submit(_preset(1, 1), QueueSink())
    monkeypatch.setattr(threading.Thread, "start", start)
    assert started == ["engine-audio"] * 3
    assert engine.loop.waiting == 0
    engine.close()
    assert _engine_threads(before) == []
