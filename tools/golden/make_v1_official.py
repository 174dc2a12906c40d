"""Build the tiny CosyVoice v1 model directory tests/data/models/v1-tiny with the OFFICIAL classes.

The modules are built from tools/golden/tiny_v1.yaml (the official v1 yaml with tiny dimensions)
by hyperpyyaml, exactly as ``cosyvoice.cli.cosyvoice.CosyVoice`` does, then their weights are
re-initialised from a fixed seed so that every parameter matters, and saved the way the released
files are: plain ``torch.save(state_dict)``. Run it in the reference environment:

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \\
        /tmp/refenv/bin/python tools/golden/make_v1_official.py

Directory written (it serves as CosyVoice-300M-SFT and -Instruct; the base CosyVoice-300M layout
is the same directory without spk2info.pt):

  cosyvoice.yaml             copy of tools/golden/tiny_v1.yaml
  llm.pt, flow.pt, hift.pt   state_dicts; hift.pt uses the legacy weight-norm spelling
                             (``weight_g``/``weight_v``) of torch.nn.utils.weight_norm
  campplus.onnx, speech_tokenizer_v1.onnx   stand-ins from tools/make_onnx_standins.py
  spk2info.pt                {voice: {'embedding': Tensor[1, 192]}}
  configuration.json         ModelScope descriptor

Finally the directory is loaded back with the official ``CosyVoice`` class (strict loading) and
every tensor is compared with what was saved.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "tools" / "golden" / "tiny_v1.yaml"
OUT_DIR = ROOT / "tests" / "data" / "models" / "v1-tiny"
LOCAL_WETEXT_FSTS = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "wetext" / "fsts"

SEED = 20240701
# Weight matrices get N(0, (GAIN / sqrt(fan_in))^2); biases N(0, BIAS_STD^2); norm scales and
# Snake alphas 1 + N(0, SCALE_STD^2); weight-norm magnitudes g = |v| * (1 + N(0, SCALE_STD^2)).
GAIN = 1.0
BIAS_STD = 0.05
SCALE_STD = 0.1
# LLM output layer: scale the logits up so that next-token distributions are peaky enough for the
# top-p cut (0.8) to bite before top-k (25) on most steps and for repetition-aware resampling to
# trigger now and then; and bias the end-of-speech logit so that EOS falls inside the nucleus now
# and then: a 10-token text stops after tens of tokens (min_len = 2 N, max_len = 20 N).
LLM_DECODER_SCALE = 4.0
LLM_EOS_BIAS = 8.0
# The F0 predictor ends in |Linear|; scale it so that F0 spreads over tens to hundreds of Hz, mostly
# voiced (threshold 10 Hz) with some unvoiced frames, instead of ~1 Hz (all unvoiced).
F0_CLASSIFIER_SCALE = 170.0
# Halve the vocoder's log-magnitude output so that little of the waveform hits the 0.99 clamp.
HIFT_CONV_POST_SCALE = 0.5

VOICES = ("中文女", "英文男", "日语男")
CONFIGURATION = {"framework": "pytorch", "task": "text-to-speech"}


def load_official_modules() -> dict:
    """Parse the yaml exactly as the official CosyVoice class does (this also runs its seeds)."""
    with open(YAML) as f:
        return load_hyperpyyaml(f)


def _is_weight_norm_g(name: str) -> bool:
    return name.endswith(("parametrizations.weight.original0", "weight_g"))


def _weight_norm_v(name: str) -> str:
    if name.endswith("original0"):
        return name[: -len("original0")] + "original1"
    return name[: -len("weight_g")] + "weight_v"


@torch.no_grad()
def randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every parameter (in named_parameters order) from ``generator``."""
    params = dict(module.named_parameters())
    for name, p in params.items():
        if _is_weight_norm_g(name):
            continue
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=generator) * (GAIN / math.sqrt(fan_in)))
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=generator) * BIAS_STD)
        else:  # LayerNorm / GroupNorm scales, Snake alphas
            p.copy_(1.0 + torch.randn(p.shape, generator=generator) * SCALE_STD)
    for name, g in params.items():
        if _is_weight_norm_g(name):
            v = params[_weight_norm_v(name)]
            norm = v.flatten(1).norm(dim=1).reshape(g.shape)
            g.copy_(norm * (1.0 + torch.randn(g.shape, generator=generator) * SCALE_STD))


