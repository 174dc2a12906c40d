"""End-to-end golden outputs of the OFFICIAL CosyVoice v1 on tests/data/models/v1-tiny.

Runs the unmodified ``cosyvoice.cli.cosyvoice.CosyVoice`` (HEAD ace7c47) in the reference
environment, in every v1 mode, and records what goes in and out of each stage:

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \\
        /tmp/refenv/bin/python tools/golden/v1_end_to_end.py

The model directory comes from tools/golden/make_v1_official.py and the prompt audio from
tests/data/audio/ (see prompts.json there). Output: tests/data/golden/v1_e2e/

  manifest.json     per case: mode, call arguments, seed, normalised text segments, array shapes,
                    number of generated tokens, the RNG draws observed (in order), stream chunks
  <case>.npz        float32 / int32 arrays (names below)

Arrays (present when the mode has them; ``[1, T]`` shapes as the official frontend makes them):
  text_token, prompt_text_token          int32  LLM text tokens (tts text; prompt / instruct text)
  llm_prompt_speech_token                int32  prompt speech tokens fed to the LLM
  flow_prompt_speech_token               int32  prompt speech tokens fed to the flow
  source_speech_token                    int32  VC source tokens
  llm_embedding, flow_embedding          f32    [1, 192] x-vectors (spk2info or campplus.onnx)
  prompt_speech_feat                     f32    [1, T, 80] flow prompt mel, as the official HEAD
                                                computes it: load_wav(prompt, 24000) + the v1
                                                feat_extractor (22.05 kHz parameters)
  prompt_speech_feat_22050               f32    the same from load_wav(prompt, 22050)
  speech_token                           int32  [N] generated speech tokens (VC: the source tokens)
  flow_mel                               f32    [1, 80, T] flow output (before any speed change)
  hift_mel                               f32    [1, 80, T'] the vocoder input, stored only where it
                                                differs from flow_mel (speed != 1)
  tts_speech                             f32    [1, S] final waveform (all chunks concatenated)
  flow_mel_<i>, hift_mel_<i>             f32    streaming only, per yielded chunk: the flow output
                                                and the vocoder input (which starts with the 20
                                                cached mel frames after chunk 0); the chunks are
                                                tts_speech cut at the manifest's chunk sizes

Determinism: every call is preceded by ``set_all_random_seed(seed)`` (cosyvoice/utils/common.py).
Non-streaming runs draw in a fixed order (the LLM thread is joined before the flow runs). The
streaming run races the LLM thread against the main thread's flow/vocoder draws in the official
code; to record a reproducible stream this script replaces the 0.1 s poll in
cosyvoice.cli.model with one that waits until the LLM thread has finished (the situation of an LLM
faster than its consumer), which fixes the draw order to: all LLM draws, then per chunk flow then
vocoder. The run itself is otherwise untouched.

wetext 0.0.4 downloads its FSTs from ModelScope when the frontend is built; offline, the official
frontend silently falls back to no normalisation. ``--wetext-fsts`` (default: the FSTs bundled in
the project venv's wetext) points that download at a local copy, as tools/golden/text_frontend.py
does, so that the official wetext path runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "tests" / "data" / "models" / "v1-tiny"
AUDIO_DIR = ROOT / "tests" / "data" / "audio"
# GOLDEN_ROOT: where the goldens go (tests/data/golden; tests/data/golden/avx2 from an AVX2 CPU)
OUT_DIR = Path(os.environ.get("GOLDEN_ROOT", ROOT / "tests" / "data" / "golden")) / "v1_e2e"
DEFAULT_FSTS = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "wetext" / "fsts"
OFFICIAL_ROOTS = ("/tmp/official/CosyVoice/", "/tmp/official/Matcha-TTS/")

ZH_PROMPT = "希望你以后能够做的比我还好呦。"
EN_PROMPT = "The weather is lovely today, isn't it?"

# name -> (method, kwargs, seed); wav arguments are file names under tests/data/audio.
CASES: dict[str, tuple[str, dict, int]] = {
    "sft_zh": ("inference_sft", {"tts_text": "你好，欢迎使用语音合成。", "spk_id": "中文女"}, 0),
    "sft_en": ("inference_sft", {"tts_text": "Nice to meet you.", "spk_id": "英文男"}, 1),
    "sft_zh_speed1.5": (
        "inference_sft",
        {"tts_text": "你好，欢迎使用语音合成。", "spk_id": "中文女", "speed": 1.5},
        0,
    ),
    "zero_shot_zh": (
        "inference_zero_shot",
        {"tts_text": "今天是个好日子。", "prompt_text": ZH_PROMPT, "prompt_wav": "zh_16k.wav"},
        2,
    ),
    "zero_shot_en": (
        "inference_zero_shot",
        {"tts_text": "Good morning to you.", "prompt_text": EN_PROMPT, "prompt_wav": "en_44k.wav"},
        3,
    ),
    "cross_lingual": (
        "inference_cross_lingual",
        {"tts_text": "<|en|>Nice weather today.", "prompt_wav": "zh_24k.wav"},
        4,
    ),
    "instruct": (
        "inference_instruct",
        {
            "tts_text": "我们一起去看海吧。",
            "spk_id": "中文女",
            "instruct_text": "A cheerful young woman speaks brightly.<|endofprompt|>",
        },
        5,
    ),
    "vc": ("inference_vc", {"source_wav": "en_22k.wav", "prompt_wav": "en_48k_stereo.wav"}, 6),
    "vc_zh": ("inference_vc", {"source_wav": "zh_48k.wav", "prompt_wav": "zh_24k.wav"}, 8),
}
# The zero-shot case again with the prompt mel taken from a 22.05 kHz load (the rate the v1 mel
# parameters are meant for) instead of the HEAD's 24 kHz load: not official behaviour, an option.
VARIANT_22050 = ("zero_shot_zh_prompt22050", "zero_shot_zh")
STREAM_CASE = (
    "stream_sft_zh",
    "inference_sft",
    {
        "tts_text": (
            "春天来了，公园里的花都开了，小朋友们在草地上快乐地奔跑，"
            "鸟儿在树上唱歌，老人们坐在长椅上聊天，到处都是欢声笑语。"
        ),
        "spk_id": "中文女",
        "stream": True,
    },
    7,
)


# ----------------------------------------------------------------------------------------------
# RNG observation: wrap every torch sampling entry point the inference path could reach and log
# (thread, op, shape, dtype, first official caller). Python's random and numpy are not used by
# the v1 inference path (they are checked below by comparing their states before and after).
# ----------------------------------------------------------------------------------------------
class RngLog:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.lock = threading.Lock()

    def record(self, op: str, shape, dtype) -> None:
        frame = sys._getframe(2)
        caller = "?"
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith(OFFICIAL_ROOTS):
                root = next(r for r in OFFICIAL_ROOTS if filename.startswith(r))
                caller = f"{filename[len(root) :]}:{frame.f_lineno} {frame.f_code.co_name}"
                break
            frame = frame.f_back
        with self.lock:
            self.events.append(
                {
                    "thread": "main"
                    if threading.current_thread() is threading.main_thread()
                    else "llm",
                    "op": op,
                    "shape": list(shape),
                    "dtype": str(dtype).replace("torch.", ""),
                    "caller": caller,
                }
            )

    def take(self) -> list[dict]:
        with self.lock:
            events, self.events = self.events, []
        return events


RNG = RngLog()


def _install_rng_hooks() -> None:
    def wrap_function(owner, name: str, shape_of) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            # dtype of what is sampled: the probabilities for multinomial, else the result
            sampled = args[0] if name == "multinomial" else result
            RNG.record(name, shape_of(args, kwargs, result), getattr(sampled, "dtype", None))
            return result

        setattr(owner, name, wrapper)

    def input_shape(args, kwargs, result):
        return args[0].shape

    def result_shape(args, kwargs, result):
        return result.shape

    wrap_function(torch.Tensor, "multinomial", input_shape)
    wrap_function(torch, "multinomial", input_shape)
    for name in (
        "rand",
        "randn",
        "randint",
        "randn_like",
        "rand_like",
        "randint_like",
        "normal",
        "bernoulli",
        "randperm",
    ):
        wrap_function(torch, name, result_shape)
    for name in (
        "normal_",
        "uniform_",
        "exponential_",
        "bernoulli_",
        "random_",
        "cauchy_",
        "log_normal_",
        "geometric_",
    ):
        wrap_function(torch.Tensor, name, result_shape)


def compress(events: list[dict]) -> list[dict]:
    """Run-length encode consecutive identical events (count field)."""
    out: list[dict] = []
    for event in events:
        if out and all(out[-1][k] == event[k] for k in event):
            out[-1]["count"] += 1
        else:
            out.append({**event, "count": 1})
    return out


# ----------------------------------------------------------------------------------------------
# Recording of the official stages (instance-level wrappers; the official code is not modified).
# ----------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self, cosyvoice) -> None:
        self.cosyvoice = cosyvoice
        self.reset()
        frontend, model = cosyvoice.frontend, cosyvoice.model

        original_normalize = frontend.text_normalize

        def text_normalize(text, split=True, text_frontend=True):
            result = original_normalize(text, split=split, text_frontend=text_frontend)
            self.normalized.append({"input": text, "split": split, "output": result})
            return result

        frontend.text_normalize = text_normalize

        for name in (
            "frontend_sft",
            "frontend_zero_shot",
            "frontend_cross_lingual",
            "frontend_instruct",
            "frontend_vc",
        ):
            self._wrap_frontend(frontend, name)

        original_token2wav = model.token2wav

        def token2wav(**kwargs):
            self.token2wav_calls.append(
                {
                    "token": kwargs["token"].clone(),
                    "finalize": kwargs.get("finalize", False),
                    "speed": kwargs.get("speed", 1.0),
                }
            )
            return original_token2wav(**kwargs)

        model.token2wav = token2wav

        original_flow = model.flow.inference

        def flow_inference(**kwargs):
            mel, cache = original_flow(**kwargs)
            self.flow_mels.append(mel.detach().cpu().clone())
            return mel, cache

        model.flow.inference = flow_inference

        original_hift = model.hift.inference

        def hift_inference(speech_feat, **kwargs):
            self.hift_mels.append(speech_feat.detach().cpu().clone())
            return original_hift(speech_feat=speech_feat, **kwargs)

        model.hift.inference = hift_inference

    def _wrap_frontend(self, frontend, name: str) -> None:
        original = getattr(frontend, name)

        def wrapper(*args, **kwargs):
            model_input = original(*args, **kwargs)
            self.model_inputs.append({k: v.detach().cpu().clone() for k, v in model_input.items()})
            return model_input

        setattr(frontend, name, wrapper)

    def reset(self) -> None:
        self.normalized: list[dict] = []
        self.model_inputs: list[dict] = []
        self.token2wav_calls: list[dict] = []
        self.flow_mels: list[torch.Tensor] = []
        self.hift_mels: list[torch.Tensor] = []


def wait_for_llm_before_polling(model) -> None:
    """Make the streaming loop's 0.1 s poll wait until the LLM thread has finished."""
    import cosyvoice.cli.model as model_module

    class _Time:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            while not all(model.llm_end_dict.values()):
                time.sleep(0.01)

    model_module.time = _Time()


