"""Build the tiny CosyVoice2 / CosyVoice3 model directories with the OFFICIAL classes.

The modules are built from tools/golden/tiny_v2.yaml and tiny_v3.yaml (the official
cosyvoice2.yaml / cosyvoice3.yaml with tiny dimensions) by hyperpyyaml, exactly as
``cosyvoice.cli.cosyvoice.CosyVoice2`` / ``CosyVoice3`` do (``qwen_pretrain_path`` overridden to the
directory's CosyVoice-BlankEN), their weights are re-initialised from a fixed seed so that outputs
are not degenerate, and they are saved the way the released files are: plain
``torch.save(state_dict)``. Run it in the reference environment:

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \\
        /tmp/refenv/bin/python tools/golden/make_v2v3_official.py

Directories written, tests/data/models/v2-tiny and v3-tiny:

  cosyvoice2.yaml / cosyvoice3.yaml    copy of tools/golden/tiny_v{2,3}.yaml
  llm.pt, flow.pt, hift.pt             state_dicts. The Qwen2 embedding and lm_head are tied (one
                                       storage in the file, as in the release). hift.pt: v2 in the
                                       legacy weight-norm spelling (``weight_g``/``weight_v``), v3 in
                                       the ``parametrizations.weight.original0/1`` spelling
  llm.rl.pt                            v3 only: llm.pt with every weight moved by seeded noise, a
                                       stand-in for the RL-tuned LLM the release ships under this name
  CosyVoice-BlankEN/                   config.json, tokenizer_config.json, vocab.json, merges.txt
                                       copied from tests/data/CosyVoice-BlankEN-tiny (no weights:
                                       every Qwen weight comes from llm.pt)
  campplus.onnx, speech_tokenizer_v{2,3}.onnx   stand-ins from tools/make_onnx_standins.py
  spk2info.pt                          v2 only: '中文女' = {'embedding': Tensor[1, 192]} (the
                                       SFT-voice format) and 'zero_shot_zh' = the official
                                       ``add_zero_shot_spk`` entry for tests/data/audio/zh_16k.wav
  configuration.json                   ModelScope descriptor

The official Qwen2Encoder calls ``Qwen2ForCausalLM.from_pretrained(CosyVoice-BlankEN)``, which needs
a weights file. ``runnable_copy`` therefore makes a throw-away copy of a directory (symlinks) whose
CosyVoice-BlankEN also holds random model.safetensors; llm.pt then overwrites every Qwen weight,
as with the release. Finally each directory is loaded back with the official class (strict
loading) and every tensor is compared with what was saved.

Weights (see ``randomize``, ``shape_llm``, ``shape_hift``) are rounded to bfloat16-exact float32
values: numerically irrelevant, but the files then compress about 2x in git. Embedding rows of
text ids the toy tokenizer never produces are zero (they compress away).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_TOOLS = ROOT / "tools" / "golden"
BLANK_EN_TINY = ROOT / "tests" / "data" / "CosyVoice-BlankEN-tiny"
BLANK_EN_FILES = ("config.json", "tokenizer_config.json", "vocab.json", "merges.txt")
AUDIO_DIR = ROOT / "tests" / "data" / "audio"
MODELS = ROOT / "tests" / "data" / "models"
LOCAL_WETEXT_FSTS = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "wetext" / "fsts"

VERSIONS = {
    "v2": {
        "yaml": GOLDEN_TOOLS / "tiny_v2.yaml",
        "yaml_name": "cosyvoice2.yaml",
        "out": MODELS / "v2-tiny",
        "seed": 20250201,
        "rl_seed": None,
    },
    "v3": {
        "yaml": GOLDEN_TOOLS / "tiny_v3.yaml",
        "yaml_name": "cosyvoice3.yaml",
        "out": MODELS / "v3-tiny",
        "seed": 20251201,
        "rl_seed": 20251202,
    },
}
SPEECH_TOKEN_SIZE = 6561
QWEN_REGULAR = 151643  # ids below this are regular BPE entries; the toy vocab pads them
QWEN_SPECIAL_END = 151924  # v3 added specials end below this id (v2's end at 151662)

# Generic init: weight matrices N(0, (1/sqrt(fan_in))^2); biases N(0, 0.05^2); norm scales and
# Snake alphas 1 + N(0, 0.1^2); weight-norm magnitudes g = |v| * (1 + N(0, 0.1^2)).
BIAS_STD = 0.05
SCALE_STD = 0.1
# Vocoder shaping (see shape_hift), as tools/golden/hift.py for the same tiny dimensions.
F0_CLASSIFIER_SCALE = 60.0
F0_CLASSIFIER_BIAS = 40.0
HIFT_CONV_POST_SCALE = 0.05
HIFT_LOG_MAGNITUDE_BIAS = -3.0
# LLM shaping (see shape_llm): logits spread of a few nats so that top-p and the repetition
# fallback both matter; stop logits that make eos reachable. v2 masks eos below min_len; v3 masks
# only index 6561 (its sos), so its eos is reachable from the first step and kept rarer.
LLM_DECODER_GAIN = 3.5
V2_EOS_BIAS = 11.5
V3_EOS_CH0 = 3.7
V3_SOS_CH0 = 3.0
# llm.rl.pt = llm.pt + N(0, (RL_NOISE * std)^2) per tensor (zero entries stay zero).
RL_NOISE = 0.1

SFT_VOICE = "中文女"
ZERO_SHOT_VOICE = ("zero_shot_zh", "希望你以后能够做的比我还好呦。", "zh_16k.wav")
CONFIGURATION = {"framework": "pytorch", "task": "text-to-speech"}


# -- weights --------------------------------------------------------------------------------------


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
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=generator) * BIAS_STD)
        else:  # LayerNorm / RMSNorm / GroupNorm scales, Snake alphas
            p.copy_(1.0 + torch.randn(p.shape, generator=generator) * SCALE_STD)
    for name, g in params.items():
        if _is_weight_norm_g(name):
            v = params[_weight_norm_v(name)]
            norm = v.flatten(1).norm(dim=1).reshape(g.shape)
            g.copy_(norm * (1.0 + torch.randn(g.shape, generator=generator) * SCALE_STD))


def used_text_ids() -> int:
    """Regular ids the toy tokenizer can produce: those before its 'Ā###' padding entries."""
    vocab = json.loads((BLANK_EN_TINY / "vocab.json").read_text(encoding="utf-8"))
    padding = [i for tok, i in vocab.items() if len(tok) == 4 and tok.startswith("Ā")]
    return min(padding) if padding else QWEN_REGULAR


@torch.no_grad()
def shape_llm(llm: torch.nn.Module, version: str, generator: torch.Generator) -> None:
    """Qwen2LM / CosyVoice3LM weights whose decoding is neither flat nor stuck and that stop.

    A constant offset in hidden channel 0 of every input embedding keeps that channel positive
    through the shallow body, so decoder rows that read channel 0 give stable stop logits.
    """
    body = llm.llm.model.model
    for layer in body.layers:  # sharper attention: positions and the cache visibly matter
        layer.self_attn.q_proj.weight.mul_(2.0)
        layer.self_attn.k_proj.weight.mul_(2.0)
    emb = body.embed_tokens.weight
    emb.copy_(torch.randn(emb.shape, generator=generator))
    emb[used_text_ids() : QWEN_REGULAR] = 0.0  # never produced by the toy vocabulary
    emb[QWEN_SPECIAL_END:] = 0.0
    emb[:, 0] += 4.0 * (emb.abs().sum(dim=1) > 0)
    speech = llm.speech_embedding.weight
    speech.copy_(torch.randn(speech.shape, generator=generator))
    speech[:, 0] += 4.0
    dec = llm.llm_decoder.weight
    dec.mul_(LLM_DECODER_GAIN)
    dec[SPEECH_TOKEN_SIZE:] = 0.0  # stop / fill / reserved ids: far below the speech tokens
    dec[:SPEECH_TOKEN_SIZE, 0] = 0.0
    if version == "v2":
        llm.llm_embedding.weight[:, 0] += 4.0
        llm.llm_decoder.bias.zero_()
        llm.llm_decoder.bias[SPEECH_TOKEN_SIZE] = V2_EOS_BIAS
    else:
        dec[SPEECH_TOKEN_SIZE + 1, 0] = V3_EOS_CH0  # eos 6562
        dec[SPEECH_TOKEN_SIZE, 0] = V3_SOS_CH0  # sos 6561: the index v3 masks while i < min_len


@torch.no_grad()
def shape_hift(hift: torch.nn.Module, generator: torch.Generator) -> None:
    """Vocoder weights with a voiced, unclipped waveform (as tools/golden/hift.py).

    The default init leaves F0 near 0 (all unvoiced) and a near-silent or fully clipped output:
    weight-norm magnitudes 0.5 + U(0, 1), Snake alphas 0.2 + U(0, 1), all else N(0, 0.3^2); the
    F0 classifier (|Linear|) spread over tens to hundreds of Hz; the log-magnitude kept low.
    """
    for name, p in hift.named_parameters():
        if name.endswith("original0"):
            p.copy_(0.5 + torch.rand(p.shape, generator=generator))
        elif name.endswith("alpha"):
            p.copy_(0.2 + torch.rand(p.shape, generator=generator))
        else:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    classifier = hift.f0_predictor.classifier
    classifier.weight.mul_(F0_CLASSIFIER_SCALE)
    classifier.bias.fill_(F0_CLASSIFIER_BIAS)
    hift.m_source.l_linear.weight.mul_(3.0)
    hift.conv_post.parametrizations.weight.original0.mul_(HIFT_CONV_POST_SCALE)
    n_bins = hift.istft_params["n_fft"] // 2 + 1
    hift.conv_post.bias[:n_bins] = HIFT_LOG_MAGNITUDE_BIAS


@torch.no_grad()
def round_to_bfloat16(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.copy_(p.to(torch.bfloat16).to(p.dtype))


def saved_state(module: torch.nn.Module, legacy_weight_norm: bool = False) -> dict:
    """A copy of the state_dict; tied tensors (embed_tokens / lm_head) keep sharing one storage."""
    state, copies = {}, {}
    for key, value in module.state_dict().items():
        if legacy_weight_norm:
            key = key.replace("parametrizations.weight.original0", "weight_g")
            key = key.replace("parametrizations.weight.original1", "weight_v")
        ptr = value.untyped_storage().data_ptr()
        if ptr not in copies:
            copies[ptr] = value.detach().cpu().clone()
        state[key] = copies[ptr]
    return state


# -- loading as the official classes do -----------------------------------------------------------


def blank_en_with_weights(target: Path) -> Path:
    """A CosyVoice-BlankEN with throw-away weights, for Qwen2ForCausalLM.from_pretrained."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = json.loads((BLANK_EN_TINY / "config.json").read_text())
    Qwen2ForCausalLM(Qwen2Config(**config)).save_pretrained(target)
    for name in BLANK_EN_FILES:
        shutil.copyfile(BLANK_EN_TINY / name, target / name)
    return target


