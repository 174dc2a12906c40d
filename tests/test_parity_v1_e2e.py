"""End-to-end parity with the official CosyVoice v1 on the tiny official-format directory.

Goldens: tools/golden/v1_end_to_end.py ran the official ``CosyVoice`` class on the same directory
and prompts with ``set_all_random_seed(seed)`` before each call. We compare every stage: text
normalisation and tokens, prompt speech tokens, x-vector, prompt mel, generated speech tokens, and
the waveform (within 1e-4).

The official HEAD analyses every prompt's mel at 24 kHz, also for the 22.05 kHz v1 models (a
regression of commit 622a3a1); cosyvoice-lite uses the model's own rate. Cases recorded at 24 kHz
are therefore checked end to end from the official model inputs, and the case recorded with the
22.05 kHz prompt mel (``*_prompt22050``) is checked through our whole engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _golden import golden_file

from cosyvoice_lite import Engine, Mode, SynthesisRequest
from cosyvoice_lite.pipelines.common import ModelInputs
from cosyvoice_lite.sampling import RasSampler

AUDIO = Path(__file__).resolve().parent / "data" / "audio"
MANIFEST = json.loads((golden_file("v1_e2e/manifest.json")).read_text(encoding="utf-8"))["cases"]
TOL = 1e-4
PHASE_TOL = 5e-2  # float32 rounding (~1e-6 in the mel) through the vocoder's source phase

METHOD_MODES = {
    "inference_sft": Mode.PRESET,
    "inference_zero_shot": Mode.ZERO_SHOT,
    "inference_cross_lingual": Mode.CROSS_LINGUAL,
    "inference_instruct": Mode.INSTRUCT,
    "inference_vc": Mode.VOICE_CONVERSION,
}


@pytest.fixture(scope="module")
def engine(v1_variants: dict[str, Path]) -> Engine:
    # the instruct release supports every v1 mode; float32 products as the official computes them
    return Engine.load(v1_variants["instruct"], exact_float32=True)


def _request(case: dict) -> SynthesisRequest:
    kw = case["kwargs"]
    audio = {k: AUDIO / kw[k] for k in ("prompt_wav", "source_wav") if k in kw}
    return SynthesisRequest(
        mode=METHOD_MODES[case["method"]],
        text=kw.get("tts_text", ""),
        voice=kw.get("spk_id"),
        prompt_audio=audio.get("prompt_wav"),
        prompt_text=kw.get("prompt_text"),
        instruct=kw.get("instruct_text"),
        source_audio=audio.get("source_wav"),
        speed=kw.get("speed", 1.0),
        seed=case["seed"],
    )


def _golden_inputs(gold) -> ModelInputs:
    def tokens(key: str) -> torch.Tensor:
        return torch.from_numpy(gold[key]) if key in gold else torch.zeros(1, 0, dtype=torch.int32)

    def floats(key: str, empty: tuple[int, ...]) -> torch.Tensor:
        return torch.from_numpy(gold[key]) if key in gold else torch.zeros(*empty)

    return ModelInputs(
        text=tokens("text_token"),
        prompt_text=tokens("prompt_text_token"),
        llm_prompt_speech_token=tokens("llm_prompt_speech_token"),
        llm_embedding=floats("llm_embedding", (0, 192)),
        flow_prompt_speech_token=tokens("flow_prompt_speech_token"),
        prompt_speech_feat=floats("prompt_speech_feat", (1, 0, 80)),
        flow_embedding=floats("flow_embedding", (0, 192)),
        source_speech_token=torch.from_numpy(gold["source_speech_token"])
        if "source_speech_token" in gold
        else None,
    )


def _close(
    ours: torch.Tensor | np.ndarray, theirs: np.ndarray, what: str, tol: float = TOL
) -> None:
    ours = np.asarray(ours, dtype=np.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs official {theirs.shape}"
    err = float(np.abs(ours - theirs).max()) if ours.size else 0.0
    print(f"parity {what}: max abs error {err:.2e}")  # shown with pytest -s
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"


CASES = [name for name in MANIFEST if not name.startswith("stream_")]


@pytest.mark.parametrize("name", CASES)
def test_frontend_matches_official(engine: Engine, name: str) -> None:
    case, gold = MANIFEST[name], np.load(golden_file(f"v1_e2e/{name}.npz"))
    request = _request(case)
    if request.mode != Mode.VOICE_CONVERSION:
        official_segments = case["text_normalize"][-1]["output"]
        assert engine._segments(request) == official_segments
    segment = engine._segments(request)[0]
    prompt = engine._prompt(request, None)
    inputs = engine._inputs(request, segment, prompt)
    for key, ours in (
        ("text_token", inputs.text),
        ("prompt_text_token", inputs.prompt_text),
        ("llm_prompt_speech_token", inputs.llm_prompt_speech_token),
        ("flow_prompt_speech_token", inputs.flow_prompt_speech_token),
        ("source_speech_token", inputs.source_speech_token),
    ):
        if key in gold:
            np.testing.assert_array_equal(ours.numpy(), gold[key], err_msg=key)
    for key, ours in (
        ("llm_embedding", inputs.llm_embedding),
        ("flow_embedding", inputs.flow_embedding),
    ):
        if key in gold:
            _close(ours, gold[key], key)
    if "prompt_speech_feat_22050" in gold:  # our prompt mel: at the model's own rate
        _close(inputs.prompt_speech_feat, gold["prompt_speech_feat_22050"], "prompt mel")
    elif case["prompt_mel_load_rate"] == 22050 and "prompt_speech_feat" in gold:
        _close(inputs.prompt_speech_feat, gold["prompt_speech_feat"], "prompt mel")


@pytest.mark.parametrize("name", CASES)
def test_synthesis_matches_official(engine: Engine, name: str) -> None:
    case, gold = MANIFEST[name], np.load(golden_file(f"v1_e2e/{name}.npz"))
    request = _request(case)
    uses_official_prompt_mel = (
        "prompt_speech_feat" in gold and case["prompt_mel_load_rate"] != 22050
    )
    if uses_official_prompt_mel:  # feed the official model inputs to our networks and pipeline
        generator = torch.Generator().manual_seed(case["seed"])
        sampler = RasSampler(generator, **vars(engine.model.config.sampling))
        pieces = engine.pipeline.synthesize(
            _golden_inputs(gold), sampler, generator, False, request.speed
        )
        audio = torch.cat([p.reshape(-1) for p in pieces]).numpy()
    else:
        audio = np.concatenate([c.samples for c in engine.synthesize(request)])
    _close(audio, gold["tts_speech"].reshape(-1), f"{name} waveform")


def test_streaming_matches_official(engine: Engine) -> None:
    """Official v1 stream: 120-token chunks with a 100-token hop, mel and speech cross-fades.

    The golden run let the LLM finish before the first chunk (as a fast GPU LLM does), so its flow
    and vocoder noise follows every sampling draw; we reproduce that order explicitly."""
    case, gold = MANIFEST["stream_sft_zh"], np.load(golden_file("v1_e2e/stream_sft_zh.npz"))
    inputs = _golden_inputs(gold)
    generator = torch.Generator().manual_seed(case["seed"])
    sampler = RasSampler(generator, **vars(engine.model.config.sampling))
    tokens = list(engine.pipeline.speech_tokens(inputs, sampler))
    np.testing.assert_array_equal(np.array(tokens), gold["speech_token"])
    replay = ModelInputs(**{**vars(inputs), "source_speech_token": torch.tensor([tokens])})
    pieces = list(engine.pipeline.synthesize(replay, sampler, generator, True))
    assert len(pieces) > 1
    audio = torch.cat([p.reshape(-1) for p in pieces]).numpy()
    _close(audio, gold["tts_speech"].reshape(-1), "streamed waveform")


def test_default_float32_kernels_within_rounding_of_official(v1_variants: dict[str, Path]) -> None:
    """By default a CPU computes float32 with oneDNN's kernels (packed linear layers, channels-last
    vocoder convolutions) and the fused cached attention, which sum in another order
    (device.Placement.exact_float32): the same tokens, and a waveform that departs
    from the official's only by that rounding carried through the vocoder's source phase (a
    wrong computation is off by the waveform's whole scale, ~0.5)."""
    engine = Engine.load(v1_variants["instruct"])
    try:
        case, gold = MANIFEST["sft_zh"], np.load(golden_file("v1_e2e/sft_zh.npz"))
        audio = np.concatenate([c.samples for c in engine.synthesize(_request(case))])
    finally:
        engine.close()
    _close(audio, gold["tts_speech"].reshape(-1), "sft_zh waveform, packed float32", PHASE_TOL)