# ----------------------------------------------------------------------------------------------


def resolve_kwargs(kwargs: dict) -> dict:
    resolved = dict(kwargs)
    for key in ("prompt_wav", "source_wav"):
        if key in resolved:
            resolved[key] = str(AUDIO_DIR / resolved[key])
    return resolved


def run_case(
    cosyvoice,
    recorder: Recorder,
    name: str,
    method: str,
    kwargs: dict,
    seed: int,
    prompt_rate_override: int | None = None,
) -> dict:
    import random

    from cosyvoice.utils.common import set_all_random_seed
    from cosyvoice.utils.file_utils import load_wav

    frontend = cosyvoice.frontend
    original_feat = frontend._extract_speech_feat
    if prompt_rate_override is not None:

        def extract_speech_feat(prompt_wav):
            speech = load_wav(prompt_wav, prompt_rate_override)
            feat = frontend.feat_extractor(speech).squeeze(dim=0).transpose(0, 1).unsqueeze(0)
            return feat, torch.tensor([feat.shape[1]], dtype=torch.int32)

        frontend._extract_speech_feat = extract_speech_feat

    recorder.reset()
    RNG.take()
    set_all_random_seed(seed)
    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    chunks = [out["tts_speech"] for out in getattr(cosyvoice, method)(**resolve_kwargs(kwargs))]
    events = RNG.take()
    frontend._extract_speech_feat = original_feat
    untouched = random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state)

    segments = [n["output"] for n in recorder.normalized if n["split"]]
    assert method == "inference_vc" or len(segments[0]) == 1, f"{name}: expected one segment"
    # cross_lingual / instruct call frontend_zero_shot / frontend_sft inside: the last is the outer
    model_input = recorder.model_inputs[-1]
    arrays: dict[str, np.ndarray] = {}
    for key in (
        "text",
        "prompt_text",
        "llm_prompt_speech_token",
        "flow_prompt_speech_token",
        "source_speech_token",
    ):
        if key in model_input:
            out_key = key + "_token" if key in ("text", "prompt_text") else key
            arrays[out_key] = model_input[key].numpy().astype(np.int32)
    for key in ("llm_embedding", "flow_embedding", "prompt_speech_feat"):
        if key in model_input:
            arrays[key] = model_input[key].numpy().astype(np.float32)
    prompt_wav = kwargs.get("prompt_wav")
    if prompt_wav is not None:
        speech = load_wav(str(AUDIO_DIR / prompt_wav), 22050)
        feat = frontend.feat_extractor(speech).squeeze(dim=0).transpose(0, 1).unsqueeze(0)
        arrays["prompt_speech_feat_22050"] = feat.numpy().astype(np.float32)

    tokens = torch.cat([c["token"].reshape(-1) for c in recorder.token2wav_calls[-1:]])
    if kwargs.get("stream"):
        # the streamed token list is consumed hop by hop; rebuild the full list from the calls
        tokens = _stream_tokens(recorder.token2wav_calls)
    arrays["speech_token"] = tokens.numpy().astype(np.int32)
    arrays["tts_speech"] = torch.cat(chunks, dim=1).numpy().astype(np.float32)
    if kwargs.get("stream"):
        # the chunks themselves are tts_speech split at manifest["stream_chunks"][i]["samples"]
        for i, (flow_mel, hift_mel) in enumerate(
            zip(recorder.flow_mels, recorder.hift_mels, strict=True)
        ):
            arrays[f"flow_mel_{i}"] = flow_mel.numpy().astype(np.float32)
            arrays[f"hift_mel_{i}"] = hift_mel.numpy().astype(np.float32)
    else:
        (flow_mel,), (hift_mel,) = recorder.flow_mels, recorder.hift_mels
        arrays["flow_mel"] = flow_mel.numpy().astype(np.float32)
        if not torch.equal(flow_mel, hift_mel):  # only the speed change alters it
            arrays["hift_mel"] = hift_mel.numpy().astype(np.float32)

    np.savez_compressed(OUT_DIR / f"{name}.npz", **arrays)
    entry = {
        "method": method,
        "kwargs": kwargs,
        "seed": seed,
        "prompt_mel_load_rate": prompt_rate_override or 24000,
        "text_normalize": recorder.normalized,
        "n_speech_tokens": int(arrays["speech_token"].shape[0]),
        "n_samples": int(arrays["tts_speech"].shape[1]),
        "arrays": {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()},
        "python_and_numpy_rng_untouched": untouched,
        "rng_draws": compress(events),
    }
    if kwargs.get("stream"):
        entry["stream_chunks"] = [
            {
                "tokens": int(c["token"].shape[1]),
                "finalize": bool(c["finalize"]),
                "samples": int(chunk.shape[1]),
            }
            for c, chunk in zip(recorder.token2wav_calls, chunks, strict=True)
        ]
    return entry