@torch.no_grad()
def tune(llm: torch.nn.Module, hift: torch.nn.Module) -> None:
    llm.llm_decoder.weight.mul_(LLM_DECODER_SCALE)
    llm.llm_decoder.bias[llm.speech_token_size] += LLM_EOS_BIAS
    hift.f0_predictor.classifier.weight.mul_(F0_CLASSIFIER_SCALE)
    hift.conv_post.parametrizations.weight.original0.mul_(HIFT_CONV_POST_SCALE)


def legacy_weight_norm_names(state_dict: dict) -> dict:
    """``x.parametrizations.weight.original0/1`` -> ``x.weight_g/weight_v`` (order kept)."""
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        renamed[key] = value.detach().clone().contiguous()
    return renamed


def plain(state_dict: dict) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in state_dict.items()}


def make_spk2info(generator: torch.Generator) -> dict:
    return {name: {"embedding": torch.randn(1, 192, generator=generator)} for name in VOICES}


def write_directory(configs: dict) -> dict[str, dict]:
    generator = torch.Generator().manual_seed(SEED)
    llm, flow, hift = configs["llm"], configs["flow"], configs["hift"]
    for module in (llm, flow, hift):
        randomize(module, generator)
    tune(llm, hift)

    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)
    saved = {
        "llm.pt": plain(llm.state_dict()),
        "flow.pt": plain(flow.state_dict()),
        "hift.pt": legacy_weight_norm_names(hift.state_dict()),
        "spk2info.pt": make_spk2info(generator),
    }
    for filename, obj in saved.items():
        torch.save(obj, OUT_DIR / filename)
    shutil.copyfile(YAML, OUT_DIR / "cosyvoice.yaml")
    (OUT_DIR / "configuration.json").write_text(json.dumps(CONFIGURATION, indent=4) + "\n")

    sys.path.insert(0, str(ROOT / "tools"))
    from make_onnx_standins import write_standins

    write_standins(OUT_DIR, 1)
    return saved


def check_reload(saved: dict[str, dict]) -> None:
    """Load the directory with the official CosyVoice class and compare every tensor."""
    import wetext.wetext

    # wetext 0.0.4 downloads its FSTs when the frontend is built; point it at a local copy (or
    # nowhere: the frontend then falls back to no normalisation, which does not matter here).
    wetext.wetext.snapshot_download = lambda *args, **kwargs: str(LOCAL_WETEXT_FSTS)
    from cosyvoice.cli.cosyvoice import CosyVoice

    model = CosyVoice(str(OUT_DIR))
    loaded = {
        "llm.pt": model.model.llm.state_dict(),
        "flow.pt": model.model.flow.state_dict(),
        "hift.pt": legacy_weight_norm_names(model.model.hift.state_dict()),
    }
    for filename, state in loaded.items():
        expected = saved[filename]
        assert list(state) == list(expected), filename
        for key, value in state.items():
            assert torch.equal(value.cpu(), expected[key]), (filename, key)
    assert model.list_available_spks() == list(VOICES)
    assert model.sample_rate == 22050


def main() -> None:
    saved = write_directory(load_official_modules())
    check_reload(saved)
    total = 0
    for path in sorted(OUT_DIR.iterdir()):
        total += path.stat().st_size
        print(f"{path.stat().st_size:>10}  {path.relative_to(ROOT)}")
    print(f"{total:>10}  total")


if __name__ == "__main__":
    main()
