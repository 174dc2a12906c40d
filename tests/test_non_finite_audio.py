"""A model whose output holds NaN (damaged weights, or float16 overflowing on a device): LAME
aborted the whole server process on one NaN sample (an assertion in C), wav carried it as a
full-scale DC offset and pcm as silence, both answered 200. Now the request fails alone, with a
clear error, before anything reaches an encoder; the encoders refuse such samples themselves."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_model
from test_server_support import EngineProbe, ServerThread

from cosyvoice_lite.audio.io import encode_audio
from cosyvoice_lite.engine import Engine
from cosyvoice_lite.errors import AudioError, ModelOutputError, non_finite_cause
from cosyvoice_lite.request import Mode, SynthesisRequest
from cosyvoice_lite.sampling import RasSampler, sample_rows
from cosyvoice_lite.serving import Settings, create_app
from cosyvoice_lite.serving.streaming import Encoder


@pytest.fixture(scope="module")
def engine(v1_dir, tmp_path_factory) -> Engine:
    """The tiny v1 model with one NaN in the vocoder's last bias: every sample is NaN."""
    model = copy_model(v1_dir, tmp_path_factory.mktemp("nan") / "v1-nan")
    state = torch.load(model / "hift.pt", weights_only=True)
    state["conv_post.bias"] = torch.full_like(state["conv_post.bias"], float("nan"))
    torch.save(state, model / "hift.pt")
    with Engine.load(model) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    settings = Settings(voices_dir=tmp_path_factory.mktemp("voices"))
    with ServerThread(create_app(EngineProbe(engine), settings)) as running:
        yield running


def _request(engine: Engine, stream: bool) -> SynthesisRequest:
    return SynthesisRequest(
        Mode.PRESET, "你好。", voice=engine.voices()[0], seed=1, max_speech_tokens=20,
        ignore_eos=True, stream=stream,
    )  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_the_engine_refuses_non_finite_output(engine: Engine, stream: bool) -> None:
    with pytest.raises(ModelOutputError, match=r"NaN or infinite samples .* float32"):
        list(engine.synthesize(_request(engine, stream)))


@pytest.mark.parametrize("format", ["mp3", "wav", "pcm", "flac"])
@pytest.mark.parametrize("stream", [False, True])
def test_the_server_answers_500_and_lives_on(server, engine, format: str, stream: bool) -> None:
    body = {
        "model": "tts-1",
        "input": "你好。",
        "voice": engine.voices()[0],
        "response_format": format,
    }
    with server.client() as client:
        response = client.post("/v1/audio/speech", json={**body, "stream": stream})
        assert response.status_code == 500, response.text[:200]
        error = response.json()["error"]
        assert error["code"] == "non_finite_audio" and error["type"] == "server_error"
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("format", ["mp3", "wav", "flac", "ogg"])
def test_encoders_refuse_non_finite_samples(format: str, bad: float) -> None:
    samples = np.sin(np.arange(8000, dtype=np.float32) / 10)
    samples[4000] = bad
    with pytest.raises(AudioError, match="contains 1 NaN or infinite samples"):
        encode_audio(samples, 24000, format)
    with pytest.raises(AudioError, match="contains 1 NaN or infinite samples"):
        Encoder(format, 24000).feed(samples)


def test_the_say_command_leaves_no_file(engine: Engine, tmp_path: Path, capsys) -> None:
    from cosyvoice_lite.cli import main

    out = tmp_path / "out.mp3"
    args = ["say", "你好。", "--model", str(engine.model.path), "--voice", engine.voices()[0]]
    assert main([*args, "-o", str(out), "--stream"]) == 2
    assert "NaN or infinite samples" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module", params=["v1-tiny", "v2-tiny"])
def nan_llm(request, v1_dir, tmp_path_factory) -> Engine:
    """A tiny model whose LLM's output bias is NaN: every speech-token log-probability is NaN."""
    model = copy_model(DATA / "models" / request.param, tmp_path_factory.mktemp("nan-llm") / "m")
    state = torch.load(model / "llm.pt", weights_only=True)
    state["llm_decoder.bias"] = torch.full_like(state["llm_decoder.bias"], float("nan"))
    torch.save(state, model / "llm.pt")
    with Engine.load(model) as loaded:
        yield loaded


@pytest.mark.parametrize("stream", [False, True])
def test_non_finite_speech_token_probabilities_are_the_model_s_fault(
    nan_llm: Engine, stream: bool
) -> None:
    """NaN from the LLM was torch's 'probability tensor contains either inf, nan or element
    < 0' (a plain RuntimeError: the server's 500 named no cause); it is a ModelOutputError now,
    in the words NaN samples get."""
    request = SynthesisRequest(
        Mode.PRESET, "你好。", voice="中文女", seed=1, max_speech_tokens=20, stream=stream
    )
    cause = re.escape(non_finite_cause())
    with pytest.raises(ModelOutputError, match=f"speech-token probabilities are NaN.*: {cause}"):
        list(nan_llm.synthesize(request))


def test_non_finite_scores_fail_their_row_alone() -> None:
    """In a step's draws (``sample_rows``) a row of NaN or infinite scores gets the error, the
    others their tokens as alone; a sampler called alone (``run_alone``) raises the same."""
    scores = torch.randn(3, 50).log_softmax(dim=-1)
    scores[1, 7] = float("nan")
    scores[2, 3] = float("inf")
    samplers = [RasSampler(torch.Generator().manual_seed(i)) for i in range(3)]
    tokens = sample_rows([(row.clone(), [], s) for row, s in zip(scores, samplers, strict=True)])
    assert tokens[0] == RasSampler(torch.Generator().manual_seed(0))(scores[0].clone(), [])
    for error in tokens[1:]:
        assert isinstance(error, ModelOutputError) and non_finite_cause() in str(error)
    with pytest.raises(ModelOutputError, match="speech-token probabilities are NaN"):
        RasSampler(torch.Generator().manual_seed(1))(scores[1].clone(), [])