def _stream_tokens(calls: list[dict]) -> torch.Tensor:
    """v1 stream: each non-final call gets hop + overlap tokens and the list then drops hop."""
    tokens: list[int] = []
    consumed = 0
    for call in calls:
        chunk = call["token"].reshape(-1).tolist()
        tokens = tokens[:consumed] + chunk
        consumed += 100 if not call["finalize"] else 0
    return torch.tensor(tokens, dtype=torch.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wetext-fsts", default=str(DEFAULT_FSTS))
    args = parser.parse_args()

    import wetext.wetext

    fst_dir = str(Path(args.wetext_fsts).resolve())
    wetext.wetext.snapshot_download = lambda *a, **k: fst_dir

    from cosyvoice.cli.cosyvoice import CosyVoice

    cosyvoice = CosyVoice(str(MODEL_DIR))
    assert cosyvoice.frontend.text_frontend == "wetext", cosyvoice.frontend.text_frontend
    recorder = Recorder(cosyvoice)
    _install_rng_hooks()

    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)
    manifest: dict = {
        "model_dir": str(MODEL_DIR.relative_to(ROOT)),
        "official": "FunAudioLLM/CosyVoice ace7c47 + Matcha-TTS dd9105b, CPU, fp32",
        "torch": torch.__version__,
        "text_frontend": cosyvoice.frontend.text_frontend,
        "cases": {},
    }
    for name, (method, kwargs, seed) in CASES.items():
        manifest["cases"][name] = run_case(cosyvoice, recorder, name, method, kwargs, seed)
        print(name, manifest["cases"][name]["n_speech_tokens"], "tokens", flush=True)

    variant, base = VARIANT_22050
    method, kwargs, seed = CASES[base]
    manifest["cases"][variant] = run_case(
        cosyvoice, recorder, variant, method, kwargs, seed, prompt_rate_override=22050
    )

    # Determinism check: the first case again must give the same waveform.
    again = run_case(cosyvoice, recorder, "_repeat", *CASES["sft_zh"])
    first = np.load(OUT_DIR / "sft_zh.npz")["tts_speech"]
    repeat = np.load(OUT_DIR / "_repeat.npz")["tts_speech"]
    (OUT_DIR / "_repeat.npz").unlink()
    manifest["repeat_identical"] = bool(np.array_equal(first, repeat)) and again["n_samples"] > 0

    name, method, kwargs, seed = STREAM_CASE
    wait_for_llm_before_polling(cosyvoice.model)
    try:
        entry = run_case(cosyvoice, recorder, name, method, kwargs, seed)
        # the same call without streaming must give the same tokens
        plain = dict(kwargs, stream=False)
        reference = run_case(cosyvoice, recorder, "_stream_reference", method, plain, seed)
        ref_tokens = np.load(OUT_DIR / "_stream_reference.npz")["speech_token"]
        (OUT_DIR / "_stream_reference.npz").unlink()
        stream_tokens = np.load(OUT_DIR / f"{name}.npz")["speech_token"]
        entry["tokens_equal_non_stream"] = bool(np.array_equal(ref_tokens, stream_tokens))
        entry["non_stream_n_tokens"] = reference["n_speech_tokens"]
        entry["note"] = (
            "cosyvoice.cli.model.time.sleep replaced by a wait for the LLM thread; "
            "see the module docstring"
        )
        manifest["cases"][name] = entry
        print(name, entry["n_speech_tokens"], "tokens", len(entry["stream_chunks"]), "chunks")
    except Exception:
        traceback.print_exc()

    with open(OUT_DIR / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
    total = sum(p.stat().st_size for p in OUT_DIR.iterdir())
    print(f"wrote {len(list(OUT_DIR.iterdir()))} files, {total} bytes to {OUT_DIR}")


if __name__ == "__main__":
    main()
