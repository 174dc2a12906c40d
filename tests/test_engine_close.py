"""Closing the engine: every caller gets an answer at once, and no engine thread is left.

A request may be queued, being prepared, decoding, or in its audio stage (its flow and vocoder
on an audio worker) when the engine closes; each ends with EngineClosedError, whatever the loop
thread is doing (a step may outlast close()'s wait), and the workers stop at their next step.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_server_support import wait_for

from cosyvoice_lite import Engine, EngineClosedError, Mode, SynthesisRequest
from cosyvoice_lite.engine import QueueSink
from cosyvoice_lite.engine_loop import MAX_AUDIO_WORKERS, MAX_IDLE_RELEASE_SECONDS, LoopLimits
from cosyvoice_lite.errors import InvalidRequestError
from cosyvoice_lite.networks import conformer

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


# a whole utterance whose flow's up-encoder attends its queries in blocks (2 x (600 tokens +
# the voice's prompt) frames, past conformer.WHOLE_ATTENTION_ROWS), decoded in a few seconds
LONG_TOKENS = 600


def _in_long_attention(thread: threading.Thread) -> bool:
    """Whether ``thread`` is attending a long sequence's queries in blocks (between two of the
    blocks' abort checks): seen in its stack, as close()'s warning sees it."""
    frame = sys._current_frames().get(thread.ident)  # noqa: SLF001
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and code.co_filename == conformer.__file__:
            return "step" in frame.f_locals  # the blocked path's block size
        frame = frame.f_back
    return False


def _into_long_attention(engine: Engine) -> tuple[threading.Thread, QueueSink]:
    """Submit a long whole utterance and wait until its worker attends in blocks: that worker,
    and the request's sink."""
    sink = QueueSink()
    engine.submit(_preset(1, LONG_TOKENS), sink)
    workers = [t for t in engine.loop.threads_alive() if t.name == "engine-audio"]
    found = wait_for(lambda: next((t for t in workers if _in_long_attention(t)), None), 60, 0.005)
    assert found is not None, "the flow never reached a blocked attention"
    return found, sink


def test_closing_ends_a_request_in_its_audio_stage_and_stops_its_worker() -> None:
    """A request not streamed has finished decoding and its whole utterance is in the flow (many
    seconds on a CPU for a long one), here inside a long attention: close() ends it with
    EngineClosedError, its worker stops at the attention's next block, and close() returns at
    once with no engine thread left. (close() only ended the rows still decoding: it returned
    after its 10 s wait with the worker in the flow, the request delivered its audio a minute
    later, and the process aborted at exit, status 134; then, with checks between layers only,
    one layer of a 6,000-token utterance outlasted the wait: 6-14 s on 2 cores.)"""
    before = set(threading.enumerate())
    engine = Engine.load(V2, capture_graphs=False)
    _, sink = _into_long_attention(engine)
    begin = time.monotonic()
    engine.close()
    assert time.monotonic() - begin < 3
    assert isinstance(_ends_with(sink, 1), EngineClosedError)
    assert engine.loop.active == 0
    assert _engine_threads(before) == []


def test_a_close_that_outlasts_its_wait_names_the_busy_thread_and_its_computation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """close() waits CLOSE_WAIT_SECONDS at most; a thread still computing then is named in a
    warning with what it computes (its innermost calls in the package), and stops at its next
    step all the same."""
    before = set(threading.enumerate())
    engine = Engine.load(V2, capture_graphs=False)
    worker, sink = _into_long_attention(engine)
    with caplog.at_level(logging.WARNING, logger="cosyvoice_lite.engine_loop"):
        assert not engine.loop.close(wait=0)
    (record,) = [r for r in caplog.records if "still computing" in r.getMessage()]
    assert f"{worker.name} in networks/" in record.getMessage()
    assert "networks/conformer.py" in record.getMessage()
    assert wait_for(lambda: not worker.is_alive(), timeout=3)
    engine.close()
    assert isinstance(_ends_with(sink, 1), EngineClosedError)
    assert _engine_threads(before) == []


def test_ctrl_c_during_a_long_whole_utterance_exits_as_interrupted() -> None:
    """Ctrl-C while a script waits for a long whole utterance: the exit closes the engine and
    waits for its audio worker to stop at its next step before the interpreter finalizes, and the
    process ends as interrupted (-SIGINT). (The exit's close gave up after CLOSE_WAIT_SECONDS
    with the worker inside a torch op, and the finalization then aborted the process, SIGABRT
    'terminate called without an active exception', in ~1 of 3 runs; here the warning period is
    shortened to 0.2 s, which the exit used to give up after.)"""
    script = f"""
import sys, time
from cosyvoice_lite import Engine, Mode, SynthesisRequest, engine_loop
from cosyvoice_lite.engine import QueueSink
engine_loop.CLOSE_WAIT_SECONDS = 0.2
engine = Engine.load({str(V2)!r}, capture_graphs=False)
request = SynthesisRequest(Mode.PRESET, "今天天气真好。", voice="中文女", seed=1,
                           max_speech_tokens={LONG_TOKENS}, ignore_eos=True)
engine.submit(request, sink := QueueSink())
while not (engine.loop.active == 1 and engine.loop.decoding == 0):
    time.sleep(0.01)
print("FLOW", flush=True)
list(sink)
"""
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "FLOW\n"
        time.sleep(0.3)  # into the flow's encoders
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGINT, err[-3000:]
    assert "KeyboardInterrupt" in err


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