def load_official_configs(yaml_path: Path, qwen_pretrain_path: Path) -> dict:
    """Parse the yaml exactly as CosyVoice2/CosyVoice3.__init__ do (this also runs its seeds)."""
    with open(yaml_path) as f:
        return load_hyperpyyaml(f, overrides={"qwen_pretrain_path": str(qwen_pretrain_path)})


def runnable_copy(model_dir: Path, workdir: Path, llm_file: str = "llm.pt") -> Path:
    """A copy of ``model_dir`` (symlinks) that the official classes can open.

    Its CosyVoice-BlankEN also holds throw-away model.safetensors (see the module docstring);
    ``llm_file`` is linked as llm.pt (pass 'llm.rl.pt' to run the RL-tuned LLM).
    """
    copy = Path(tempfile.mkdtemp(prefix=model_dir.name + "-", dir=workdir))
    for path in model_dir.iterdir():
        if path.name in ("CosyVoice-BlankEN", "llm.pt"):
            continue
        os.symlink(path.resolve(), copy / path.name)
    os.symlink((model_dir / llm_file).resolve(), copy / "llm.pt")
    blank = copy / "CosyVoice-BlankEN"
    blank.mkdir()
    blank_en_with_weights(blank)
    return copy


def point_wetext_at_local_fsts() -> None:
    """wetext 0.0.4 downloads its FSTs when the frontend is built; use a local copy."""
    import wetext.wetext

    wetext.wetext.snapshot_download = lambda *args, **kwargs: str(LOCAL_WETEXT_FSTS)


