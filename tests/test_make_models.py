"""The fixture generator writes directories in the official layout that our engine loads."""

from __future__ import annotations

import sys
from pathlib import Path

from cosyvoice_lite import Engine, Mode, SynthesisRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from make_models import make_model, render_yaml  # noqa: E402


def test_render_yaml_rewrites_dotted_keys_only() -> None:
    template = "a: 1\nllm: !new:x.Y\n    a: 2\n    sub: !new:x.Z\n        a: 3 # note\n"
    out = render_yaml(template, {"llm.sub.a": 9, "a": 0})
    assert out == "a: 0\nllm: !new:x.Y\n    a: 2\n    sub: !new:x.Z\n        a: 9 # note\n"


def test_generated_tiny_model_loads_and_speaks(tmp_path: Path, whisper_vocab) -> None:
    model = make_model(tmp_path / "CosyVoice-300M-SFT", version=1, size="tiny", variant="sft")
    assert {p.name for p in model.iterdir()} >= {
        "cosyvoice.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx",
        "speech_tokenizer_v1.onnx", "spk2info.pt", "configuration.json"}
    engine = Engine.load(model)
    chunks = list(engine.synthesize(SynthesisRequest(Mode.PRESET, "你好。", voice=engine.voices()[0], seed=0)))
    assert chunks[-1].final and chunks[-1].sample_rate == 22050
