"""Benchmark worker for the OFFICIAL CosyVoice2 / CosyVoice3 code; started by benchmarks/bench_v2v3.py.

It runs in an environment where the official code is importable (its PYTHONPATH given by the
driver); it never installs or fetches it. The workload and the instrumentation are the driver's
(``FixedSpeechLength``, ``StageTimer``, ``ChunkLog``, the line protocol): the official
``CosyVoice2`` / ``CosyVoice3`` class does the whole request with its own frontend and
``CosyVoice2Model.tts`` (its LLM in its own thread); the timers wrap ``llm.inference``,
``flow.inference`` and ``hift.inference``, and the fixed-length wrapper replaces ``llm.sampling``.

The official ``Qwen2Encoder`` calls ``Qwen2ForCausalLM.from_pretrained(<model>/CosyVoice-BlankEN)``,
which needs a weights file that our generated directories do not have (our engine needs only
config.json). So the official opens a copy of the directory made of symlinks
(benchmarks/out/official-<model>/) whose CosyVoice-BlankEN also holds a random
``model.safetensors`` in bfloat16, as the release's (made once with transformers, cached under
benchmarks/out/). ``llm.pt`` then overwrites every Qwen weight, exactly as with the release, so
the official load time includes reading that file, as it does for real users.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_v1 import StageTimer, add_official_worker_args, offline_wetext, serve, set_threads  # noqa: E402
from bench_v2v3 import OUT, ChunkLog, FixedSpeechLength, wrap_stages  # noqa: E402

V3_SYSTEM = "You are a helpful assistant.<|endofprompt|>"  # what our engine adds for CosyVoice3


def blank_en_weights(config_dir: Path) -> Path:
    """A random ``model.safetensors`` (bfloat16, as released) for the Qwen2 body of
    ``config_dir/config.json``; cached by the config's hash."""
    config_text = (config_dir / "config.json").read_bytes()
    cache = OUT / f"official-blank-en-{hashlib.sha256(config_text).hexdigest()[:12]}"
    weights = cache / "model.safetensors"
    if weights.is_file():
        return weights
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    print(
        f"writing throw-away Qwen2 weights for the official loader to {weights} ...",
        file=sys.stderr,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(
        Qwen2Config.from_pretrained(config_dir), torch_dtype=torch.bfloat16
    )
    staging = cache.with_name(cache.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    cache.mkdir(parents=True, exist_ok=True)
    (staging / "model.safetensors").replace(weights)
    shutil.rmtree(staging, ignore_errors=True)
    return weights


def runnable_copy(model_dir: Path) -> Path:
    """benchmarks/out/official-<model>/: symlinks to the model's files, plus a CosyVoice-BlankEN
    with the weights file the official loader needs."""
    copy = OUT / f"official-{model_dir.name}"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.name != "CosyVoice-BlankEN":
            (copy / path.name).symlink_to(path.resolve())
    blank = copy / "CosyVoice-BlankEN"
    blank.mkdir()
    source = model_dir / "CosyVoice-BlankEN"
    for path in source.iterdir():
        (blank / path.name).symlink_to(path.resolve())
    (blank / "model.safetensors").symlink_to(blank_en_weights(source).resolve())
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", type=int, choices=[2, 3], required=True)
    add_official_worker_args(parser)
    args = parser.parse_args()

    set_threads(args.threads)
    model_dir = runnable_copy(args.model)  # before timing: not part of the official's work
    start = time.perf_counter()
    import torch
    from cosyvoice.cli.cosyvoice import CosyVoice2, CosyVoice3

    import_seconds = time.perf_counter() - start
    offline_wetext(args.wetext_fsts)

    def load():
        start = time.perf_counter()
        cosyvoice = (CosyVoice2 if args.version == 2 else CosyVoice3)(str(model_dir))
        load_seconds = time.perf_counter() - start
        model, timer = cosyvoice.model, StageTimer()
        llm = model.llm
        fixed = FixedSpeechLength(llm.sampling, llm.speech_token_size, llm.eos_token, 0)
        llm.sampling = fixed
        inference = llm.inference
        state: dict = {"replay": None, "segments": 0}

        def timed_inference(*args, **kwargs):  # runs in the official LLM thread
            if state["replay"] is not None:  # replay: no LLM work, the fixed tokens at once
                return timer.iterate("llm", iter(state["replay"]))
            return timer.iterate("llm", inference(*args, **kwargs))

        llm.inference = timed_inference
        wrap_stages(timer, model.flow, model.hift)
        frontend_zero_shot = cosyvoice.frontend.frontend_zero_shot

        def counted_frontend(*args, **kwargs):  # one call per text segment
            state["segments"] += 1
            return frontend_zero_shot(*args, **kwargs)

        cosyvoice.frontend.frontend_zero_shot = counted_frontend
        first_hop = model.token_hop_len

        def run(command: dict) -> dict:
            fixed.n = command["tokens"]
            state["replay"], state["segments"] = command.get("replay"), 0
            # The official doubles token_hop_len on the shared model and never resets it (its
            # streaming bug): restore it so that every request streams as a fresh process would.
            model.token_hop_len = first_hop
            prompt_text = (V3_SYSTEM if args.version == 3 else "") + command["prompt_text"]
            timer.reset()
            torch.manual_seed(command["seed"])  # the official draws from the global RNG
            start = timer.now()
            chunks = ChunkLog(timer, start[0])
            for output in cosyvoice.inference_zero_shot(
                command["text"], prompt_text, command["prompt_wav"], stream=command["stream"]
            ):
                chunks.add(int(output["tts_speech"].shape[1]))
            timer.add("total", start)
            return {
                **timer.results(),
                "audio_s": sum(c["samples"] for c in chunks.chunks) / cosyvoice.sample_rate,
                "sample_rate": cosyvoice.sample_rate,
                "segments": state["segments"],
                "tokens": command["tokens"],
                "chunks": chunks.chunks,
                "pieces": [],
            }

        return run, load_seconds

    serve(load, import_seconds)


if __name__ == "__main__":
    main()