def official_class(version: str):
    from cosyvoice.cli.cosyvoice import CosyVoice2, CosyVoice3

    return CosyVoice2 if version == "v2" else CosyVoice3


# -- writing --------------------------------------------------------------------------------------


def build_llm_state(configs: dict, version: str, seed: int) -> dict:
    llm = configs["llm"]
    generator = torch.Generator().manual_seed(seed)
    randomize(llm, generator)
    shape_llm(llm, version, generator)
    round_to_bfloat16(llm)
    return saved_state(llm)


@torch.no_grad()
def build_rl_llm_state(configs: dict, seed: int) -> dict:
    """The llm.pt model with every non-zero weight moved by seeded noise (RL_NOISE of each
    tensor's std): a stand-in for the RL-tuned LLM that decodes differently but alike."""
    llm = configs["llm"]
    generator = torch.Generator().manual_seed(seed)
    for p in llm.parameters():
        noise = torch.randn(p.shape, generator=generator) * (RL_NOISE * p.std())
        p.add_(noise * (p != 0))
    round_to_bfloat16(llm)
    return saved_state(llm)


def write_directory(version: str, workdir: Path) -> dict[str, dict]:
    spec = VERSIONS[version]
    out: Path = spec["out"]
    configs = load_official_configs(
        spec["yaml"], blank_en_with_weights(workdir / f"blank-{version}")
    )
    from cosyvoice.cli.model import CosyVoice2Model, CosyVoice3Model
    from cosyvoice.utils.class_utils import get_model_type

    expected_model = CosyVoice2Model if version == "v2" else CosyVoice3Model
    assert get_model_type(configs) == expected_model, get_model_type(configs)

    flow, hift = configs["flow"], configs["hift"]
    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    randomize(flow, generator)
    shape_hift(hift, generator)
    round_to_bfloat16(flow)
    round_to_bfloat16(hift)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    saved = {
        "flow.pt": saved_state(flow),
        "hift.pt": saved_state(hift, legacy_weight_norm=(version == "v2")),
        # the LLM last: its shaping draws from its own generator
        "llm.pt": build_llm_state(configs, version, spec["seed"]),
    }
    if spec["rl_seed"] is not None:  # continues from the llm.pt weights left in configs["llm"]
        saved["llm.rl.pt"] = build_rl_llm_state(configs, spec["rl_seed"])
    for filename, state in saved.items():
        torch.save(state, out / filename)
    shutil.copyfile(spec["yaml"], out / spec["yaml_name"])
    blank = out / "CosyVoice-BlankEN"
    blank.mkdir()
    for name in BLANK_EN_FILES:
        shutil.copyfile(BLANK_EN_TINY / name, blank / name)
    (out / "configuration.json").write_text(json.dumps(CONFIGURATION, indent=4) + "\n")

    sys.path.insert(0, str(ROOT / "tools"))
    from make_onnx_standins import write_standins

    write_standins(out, version[1])
    return saved


