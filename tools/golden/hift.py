"""Golden data for the HiFT vocoders (v1, v2, v3), produced with the official CosyVoice code.

Run in the reference environment (never in the project venv):

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \
        /tmp/refenv/bin/python tools/golden/hift.py [--v3-release-yaml PATH]

Writes tests/data/golden/hift/{v1,v2,v3}.npz with tiny official generators (their state dicts in
the current `parametrizations.weight.original0/1` spelling, under `sd/<key>`), input mels and
outputs:

* v1/v2: `torch.manual_seed(seed)` before each `inference`; a streaming call with
  `cache_source`; a few `torch.rand` values drawn after each call, to check that our generator
  consumes random numbers exactly like the official global RNG.
* v3: the tiny generator is built in the released hyperpyyaml order after the seed that
  `CausalConditionalCFM.__init__` sets (flow noise, flow embedding and speaker affine layer, f0
  predictor, generator), so its fixed source buffers follow the same rule as the release; outputs
  for finalize=True and for a few finalize=False prefixes.

With `--v3-release-yaml` (the official example `cosyvoice3.yaml`, or a released one) it also
builds the real model up to the vocoder and stores `rand_ini` and the first rows of `sine_waves`
in v3_release_buffers.npz.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from cosyvoice.hifigan.f0_predictor import CausalConvRNNF0Predictor, ConvRNNF0Predictor
from cosyvoice.hifigan.generator import CausalHiFTGenerator, HiFTGenerator
from cosyvoice.utils.common import set_all_random_seed

# GOLDEN_ROOT: where the goldens go (tests/data/golden; tests/data/golden/avx2 from an AVX2 CPU)
OUT = os.path.join(
    os.environ.get(
        "GOLDEN_ROOT",
        os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data", "golden"),
    ),
    "hift",
)

TINY = dict(
    in_channels=80,
    base_channels=16,
    nb_harmonics=8,
    nsf_alpha=0.1,
    nsf_sigma=0.003,
    nsf_voiced_threshold=10,
    istft_params={"n_fft": 16, "hop_len": 4},
    resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5]] * 3,
    lrelu_slope=0.1,
    audio_limit=0.99,
)
TINY_V1 = dict(
    TINY,
    sampling_rate=22050,
    upsample_rates=[8, 8],
    upsample_kernel_sizes=[16, 16],
    source_resblock_kernel_sizes=[7, 11],
    source_resblock_dilation_sizes=[[1, 3, 5]] * 2,
)
TINY_V2 = dict(
    TINY,
    sampling_rate=24000,
    upsample_rates=[8, 5, 3],
    upsample_kernel_sizes=[16, 11, 7],
    source_resblock_kernel_sizes=[7, 7, 11],
    source_resblock_dilation_sizes=[[1, 3, 5]] * 3,
)
TINY_V3 = dict(TINY_V2, conv_pre_look_right=4)
COND = 16


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Trained-looking weights: the default init leaves f0 near 0 and the waveform silent."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("original0"):  # weight-norm magnitude
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("alpha"):
                p.copy_(0.2 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        # f0 between ~0 (unvoiced) and a few hundred Hz
        clf = model.f0_predictor.classifier
        clf.weight.mul_(60.0)
        clf.bias.fill_(40.0)
        model.m_source.l_linear.weight.mul_(3.0)
        # keep the log-magnitude in a range where the clamp does not hide everything
        for name, p in model.conv_post.named_parameters():
            if name.endswith("original0"):
                p.mul_(0.05)
        model.conv_post.bias[: TINY["istft_params"]["n_fft"] // 2 + 1] = -3.0


def state_dict_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {f"sd/{k}": v.detach().float().numpy() for k, v in model.state_dict().items()}


def mel(seed: int, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 80, frames, generator=g) * 2.0 - 5.0).float()


def after_rng() -> np.ndarray:
    """A few draws from the global RNG right after an inference call."""
    return torch.rand(4).numpy()


def golden_nonstreaming(version: str, cfg: dict) -> dict[str, np.ndarray]:
    torch.manual_seed(1234)
    model = HiFTGenerator(**cfg, f0_predictor=ConvRNNF0Predictor(1, 80, COND))
    randomize(model, 7)
    model.eval()
    out = state_dict_arrays(model)
    mel_a, mel_b = mel(1, 16), mel(2, 10)
    out["mel_a"], out["mel_b"] = mel_a.numpy(), mel_b.numpy()
    for seed in (0, 42):
        torch.manual_seed(seed)
        speech, source = model.inference(mel_a)
        out[f"speech_a_seed{seed}"], out[f"source_a_seed{seed}"] = speech.numpy(), source.numpy()
        out[f"rng_after_a_seed{seed}"] = after_rng()
    # streaming-style call: the next chunk's source starts with the cached source of the last one
    cache_source = torch.from_numpy(out["source_a_seed0"][:, :, -700:].copy())
    out["cache_source"] = cache_source.numpy()
    torch.manual_seed(5)
    speech, source = model.inference(mel_b, cache_source=cache_source)
    out["speech_b_cached"], out["source_b_cached"] = speech.numpy(), source.numpy()
    out["rng_after_b_cached"] = after_rng()
    with torch.no_grad():
        f0 = model.f0_predictor(mel_a)
    out["f0_a"] = f0.numpy()
    print(
        version,
        "f0 range",
        float(f0.min()),
        float(f0.max()),
        "voiced",
        float((f0 > 10).float().mean()),
        "clamped",
        float((speech.abs() >= 0.99).float().mean()),
        "speech std",
        float(speech.std()),
    )
    return out


def build_v3_in_release_order() -> CausalHiFTGenerator:
    """What hyperpyyaml builds after `set_all_random_seed(0)` in CausalConditionalCFM.__init__."""
    set_all_random_seed(0)
    torch.randn([1, 80, 50 * 300])  # CausalConditionalCFM.rand_noise
    torch.nn.Embedding(6561, 80)  # CausalMaskedDiffWithDiT.input_embedding
    torch.nn.Linear(192, 80)  # CausalMaskedDiffWithDiT.spk_embed_affine_layer
    f0_predictor = CausalConvRNNF0Predictor(1, 80, COND)
    return CausalHiFTGenerator(**TINY_V3, f0_predictor=f0_predictor)


def golden_v3() -> dict[str, np.ndarray]:
    model = build_v3_in_release_order()
    randomize(model, 15)
    model.eval()
    out = state_dict_arrays(model)
    out["rand_ini"] = model.m_source.l_sin_gen.rand_ini.numpy()
    mel_a = mel(3, 20)
    out["mel_a"] = mel_a.numpy()
    speech, source = model.inference(mel_a, finalize=True)
    out["speech_final"], out["source_final"] = speech.numpy(), source.numpy()
    for frames in (9, 14, 20):
        speech, source = model.inference(mel_a[:, :, :frames], finalize=False)
        out[f"speech_stream{frames}"], out[f"source_stream{frames}"] = (
            speech.numpy(),
            source.numpy(),
        )
    with torch.no_grad():
        f0 = model.f0_predictor(mel_a.double())
    print(
        "v3 f0 range",
        float(f0.min()),
        float(f0.max()),
        "voiced",
        float((f0 > 10).float().mean()),
        "clamped",
        float((out["speech_final"].__abs__() >= 0.99).mean()),
        "speech std",
        float(out["speech_final"].std()),
    )
    return out


def golden_v3_release(yaml_path: str, rows: int) -> dict[str, np.ndarray]:
    from hyperpyyaml import load_hyperpyyaml

    with open(yaml_path) as f:
        text = f.read()
    if "# gan related module" in text:
        text = text[
            : text.index("# gan related module")
        ]  # the data pipeline after hift needs pyworld
    configs = load_hyperpyyaml(text, overrides={"llm": None})
    sine_gen = configs["hift"].m_source.l_sin_gen
    return {
        "rand_ini": sine_gen.rand_ini.numpy(),
        "sine_waves_head": sine_gen.sine_waves[:, :rows].numpy(),
        "sine_waves_sum": np.array(sine_gen.sine_waves.double().sum().item()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--v3-release-yaml", default=None)
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(1)
    np.savez_compressed(os.path.join(OUT, "v1.npz"), **golden_nonstreaming("v1", TINY_V1))
    np.savez_compressed(os.path.join(OUT, "v2.npz"), **golden_nonstreaming("v2", TINY_V2))
    np.savez_compressed(os.path.join(OUT, "v3.npz"), **golden_v3())
    if args.v3_release_yaml:
        np.savez_compressed(
            os.path.join(OUT, "v3_release_buffers.npz"),
            **golden_v3_release(args.v3_release_yaml, rows=4000),
        )
    for name in sorted(os.listdir(OUT)):
        print(name, os.path.getsize(os.path.join(OUT, name)))


if __name__ == "__main__":
    main()
