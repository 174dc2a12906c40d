"""The fixture generator writes directories in the official layout that our engine loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cosyvoice_lite import Engine, Mode, SynthesisRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from make_models import main, make_model, render_yaml  # noqa: E402

AUDIO = Path(__file__).resolve().parent / "data" / "audio"


def test_render_yaml_rewrites_dotted_keys_only() -> None:
    template = "a: 1\nllm: !new:x.Y\n    a: 2\n    sub: !new:x.Z\n        a: 3 # note\n"
    out = render_yaml(template, {"llm.sub.a": 9, "a": 0})
    assert out == "a: 0\nllm: !new:x.Y\n    a: 2\n    sub: !new:x.Z\n        a: 9 # note\n"


def test_generated_tiny_model_loads_and_speaks(tmp_path: Path, whisper_vocab) -> None:
    model = make_model(tmp_path / "CosyVoice-300M-SFT", version=1, size="tiny", variant="sft")
    assert {p.name for p in model.iterdir()} >= {
        "cosyvoice.yaml",
        "llm.pt",
        "flow.pt",
        "hift.pt",
        "campplus.onnx",
        "speech_tokenizer_v1.onnx",
        "spk2info.pt",
        "configuration.json",
    }
    engine = Engine.load(model)
    chunks = list(
        engine.synthesize(SynthesisRequest(Mode.PRESET, "你好。", voice=engine.voices()[0], seed=0))
    )
    assert chunks[-1].final and chunks[-1].sample_rate == 22050


@pytest.mark.parametrize("version", [2, 3])
def test_generated_tiny_v2_v3_models_load_and_speak(tmp_path: Path, version: int) -> None:
    name = {2: "CosyVoice2-0.5B", 3: "Fun-CosyVoice3-0.5B-2512"}[version]
    model = make_model(tmp_path / name, version=version, size="tiny")
    expected = {
        f"cosyvoice{version}.yaml",
        "llm.pt",
        "flow.pt",
        "hift.pt",
        "campplus.onnx",
        f"speech_tokenizer_v{version}.onnx",
        "configuration.json",
        "CosyVoice-BlankEN",
        "spk2info.pt" if version == 2 else "llm.rl.pt",
    }
    assert {p.name for p in model.iterdir()} >= expected
    assert {p.name for p in (model / "CosyVoice-BlankEN").iterdir()} == {
        "config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
    }
    # the vocoder checkpoint in the spelling of the release: legacy weight norm (v2), parametrizations (v3)
    hift_keys = set(torch.load(model / "hift.pt", weights_only=True))
    spelled = "conv_pre.weight_g" if version == 2 else "conv_pre.parametrizations.weight.original0"
    assert spelled in hift_keys and "conv_pre.weight" not in hift_keys
    engine = Engine.load(model, llm_checkpoint="llm.rl.pt" if version == 3 else "llm.pt")
    assert engine.version == version
    # short text and prompt: random weights decode up to max_len (20 x 3 text tokens) speech tokens
    request = SynthesisRequest(
        Mode.CROSS_LINGUAL, "好。", prompt_audio=AUDIO / "en_22k.wav", seed=0, stream=True
    )
    chunks = list(engine.synthesize(request))
    assert chunks[-1].final and chunks[-1].sample_rate == 24000


def test_existing_directory_with_files_is_refused_unless_forced(
    tmp_path: Path, monkeypatch
) -> None:
    # a downloaded model's directory must not get random weights written over its own
    model = tmp_path / "CosyVoice-300M"
    model.mkdir()
    (model / "llm.pt").write_bytes(b"real weights")
    with pytest.raises(FileExistsError, match="not empty"):
        make_model(model, version=1, size="tiny")
    monkeypatch.setattr(sys, "argv", ["make_models.py", "--size", "tiny", "--out", str(model)])
    with pytest.raises(SystemExit, match="--force"):
        main()
    assert [p.name for p in model.iterdir()] == ["llm.pt"]
    assert (model / "llm.pt").read_bytes() == b"real weights"
    make_model(model, version=1, size="tiny", force=True)
    assert (model / "spk2info.pt").is_file() and (model / "llm.pt").read_bytes() != b"real weights"
