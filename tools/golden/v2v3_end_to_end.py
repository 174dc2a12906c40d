"""End-to-end golden outputs of the OFFICIAL CosyVoice2 / CosyVoice3 on the tiny model directories.

Runs the unmodified ``cosyvoice.cli.cosyvoice.CosyVoice2`` / ``CosyVoice3`` (HEAD ace7c47) in the
reference environment, in every mode, and records what goes in and out of each stage:

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \\
        /tmp/refenv/bin/python tools/golden/v2v3_end_to_end.py

The model directories come from tools/golden/make_v2v3_official.py (tests/data/models/v2-tiny,
v3-tiny; opened through ``runnable_copy``, which adds the throw-away Qwen weights that the official
``from_pretrained`` wants) and the prompt audio from tests/data/audio/ (see prompts.json there).
Output: tests/data/golden/v2_e2e/ and v3_e2e/

  manifest.json     per case: method, call arguments, seed, LLM file, normalised text segments,
                    array shapes, token counts, the RNG draws observed (in order), stream chunks
  <case>.npz        float32 / int32 arrays (names below)
  v3_e2e/hift_buffers.npz   the CausalHiFTGenerator fixed buffers of the tiny v3 model (not in
                    hift.pt): rand_ini, the first rows of sine_waves and uv, and their sums

Arrays (present when the case has them; ``[1, T]`` shapes as the official frontend makes them):
  text_token, prompt_text_token          int32  LLM text tokens (tts text; prompt / instruct text)
  text_piece_tokens, text_piece_lens     int32  bistream: the tokens of each text piece, flattened,
                                                and the number of tokens per piece
  llm_prompt_speech_token                int32  prompt speech tokens fed to the LLM
  flow_prompt_speech_token               int32  prompt speech tokens fed to the flow
  source_speech_token                    int32  VC source tokens
  llm_embedding, flow_embedding          f32    [1, 192] x-vectors (spk2info or campplus.onnx)
  prompt_speech_feat                     f32    [1, T, 80] flow prompt mel (after the 2:1 alignment)
  llm_token                              int32  [N] every token the LLM yielded
  speech_token                           int32  [N'] the tokens given to the flow (v3 drops runs of
                                                more than 5 silent tokens; VC: the source tokens)
  flow_mel                               f32    [1, 80, T] flow output (before any speed change)
  hift_mel                               f32    [1, 80, T'] the vocoder input (after speed change)
  tts_speech                             f32    [1, S] final waveform (non-streaming cases)
  chunk_<i>                              f32    streaming: the i-th yielded waveform chunk
  flow_mel_<i>                           f32    streaming: the flow output of the i-th call (whole
                                                prompt-less mel of all tokens so far, before the
                                                official slicing at token_offset * 2)
  hift_mel_<i>                           f32    streaming: the vocoder input of the i-th call (v2:
                                                8 cached frames + the new frames; v3: all frames)

Determinism: every call is preceded by ``set_all_random_seed(seed)`` (cosyvoice/utils/common.py).
Non-streaming runs draw in a fixed order (the LLM thread is joined before the flow runs). The v2
vocoder draws random numbers (SineGen2: ``rand`` phases, ``randn`` noise) on the main thread, so
official v2 streaming races the LLM thread's multinomial draws. To record a reproducible stream
this script replaces the 0.1 s poll in cosyvoice.cli.model with one that waits until the LLM
thread has finished (an LLM faster than its consumer): all LLM draws come first, then per chunk
the vocoder's. v3 draws nothing outside the LLM (fixed flow noise, fixed vocoder buffers); its
streams are recorded with the patched poll and re-run with the untouched official poll, and the
manifest says whether both agree. ``self.token_hop_len`` is mutated by the official streaming
loop (25 -> 50 -> 100) and never reset, so every streaming case gets a freshly built model.

wetext 0.0.4 downloads its FSTs from ModelScope when the frontend is built; this script points
that download at the FSTs bundled in the project venv's wetext, so the official wetext path runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_v2v3_official import (  # noqa: E402
    AUDIO_DIR,
    ROOT,
    VERSIONS,
    official_class,
    point_wetext_at_local_fsts,
    runnable_copy,
)

# GOLDEN_ROOT: where the goldens go (tests/data/golden; tests/data/golden/avx2 from an AVX2 CPU)
GOLDEN_ROOT = Path(os.environ.get("GOLDEN_ROOT", ROOT / "tests" / "data" / "golden"))
OUT = {"v2": GOLDEN_ROOT / "v2_e2e", "v3": GOLDEN_ROOT / "v3_e2e"}
OFFICIAL_ROOTS = ("/tmp/official/CosyVoice/", "/tmp/official/Matcha-TTS/")

ZH_PROMPT = "希望你以后能够做的比我还好呦。"  # transcript of zh_16k.wav
EN_PROMPT = "The weather is lovely today, isn't it?"  # transcript of en_44k.wav
V3_SYSTEM = "You are a helpful assistant.<|endofprompt|>"
ZH_LONG = "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐，笑容如花儿般绽放。"
ZH_PIECES = [
    "收到好友从远方寄来的生日礼物，",
    "那份意外的惊喜与深深的祝福",
    "让我心中充满了甜蜜的快乐，",
    "笑容如花儿般绽放。",
]  # the official bistream example's text generator

# name -> (method, kwargs, seed, options). wav arguments are file names under tests/data/audio;
# "tts_text_pieces" becomes a generator (bistream); options: llm_file (default llm.pt),
# expect_llm_error (the official LLM thread raises; recorded, not a failure).
CASES: dict[str, dict[str, tuple[str, dict, int, dict]]] = {
    "v2": {
        "zero_shot": (
            "inference_zero_shot",
            {
                "tts_text": "收到好友从远方寄来的生日礼物。",
                "prompt_text": ZH_PROMPT,
                "prompt_wav": "zh_16k.wav",
            },
            0,
            {},
        ),
        "zero_shot_en": (
            "inference_zero_shot",
            {
                "tts_text": "Hello, this is a small test of the speech synthesis system.",
                "prompt_text": EN_PROMPT,
                "prompt_wav": "en_44k.wav",
            },
            1,
            {},
        ),
        "zero_shot_spk": (
            "inference_zero_shot",
            {
                "tts_text": "收到好友从远方寄来的生日礼物。",
                "prompt_text": "",
                "prompt_wav": "",
                "zero_shot_spk_id": "zero_shot_zh",
            },
            0,
            {},
        ),
        "cross_lingual": (
            "inference_cross_lingual",
            {
                "tts_text": "他突然[laughter]停下来，因为他自己也被逗笑了[laughter]。",
                "prompt_wav": "en_22k.wav",
            },
            2,
            {},
        ),
        "instruct2": (
            "inference_instruct2",
            {
                "tts_text": "收到好友从远方寄来的生日礼物。",
                "instruct_text": "用四川话说这句话<|endofprompt|>",
                "prompt_wav": "zh_16k.wav",
            },
            3,
            {},
        ),
        "sft": (
            "inference_sft",
            {"tts_text": "你好，请问有什么可以帮您的吗？", "spk_id": "中文女"},
            4,
            {},
        ),
        "sft_speed1.5": (
            "inference_sft",
            {"tts_text": "你好，请问有什么可以帮您的吗？", "spk_id": "中文女", "speed": 1.5},
            4,
            {},
        ),
        "vc": ("inference_vc", {"source_wav": "en_22k.wav", "prompt_wav": "zh_24k.wav"}, 5, {}),
        "bistream": (
            "inference_zero_shot",
            {"tts_text_pieces": ZH_PIECES, "prompt_text": ZH_PROMPT, "prompt_wav": "zh_16k.wav"},
            6,
            {},
        ),
        "stream_zero_shot": (
            "inference_zero_shot",
            {
                "tts_text": ZH_LONG,
                "prompt_text": ZH_PROMPT,
                "prompt_wav": "zh_16k.wav",
                "stream": True,
            },
            7,
            {},
        ),
        "stream_sft": (
            "inference_sft",
            {
                "tts_text": "你好，我是通义生成式语音大模型，请问有什么可以帮您的吗？",
                "spk_id": "中文女",
                "stream": True,
            },
            8,
            {},
        ),
    },
    "v3": {
        "zero_shot": (
            "inference_zero_shot",
            {
                "tts_text": "八百标兵奔北坡，北坡炮兵并排跑。",
                "prompt_text": V3_SYSTEM + ZH_PROMPT,
                "prompt_wav": "zh_16k.wav",
            },
            2,
            {},
        ),
        "zero_shot_rl": (
            "inference_zero_shot",
            {
                "tts_text": "八百标兵奔北坡，北坡炮兵并排跑。",
                "prompt_text": V3_SYSTEM + ZH_PROMPT,
                "prompt_wav": "zh_16k.wav",
            },
            2,
            {"llm_file": "llm.rl.pt"},
        ),
        "zero_shot_en": (
            "inference_zero_shot",
            {
                "tts_text": "Hello, this is a small test of the speech synthesis system.",
                "prompt_text": V3_SYSTEM + EN_PROMPT,
                "prompt_wav": "en_44k.wav",
            },
            1,
            {},
        ),
        "hotfix_pinyin": (
            "inference_zero_shot",
            {
                "tts_text": "对报道[j][ǐ]予好评。",
                "prompt_text": V3_SYSTEM + ZH_PROMPT,
                "prompt_wav": "zh_16k.wav",
            },
            0,
            {},
        ),
        "cross_lingual": (
            "inference_cross_lingual",
            {
                "tts_text": V3_SYSTEM + "[breath]因为他们那一辈人[breath]在乡里面住的要习惯一点。",
                "prompt_wav": "zh_24k.wav",
            },
            2,
            {},
        ),
        "instruct2": (
            "inference_instruct2",
            {
                "tts_text": "好少咯，一般系放嗰啲国庆啊。",
                "instruct_text": "You are a helpful assistant. 请用广东话表达。<|endofprompt|>",
                "prompt_wav": "zh_16k.wav",
            },
            3,
            {},
        ),
        "zero_shot_speed1.5": (
            "inference_zero_shot",
            {
                "tts_text": "八百标兵奔北坡，北坡炮兵并排跑。",
                "prompt_text": V3_SYSTEM + ZH_PROMPT,
                "prompt_wav": "zh_16k.wav",
                "speed": 1.5,
            },
            2,
            {},
        ),
        "vc": (
            "inference_vc",
            {"source_wav": "zh_48k.wav", "prompt_wav": "en_48k_stereo.wav"},
            5,
            {},
        ),
        "bistream": (
            "inference_zero_shot",
            {
                "tts_text_pieces": ZH_PIECES,
                "prompt_text": V3_SYSTEM + ZH_PROMPT,
                "prompt_wav": "zh_16k.wav",
            },
            3,
            {},
        ),
        # Official v3 quirk: bistream masks index 6561 (sos) instead of eos 6562 while text is
        # still arriving; an eos drawn then raises ValueError in the LLM thread, which dies, and
        # tts() synthesises the tokens generated so far (non-streaming; a stream would hang).
        "bistream_eos_error": (
            "inference_zero_shot",
            {
                "tts_text_pieces": ZH_PIECES,
                "prompt_text": V3_SYSTEM + ZH_PROMPT,
                "prompt_wav": "zh_16k.wav",
            },
            1,
            {"expect_llm_error": True},
        ),
        "stream_zero_shot": (
            "inference_zero_shot",
            {
                "tts_text": "八百标兵奔北坡，北坡炮兵并排跑，炮兵怕把标兵碰，标兵怕碰炮兵炮。",
                "prompt_text": V3_SYSTEM + ZH_PROMPT,
                "prompt_wav": "zh_16k.wav",
                "stream": True,
            },
            4,
            {},
        ),
        "stream_instruct2": (
            "inference_instruct2",
            {
                "tts_text": ZH_LONG,
                "instruct_text": "You are a helpful assistant. 请用尽可能快地语速说一句话。<|endofprompt|>",
                "prompt_wav": "en_44k.wav",
                "stream": True,
            },
            2,
            {},
        ),
    },
}


# ----------------------------------------------------------------------------------------------
# RNG observation: wrap every torch sampling entry point the inference path could reach and log
# (thread, op, shape, dtype, first official caller). Python's random and numpy are checked by
# comparing their states before and after each call.
# ----------------------------------------------------------------------------------------------
class RngLog:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.enabled = False

    def record(self, op: str, shape, dtype) -> None:
        if not self.enabled:
            return
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
THREAD_ERRORS: list[str] = []


def capture_thread_errors() -> None:
    """Remember exceptions that kill the official LLM thread (they are only printed otherwise)."""
    original = threading.excepthook

    def hook(args) -> None:
        THREAD_ERRORS.append(f"{args.exc_type.__name__}: {args.exc_value}")
        original(args)

    threading.excepthook = hook


def install_rng_hooks() -> None:
    def wrap_function(owner, name: str, shape_of) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            RNG.record(name, shape_of(args, kwargs, result), getattr(result, "dtype", None))
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
        self.reset()
        frontend, model = cosyvoice.frontend, cosyvoice.model

        original_normalize = frontend.text_normalize

        def text_normalize(text, split=True, text_frontend=True):
            result = original_normalize(text, split=split, text_frontend=text_frontend)
            if isinstance(text, str):
                self.normalized.append({"input": text, "split": split, "output": result})
            else:
                self.normalized.append(
                    {"input": "<generator>", "split": split, "output": ["<generator>"]}
                )
            return result

        frontend.text_normalize = text_normalize
        for name in (
            "frontend_sft",
            "frontend_zero_shot",
            "frontend_cross_lingual",
            "frontend_instruct2",
            "frontend_vc",
        ):
            self._wrap_frontend(frontend, name)

        for name in ("inference", "inference_bistream"):
            self._wrap_llm(model.llm, name)

        original_token2wav = model.token2wav

        def token2wav(**kwargs):
            self.token2wav_calls.append(
                {
                    "token": kwargs["token"].clone(),
                    "token_offset": int(kwargs["token_offset"]),
                    "stream": bool(kwargs.get("stream", False)),
                    "finalize": bool(kwargs.get("finalize", False)),
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

        def hift_inference(**kwargs):
            self.hift_mels.append(kwargs["speech_feat"].detach().cpu().clone())
            return original_hift(**kwargs)

        model.hift.inference = hift_inference

    def _wrap_frontend(self, frontend, name: str) -> None:
        original = getattr(frontend, name)

        def wrapper(*args, **kwargs):
            model_input = original(*args, **kwargs)
            self.model_inputs.append(
                {
                    k: v.detach().cpu().clone()
                    for k, v in model_input.items()
                    if isinstance(v, torch.Tensor)
                }
            )
            return model_input

        setattr(frontend, name, wrapper)

    def _wrap_llm(self, llm, name: str) -> None:
        original = getattr(llm, name)

        def wrapper(*args, **kwargs):
            for token in original(*args, **kwargs):
                self.llm_tokens.append(int(token))
                yield token

        setattr(llm, name, wrapper)

    def reset(self) -> None:
        self.normalized: list[dict] = []
        self.model_inputs: list[dict] = []
        self.llm_tokens: list[int] = []
        self.token2wav_calls: list[dict] = []
        self.flow_mels: list[torch.Tensor] = []
        self.hift_mels: list[torch.Tensor] = []


class _WaitForLlm:
    """Stands in for cosyvoice.cli.model.time: its sleep waits until every LLM thread has ended."""

    def __init__(self, model) -> None:
        self.model = model

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds) -> None:
        while not all(self.model.llm_end_dict.values()):
            time.sleep(0.01)


def set_poll(model, wait_for_llm: bool) -> None:
    import cosyvoice.cli.model as model_module

    model_module.time = _WaitForLlm(model) if wait_for_llm else time


# ----------------------------------------------------------------------------------------------


def resolve_kwargs(kwargs: dict) -> dict:
    resolved = dict(kwargs)
    for key in ("prompt_wav", "source_wav"):
        if resolved.get(key):
            resolved[key] = str(AUDIO_DIR / resolved[key])
    if "tts_text_pieces" in resolved:
        pieces = resolved.pop("tts_text_pieces")
        resolved["tts_text"] = (piece for piece in pieces)
    return resolved


def run_case(
    cosyvoice,
    recorder: Recorder,
    method: str,
    kwargs: dict,
    seed: int,
    expect_llm_error: bool = False,
) -> tuple[dict, dict]:
    from cosyvoice.utils.common import set_all_random_seed

    THREAD_ERRORS.clear()
    recorder.reset()
    RNG.take()
    RNG.enabled = True
    set_all_random_seed(seed)
    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    chunks = [out["tts_speech"] for out in getattr(cosyvoice, method)(**resolve_kwargs(kwargs))]
    RNG.enabled = False
    events = RNG.take()
    untouched = random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state)
    assert bool(THREAD_ERRORS) == expect_llm_error, THREAD_ERRORS

    segments = [n["output"] for n in recorder.normalized if n["split"]]
    assert method == "inference_vc" or len(segments[0]) == 1, f"expected one segment: {segments}"
    model_input = recorder.model_inputs[-1]  # the outer frontend call
    arrays: dict[str, np.ndarray] = {}
    for key in (
        "text",
        "prompt_text",
        "llm_prompt_speech_token",
        "flow_prompt_speech_token",
        "source_speech_token",
    ):
        if key in model_input and not (key == "text" and "tts_text_pieces" in kwargs):
            out_key = key + "_token" if key in ("text", "prompt_text") else key
            arrays[out_key] = model_input[key].numpy().astype(np.int32)
    for key in ("llm_embedding", "flow_embedding", "prompt_speech_feat"):
        if key in model_input:
            arrays[key] = model_input[key].numpy().astype(np.float32)
    if "tts_text_pieces" in kwargs:
        tokenizer = cosyvoice.frontend.tokenizer
        pieces = [
            tokenizer.encode(p, allowed_special=cosyvoice.frontend.allowed_special)
            for p in kwargs["tts_text_pieces"]
        ]
        arrays["text_piece_tokens"] = np.array([t for p in pieces for t in p], dtype=np.int32)
        arrays["text_piece_lens"] = np.array([len(p) for p in pieces], dtype=np.int32)
    if method != "inference_vc":
        arrays["llm_token"] = np.array(recorder.llm_tokens, dtype=np.int32)
    final_call = recorder.token2wav_calls[-1]
    arrays["speech_token"] = final_call["token"].reshape(-1).numpy().astype(np.int32)
    stream = bool(kwargs.get("stream"))
    if stream:
        for i, (chunk, flow_mel, hift_mel) in enumerate(
            zip(chunks, recorder.flow_mels, recorder.hift_mels, strict=True)
        ):
            arrays[f"chunk_{i}"] = chunk.numpy().astype(np.float32)
            arrays[f"flow_mel_{i}"] = flow_mel.numpy().astype(np.float32)
            arrays[f"hift_mel_{i}"] = hift_mel.numpy().astype(np.float32)
    else:
        (flow_mel,), (hift_mel,) = recorder.flow_mels, recorder.hift_mels
        arrays["flow_mel"] = flow_mel.numpy().astype(np.float32)
        arrays["hift_mel"] = hift_mel.numpy().astype(np.float32)
        arrays["tts_speech"] = torch.cat(chunks, dim=1).numpy().astype(np.float32)

    entry = {
        "method": method,
        "kwargs": kwargs,
        "seed": seed,
        "text_normalize": recorder.normalized,
        "n_llm_tokens": len(recorder.llm_tokens),
        "n_speech_tokens": int(arrays["speech_token"].shape[0]),
        "n_samples": int(sum(c.shape[1] for c in chunks)),
        "python_and_numpy_rng_untouched": untouched,
        "rng_draws": compress(events),
    }
    if THREAD_ERRORS:
        entry["llm_thread_error"] = list(THREAD_ERRORS)
    if stream:
        entry["stream_chunks"] = [
            {
                "tokens": int(c["token"].shape[1]),
                "token_offset": c["token_offset"],
                "stream": c["stream"],
                "finalize": c["finalize"],
                "samples": int(chunk.shape[1]),
            }
            for c, chunk in zip(recorder.token2wav_calls, chunks, strict=True)
        ]
    return entry, arrays


def save(version: str, name: str, entry: dict, arrays: dict) -> dict:
    np.savez_compressed(OUT[version] / f"{name}.npz", **arrays)
    entry["arrays"] = {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()}
    return entry


def v3_hift_buffers(cosyvoice) -> dict[str, np.ndarray]:
    """The CausalHiFTGenerator fixed tensors (plain attributes, not in hift.pt), and a check that
    plain torch rebuilds them.

    hyperpyyaml builds, after set_all_random_seed(0) in CausalConditionalCFM.__init__:
    randn(1, 80, 15000); flow.input_embedding Embedding(6561, 80); flow.spk_embed_affine_layer
    Linear(192, 80); hift.f0_predictor CausalConvRNNF0Predictor(1, 80, cond_channels) (default
    init); then CausalHiFTGenerator, whose m_source comes first: SineGen2 draws
    rand_ini = rand(1, 9) (column 0 then zeroed) and sine_waves = rand(1, 7200000, 9), then
    l_linear = Linear(9, 1) is initialised and uv = rand(1, 7200000, 1) drawn.
    """
    from cosyvoice.hifigan.f0_predictor import CausalConvRNNF0Predictor
    from cosyvoice.utils.common import set_all_random_seed

    m_source = cosyvoice.model.hift.m_source
    sine_gen = m_source.l_sin_gen
    rows = 4096
    out = {
        "rand_ini": sine_gen.rand_ini.numpy(),
        "sine_waves_head": sine_gen.sine_waves[:, :rows].numpy(),
        "uv_head": m_source.uv[:, :rows].numpy(),
        "sine_waves_sum": np.array(sine_gen.sine_waves.double().sum().item()),
        "uv_sum": np.array(m_source.uv.double().sum().item()),
        "sine_waves_shape": np.array(sine_gen.sine_waves.shape),
    }
    cond = cosyvoice.model.hift.f0_predictor.classifier.in_features
    set_all_random_seed(0)
    torch.randn([1, 80, 50 * 300])
    torch.nn.Embedding(6561, 80)
    torch.nn.Linear(192, 80)
    CausalConvRNNF0Predictor(1, 80, cond)
    rand_ini = torch.rand(1, 9)
    rand_ini[:, 0] = 0
    sine_waves = torch.rand(1, 300 * 24000, 9)
    torch.nn.Linear(9, 1)
    uv = torch.rand(1, 300 * 24000, 1)
    out["rebuilt_in_plain_torch_equal"] = np.array(
        torch.equal(rand_ini, sine_gen.rand_ini)
        and torch.equal(sine_waves, sine_gen.sine_waves)
        and torch.equal(uv, m_source.uv)
    )
    return out


class Loader:
    """Builds official model objects (each with its Recorder) on runnable copies of a directory."""

    def __init__(self, cls, model_dir: Path, workdir: Path) -> None:
        self.cls, self.model_dir, self.workdir = cls, model_dir, workdir
        self.copies: dict[str, Path] = {}

    def __call__(self, llm_file: str = "llm.pt"):
        if llm_file not in self.copies:
            self.copies[llm_file] = runnable_copy(self.model_dir, self.workdir, llm_file)
        cosyvoice = self.cls(str(self.copies[llm_file]))
        assert cosyvoice.frontend.text_frontend == "wetext", cosyvoice.frontend.text_frontend
        return cosyvoice, Recorder(cosyvoice)


def main() -> None:
    import logging

    point_wetext_at_local_fsts()
    install_rng_hooks()
    capture_thread_errors()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for version in ("v2", "v3"):
            model_dir = VERSIONS[version]["out"]
            cls = official_class(version)
            out = OUT[version]
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            load = Loader(cls, model_dir, workdir)

            logging.disable(logging.INFO)  # the official code logs every step
            manifest: dict = {
                "model_dir": str(model_dir.relative_to(ROOT)),
                "official": "FunAudioLLM/CosyVoice ace7c47 + Matcha-TTS dd9105b, CPU, fp32",
                "torch": torch.__version__,
                "cases": {},
            }
            shared: dict[str, tuple] = {}
            for name, (method, kwargs, seed, options) in CASES[version].items():
                llm_file = options.get("llm_file", "llm.pt")
                stream = bool(kwargs.get("stream"))
                if stream:  # fresh model: the official loop mutates self.token_hop_len
                    cosyvoice, recorder = load(llm_file)
                else:
                    if llm_file not in shared:
                        shared[llm_file] = load(llm_file)
                    cosyvoice, recorder = shared[llm_file]
                set_poll(cosyvoice.model, wait_for_llm=stream)
                entry, arrays = run_case(
                    cosyvoice,
                    recorder,
                    method,
                    kwargs,
                    seed,
                    expect_llm_error=options.get("expect_llm_error", False),
                )
                entry["llm_file"] = llm_file
                if stream:
                    entry["poll"] = "cosyvoice.cli.model.time.sleep waits for the LLM thread"
                    entry["token_hop_len_after_run"] = int(cosyvoice.model.token_hop_len)
                    # the same call without streaming must give the same tokens
                    plain = dict(kwargs, stream=False)
                    ref_model, ref_recorder = shared.get(llm_file) or load(llm_file)
                    set_poll(ref_model.model, wait_for_llm=False)
                    _, ref_arrays = run_case(ref_model, ref_recorder, method, plain, seed)
                    entry["tokens_equal_non_stream"] = bool(
                        np.array_equal(ref_arrays["speech_token"], arrays["speech_token"])
                    )
                    if version == "v3":  # no draws outside the LLM: the untouched poll must agree
                        fresh, fresh_recorder = load(llm_file)
                        set_poll(fresh.model, wait_for_llm=False)
                        _, official_arrays = run_case(fresh, fresh_recorder, method, kwargs, seed)
                        entry["official_poll_identical"] = sorted(official_arrays) == sorted(
                            arrays
                        ) and all(np.array_equal(official_arrays[k], arrays[k]) for k in arrays)
                manifest["cases"][name] = save(version, name, entry, arrays)
                chunks = len(entry.get("stream_chunks", [])) or ""
                print(
                    version,
                    name,
                    entry["n_llm_tokens"],
                    "llm tokens",
                    entry["n_speech_tokens"],
                    "speech tokens",
                    entry["n_samples"],
                    "samples",
                    chunks,
                    flush=True,
                )

            # Determinism check: the first case again must give the same waveform.
            first = next(iter(CASES[version]))
            method, kwargs, seed, _ = CASES[version][first]
            cosyvoice, recorder = shared["llm.pt"]
            _, again = run_case(cosyvoice, recorder, method, kwargs, seed)
            saved = np.load(out / f"{first}.npz")
            manifest["repeat_identical"] = bool(
                np.array_equal(saved["tts_speech"], again["tts_speech"])
            )
            if version == "v3":
                np.savez_compressed(out / "hift_buffers.npz", **v3_hift_buffers(cosyvoice))
            with open(out / "manifest.json", "w", encoding="utf-8") as f:
                json.dump(manifest, f, ensure_ascii=False, indent=1)
            total = sum(p.stat().st_size for p in out.iterdir())
            print(f"wrote {len(list(out.iterdir()))} files, {total} bytes to {out}", flush=True)


if __name__ == "__main__":
    main()