def write_v2_spk2info(workdir: Path) -> dict:
    """Preset voices with the official code: an SFT-format voice and an add_zero_shot_spk voice."""
    out = VERSIONS["v2"]["out"]
    cosyvoice = official_class("v2")(str(runnable_copy(out, workdir)))
    generator = torch.Generator().manual_seed(VERSIONS["v2"]["seed"] + 2)
    spk2info = {SFT_VOICE: {"embedding": torch.randn(1, 192, generator=generator)}}
    cosyvoice.frontend.spk2info = spk2info
    name, prompt_text, wav = ZERO_SHOT_VOICE
    assert cosyvoice.add_zero_shot_spk(prompt_text, str(AUDIO_DIR / wav), name)
    cosyvoice.model_dir = str(out)  # save_spkinfo writes <model_dir>/spk2info.pt
    cosyvoice.save_spkinfo()
    return spk2info


def check_reload(version: str, saved: dict[str, dict], workdir: Path) -> None:
    """Load the directory with the official class and compare every tensor."""
    out = VERSIONS[version]["out"]
    llm_files = ["llm.pt"] + (["llm.rl.pt"] if "llm.rl.pt" in saved else [])
    for llm_file in llm_files:
        model = official_class(version)(str(runnable_copy(out, workdir, llm_file)))
        legacy = version == "v2"
        loaded = {
            llm_file: saved_state(model.model.llm),
            "flow.pt": saved_state(model.model.flow),
            "hift.pt": saved_state(model.model.hift, legacy_weight_norm=legacy),
        }
        for filename, state in loaded.items():
            expected = saved[filename]
            assert list(state) == list(expected), filename
            for key, value in state.items():
                assert torch.equal(value.cpu(), expected[key]), (filename, key)
        assert model.sample_rate == 24000
        spks = model.list_available_spks()
        assert spks == ([SFT_VOICE, ZERO_SHOT_VOICE[0]] if version == "v2" else []), spks
    # the tied embedding is stored once
    state = torch.load(out / "llm.pt", weights_only=True)
    embed, head = state["llm.model.model.embed_tokens.weight"], state["llm.model.lm_head.weight"]
    assert embed.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    if "llm.rl.pt" in saved:
        rl = torch.load(out / "llm.rl.pt", weights_only=True)
        assert list(rl) == list(state)
        assert not torch.equal(rl["llm_decoder.weight"], state["llm_decoder.weight"])


def main() -> None:
    point_wetext_at_local_fsts()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for version in VERSIONS:
            saved = write_directory(version, workdir)
            if version == "v2":
                write_v2_spk2info(workdir)
            check_reload(version, saved, workdir)
            out = VERSIONS[version]["out"]
            total = 0
            for path in sorted(out.rglob("*")):
                if path.is_file():
                    total += path.stat().st_size
                    print(f"{path.stat().st_size:>10}  {path.relative_to(ROOT)}")
            print(f"{total:>10}  total {version}")


if __name__ == "__main__":
    main()
