"""cosyvoice_lite.frontend.speech on the ONNX stand-ins of tools/make_onnx_standins.py: same
results as the official frontend glue, official names/dtypes/shapes, clear errors."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice_lite.audio.io import load_wav
from cosyvoice_lite.errors import AudioError, ModelDirError
from cosyvoice_lite.frontend.speech import SpeakerEncoder, SpeechTokenizer

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden" / "features" / "speech_onnx.npz"


def _standins_module():
    spec = importlib.util.spec_from_file_location(
        "make_onnx_standins", REPO / "tools" / "make_onnx_standins.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[int, dict[str, Path]]:
    module = _standins_module()
    return {v: module.write_standins(tmp_path_factory.mktemp(f"v{v}"), v) for v in (1, 2, 3)}


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return dict(data)


@pytest.fixture(scope="module")
def prompt16k(golden) -> torch.Tensor:
    return load_wav(golden["prompt_wav"].tobytes(), 16000)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_tokens_match_official_glue(standins, golden, prompt16k, version: int) -> None:
    tokenizer = SpeechTokenizer(standins[version]["speech_tokenizer"])
    assert (tokenizer.feats_name, tokenizer.length_name) == ("feats", "feats_length")
    tokens = tokenizer(prompt16k)
    assert tokens.dtype == torch.int32
    np.testing.assert_array_equal(tokens.numpy(), golden[f"tokens_v{version}"])
    frames = prompt16k.shape[1] // 160
    assert tokens.shape == (1, math.ceil(frames / (2 if version == 1 else 4)))
    assert int(tokens.max()) < (4096 if version == 1 else 6561)


def test_embedding_matches_official_glue(standins, golden, prompt16k) -> None:
    encoder = SpeakerEncoder(standins[2]["campplus"])
    assert encoder.input_name == "input"
    embedding = encoder(prompt16k)
    assert embedding.shape == (1, 192) and embedding.dtype == torch.float32
    assert float((embedding - torch.from_numpy(golden["embedding"])).abs().max()) <= 1e-6


def test_standins_are_deterministic(tmp_path: Path, standins) -> None:
    again = _standins_module().write_standins(tmp_path, "v2")
    for key in ("campplus", "speech_tokenizer"):
        assert again[key].read_bytes() == standins[2][key].read_bytes()


def test_standin_io_signature(standins) -> None:
    tokenizer = SpeechTokenizer(standins[1]["speech_tokenizer"])
    (output,) = tokenizer.session.get_outputs()
    assert output.name == "indices" and output.type == "tensor(int32)"
    inputs = {i.name: i.type for i in tokenizer.session.get_inputs()}
    assert inputs == {"feats": "tensor(float)", "feats_length": "tensor(int32)"}
    encoder = SpeakerEncoder(standins[1]["campplus"])
    assert [o.name for o in encoder.session.get_outputs()] == ["output"]


def test_tokenizer_refuses_more_than_30_seconds(standins) -> None:
    tokenizer = SpeechTokenizer(standins[2]["speech_tokenizer"])
    with pytest.raises(AudioError, match="30 s"):
        tokenizer(torch.full((1, 16000 * 30 + 1), 0.1))


def test_wrappers_reject_stereo(standins) -> None:
    with pytest.raises(AudioError, match="mono"):
        SpeakerEncoder(standins[2]["campplus"])(torch.zeros(2, 16000))


def test_invalid_onnx_files(tmp_path: Path, standins) -> None:
    garbage = tmp_path / "campplus.onnx"
    garbage.write_bytes(b"\x00not an onnx model" * 10)
    with pytest.raises(ModelDirError, match="not a valid ONNX model"):
        SpeakerEncoder(garbage)
    with pytest.raises(ModelDirError, match="does not exist"):
        SpeechTokenizer(tmp_path / "speech_tokenizer_v2.onnx")
    # A campplus file where a tokenizer is expected: wrong number of inputs.
    with pytest.raises(ModelDirError, match="inputs"):
        SpeechTokenizer(standins[2]["campplus"])
