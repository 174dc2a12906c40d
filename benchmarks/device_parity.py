"""Do requests computed together on another torch device give their audio alone there? (A lent
GPU only; CI has no accelerator.)

    python benchmarks/device_parity.py --model /tmp/m/v2-tiny --model /tmp/m/v3-tiny --device cuda

For each model directory (``tools/make_models.py --size tiny``): a few seeded requests of fixed
length (zero-shot whole and streamed, cross-lingual) on ``--device`` in each ``--dtypes``, each
alone and then all submitted together; prints, per request, the largest sample difference
together-vs-alone (a waveform peaks near 1). On a CPU that is 0 (the tests hold it); on a GPU the
libraries pick their kernels by batch size, so expect float noise (up to ~1e-2 of waveform after
the vocoder's phase), while a length difference or an O(1) difference means a token differed.

The device against the CPU is ``precision_accuracy.py MODEL --device cuda --precisions
float32,bfloat16``: the same tokens and noise from CPU generators, so its errors are the
device's arithmetic (the engine draws from generators on its device, as the official code does,
so its seeded tokens differ between a GPU and a CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cosyvoice_lite.engine import Engine, QueueSink  # noqa: E402
from cosyvoice_lite.request import Mode, SynthesisRequest  # noqa: E402

PROMPT = str(ROOT / "tests" / "data" / "audio" / "zh_16k.wav")
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"


def requests(tokens: int) -> list[SynthesisRequest]:
    fixed = {"max_speech_tokens": tokens, "ignore_eos": True, "prompt_audio": PROMPT}
    return [
        SynthesisRequest(
            Mode.ZERO_SHOT, "你好，很高兴认识你。", seed=1, prompt_text=PROMPT_TEXT, **fixed
        ),
        SynthesisRequest(
            Mode.ZERO_SHOT, "今天天气真好。", seed=2, prompt_text=PROMPT_TEXT, stream=True, **fixed
        ),
        SynthesisRequest(Mode.CROSS_LINGUAL, "Nice to meet you.", seed=3, **fixed),
    ]


def together(engine: Engine, batch: list[SynthesisRequest]) -> list[np.ndarray]:
    sinks = [QueueSink() for _ in batch]
    for request, sink in zip(batch, sinks, strict=True):
        engine.submit(request, sink)
    return [np.concatenate([c.samples for c in sink]) for sink in sinks]


def alone(engine: Engine, batch: list[SynthesisRequest]) -> list[np.ndarray]:
    return [together(engine, [request])[0] for request in batch]


def difference(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"lengths {a.shape[0]} vs {b.shape[0]}"
    return f"{np.abs(a - b).max():.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tokens", type=int, default=60)
    args = parser.parse_args()
    batch = requests(args.tokens)
    names = ["zero-shot", "zero-shot streamed", "cross-lingual"]
    for model in args.model:
        for dtype in args.dtypes.split(","):
            engine = Engine.load(model, device=args.device, dtype=dtype, max_batch=8)
            try:
                solo = alone(engine, batch)
                joint = together(engine, batch)
            finally:
                engine.close()
            print(
                f"{Path(model).name} on {args.device} {dtype} ({args.tokens} tokens):", flush=True
            )
            for name, a, b in zip(names, solo, joint, strict=True):
                print(f"  {name:<20} max |together - alone| {difference(b, a)}", flush=True)


if __name__ == "__main__":
    main()
