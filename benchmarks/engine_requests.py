"""An engine loaded for an in-process benchmark, and requests of a fixed speech length through
it (bench_graph_capture, bench_stream_threads, bench_engine_streams, bench_onnx_pool): ``count``
requests at once, each on a thread of its own as a server's clients would send them, timed from a
common start.

Random weights rarely stop, so every request decodes exactly ``tokens`` speech tokens
(``max_speech_tokens`` + ``ignore_eos``), and the run stops with ``FIXED LENGTH NOT APPLIED``
where a request's audio has another length.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# the saved voice of the engine and server benchmarks: the 4.9 s zh test prompt and its transcript
PROMPT = ROOT / "tests" / "data" / "audio" / "zh_16k.wav"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
# a 40-character Chinese sentence, one text segment
TEXT = "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。"


def fixed_request(voice: Any, tokens: int, seed: int, stream: bool, text: str = TEXT) -> Any:
    """A request of exactly ``tokens`` speech tokens in ``voice``: a preset's name, or a prompt
    voice given to ``Engine.synthesize`` (zero-shot)."""
    from cosyvoice_lite.request import Mode, SynthesisRequest

    preset = isinstance(voice, str)
    return SynthesisRequest(
        Mode.PRESET if preset else Mode.ZERO_SHOT,
        text,
        voice=voice if preset else None,
        seed=seed,
        stream=stream,
        max_speech_tokens=tokens,
        ignore_eos=True,
    )


def at_once(
    engine: Any, voice: Any, count: int, tokens: int, seed: int, stream: bool, text: str = TEXT
) -> tuple[list[tuple[float, float]], float]:
    """``count`` requests (seeds ``seed``, ``seed + 1``, ...) at once: each one's (first audio,
    audio) in seconds, and the wall time until the last one ended. Stops the run where one failed
    or its audio is not ``tokens`` long."""
    results: dict[int, tuple[float, float] | BaseException] = {}
    prompt = None if isinstance(voice, str) else voice
    rate, frame_rate = engine.sample_rate, engine.model.config.token_frame_rate

    def run(index: int) -> None:
        request = fixed_request(voice, tokens, seed + index, stream, text)
        first, samples = None, 0
        try:
            for chunk in engine.synthesize(request, prompt=prompt):
                first = first if first is not None else time.perf_counter() - start
                samples += chunk.samples.size
            results[index] = (first, samples / rate)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    timings = []
    for index in range(count):
        result = results.get(index, RuntimeError("no result"))
        if isinstance(result, BaseException):
            raise SystemExit(f"a request failed: {result!r}")
        if round(result[1] * frame_rate) != tokens:
            raise SystemExit(
                f"FIXED LENGTH NOT APPLIED: {result[1]:.2f} s of audio for {tokens} tokens"
            )
        timings.append(result)
    return timings, wall


@contextlib.contextmanager
def measured_engine(model: Path, threads: int, **load: Any) -> Iterator[tuple[Any, dict, tuple]]:
    """This run's floors (``floors.measure``), then the engine loaded with ``threads`` torch
    threads and ``Engine.load``'s options ``load``, warm; closed on the way out. Yields the
    engine, the floors and the load average from before the floors."""
    import torch
    from floors import measure

    from cosyvoice_lite.engine import Engine

    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    print("measuring the floors ...", flush=True)
    floors = measure()
    engine = Engine.load(model, **load)
    try:
        engine.wait_until_warm(600)
        yield engine, floors, load_start
    finally:
        engine.close()
