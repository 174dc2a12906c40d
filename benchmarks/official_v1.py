"""Benchmark worker for the OFFICIAL CosyVoice v1 code; started by benchmarks/bench_v1.py.

It runs in an environment where the official code is importable (its PYTHONPATH given by the
driver); it never installs or fetches it. The workload and the instrumentation are the driver's
(``FixedLength``, ``StageTimer``, the line protocol): the official ``CosyVoice`` class does the
whole request with its own frontend and ``CosyVoiceModel.tts``; the timers wrap
``llm.inference`` (a token generator, run in the official LLM thread), ``flow.inference`` and
``hift.inference``, and the fixed-length wrapper replaces ``llm.sampling``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_v1 import (  # noqa: E402
    FixedLength,
    StageTimer,
    add_official_worker_args,
    offline_wetext,
    serve,
    set_threads,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_official_worker_args(parser)
    args = parser.parse_args()

    set_threads(args.threads)
    start = time.perf_counter()
    import torch
    from cosyvoice.cli.cosyvoice import CosyVoice

    import_seconds = time.perf_counter() - start
    offline_wetext(args.wetext_fsts)

    def load():
        start = time.perf_counter()
        cosyvoice = CosyVoice(str(args.model))
        load_seconds = time.perf_counter() - start
        model, timer = cosyvoice.model, StageTimer()
        fixed = FixedLength(model.llm.sampling, model.llm.eos_token, 0)
        model.llm.sampling = fixed
        inference = model.llm.inference
        model.llm.inference = lambda *a, **k: timer.iterate("llm", inference(*a, **k))
        model.flow.inference = timer.wrap("flow", model.flow.inference)
        model.hift.inference = timer.wrap("hift", model.hift.inference)

        def run(command: dict) -> dict:
            text, voice, tokens, seed = (command[k] for k in ("text", "voice", "tokens", "seed"))
            fixed.n = tokens
            timer.reset()
            torch.manual_seed(seed)  # the official draws from the global RNG
            start = timer.now()
            segments = samples = 0
            for output in cosyvoice.inference_sft(text, voice, stream=False):
                samples += output["tts_speech"].shape[1]
                segments += 1  # non-streaming: one output per text segment
            timer.add("total", start)
            return {
                **timer.results(),
                "audio_s": samples / cosyvoice.sample_rate,
                "segments": segments,
                "tokens": tokens,
            }

        return run, load_seconds

    serve(load, import_seconds)


if __name__ == "__main__":
    main()
