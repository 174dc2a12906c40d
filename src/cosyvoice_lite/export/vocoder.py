"""Vocoder graphs: mel + explicit source randomness -> waveform.

The torch vocoders draw their NSF source noise inside `inference`; here the draws are inputs, so
a graph run is a pure function and reproduces a seeded torch run exactly when fed the values
`draw_source_noise` takes from the same generator. STFT/iSTFT become convolutions (dsp.py).

* v1/v2 `HiFTGenerator`: inputs mel [1, 80, T], phase [1, H] (uniform [0, 1) start phases),
  noise [1, T * upsample_scale, H] (standard normal, the NSF noise), cache_source [1, 1, N]
  (N >= 0 samples that overwrite the start of the source while streaming); outputs
  speech [1, T * upsample_scale] and source [1, 1, T * upsample_scale].
* v3 `CausalHiFTGenerator`: inputs mel [1, 80, T], phase [1, H], noise [1, T * upsample_scale, H]
  (the official fixed uniform buffers: `FixedSourceRandomness`); output speech.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import dsp


def _not_first(dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, dim] mask that zeroes harmonic 0 (the fundamental starts at phase 0, as official)."""
    return (torch.arange(dim) > 0).to(dtype).view(1, dim)


class _Decoder(nn.Module):
    """The generator's decode (source STFT, upsampling stack, iSTFT) with conv STFTs."""

    def __init__(self, hift: nn.Module) -> None:
        super().__init__()
        self.hift = hift
        self.n_fft = hift.istft_params["n_fft"]
        self.hop = hift.istft_params["hop_len"]
        window = hift.stft_window.float()
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("stft_kernel", dsp.stft_kernel(self.n_fft, window), persistent=False)
        self.register_buffer("istft_kernel", dsp.istft_kernel(self.n_fft, window), persistent=False)

    def source_stft(self, source: torch.Tensor) -> torch.Tensor:
        return dsp.stft(source.squeeze(1), self.stft_kernel, self.hop)

    def waveform(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage features -> clamped waveform (HiFTBase._to_waveform with a conv iSTFT)."""
        hift = self.hift
        x = hift.conv_post(F.leaky_relu(x))  # default slope 0.01, as official
        n_bins = self.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :n_bins, :]), max=1e2)
        phase = torch.sin(x[:, n_bins:, :])
        speech = dsp.istft(
            magnitude * torch.cos(phase),
            magnitude * torch.sin(phase),
            self.istft_kernel,
            self.window,
            self.hop,
        )
        return speech


class HiFTGraph(_Decoder):
    """v1/v2 HiFTGenerator.inference with the source randomness as inputs."""

    def forward(
        self,
        mel: torch.Tensor,
        phase: torch.Tensor,
        noise: torch.Tensor,
        cache_source: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hift = self.hift
        f0 = _upsample_f0(hift.f0_predictor(mel), hift.upsample_scale)
        gen = hift.m_source.l_sin_gen
        if hasattr(gen, "integrate_phase"):  # SineGen2 (24 kHz)
            start = phase * _not_first(gen.dim, f0.dtype)
            sine = _integrate_phase(gen, _add_start_phase(gen.harmonic_rads(f0), start), "linear")
        else:  # SineGen (22.05 kHz)
            sine = self._sine_v1(gen, f0, phase)
        source = _source(hift, gen, f0, sine, noise)
        n_cache = cache_source.shape[2]
        source = torch.cat([cache_source, source[:, :, n_cache:]], dim=2)
        x = hift._upsample_and_fuse(hift.conv_pre(mel), self.source_stft(source))
        speech = torch.clamp(self.waveform(x), -hift.audio_limit, hift.audio_limit)
        return speech, source

    @staticmethod
    def _sine_v1(gen: nn.Module, f0: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """SineGen's harmonics without its draws: [1, L, H]."""
        f0 = f0.transpose(1, 2)  # [1, 1, L]
        dim = gen.harmonic_num + 1
        harmonics = torch.arange(1, dim + 1, dtype=f0.dtype).view(1, dim, 1)
        theta = 2 * math.pi * (_cumsum(f0 * harmonics / gen.sampling_rate, -1) % 1)
        low = torch.tensor(-math.pi, dtype=f0.dtype)
        high = torch.tensor(math.pi, dtype=f0.dtype)
        start = (low + phase.unsqueeze(-1) * (high - low)) * _not_first(dim, f0.dtype).view(
            1, dim, 1
        )
        return (gen.sine_amp * torch.sin(theta + start)).transpose(1, 2)


class CausalHiFTGraph(_Decoder):
    """v3 CausalHiFTGenerator.inference with the fixed source buffers as inputs. The f0 predictor
    runs in float64 as in torch (its convolutions as float64 matrix products: ONNX runtimes
    seldom have float64 convolutions, and float32 here moves the phase visibly).

    finalize=False is the official streaming call on the mel history: the last 3 frames are only
    f0 look-ahead, the 4 before them only conv_pre look-ahead, and the last hop is dropped, so
    T frames give (T - 8) * upsample_scale samples."""

    def __init__(self, hift: nn.Module, finalize: bool = True) -> None:
        super().__init__(hift)
        self.finalize = finalize

    def forward(self, mel: torch.Tensor, phase: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        hift = self.hift
        f0 = _f0_float64(hift.f0_predictor, mel, self.finalize).to(mel.dtype)
        f0 = _upsample_f0(f0, hift.upsample_scale)
        gen = hift.m_source.l_sin_gen
        sine = _integrate_phase(gen, _add_start_phase(gen.harmonic_rads(f0), phase), "nearest")
        source = _source(hift, gen, f0, sine, noise[:, : f0.shape[1]])
        s_stft = self.source_stft(source)
        if self.finalize:
            x = hift.conv_pre(mel)
        else:
            look = hift.conv_pre_look_right
            mel = mel[:, :, : -hift.f0_predictor.look_ahead]
            x = hift.conv_pre(mel[:, :, :-look], mel[:, :, -look:])
            s_stft = s_stft[:, :, : -math.prod(hift.upsample_rates) * look]
        speech = self.waveform(hift._upsample_and_fuse(x, s_stft))
        if not self.finalize:
            speech = speech[:, : -hift.upsample_scale]
        return torch.clamp(speech, -hift.audio_limit, hift.audio_limit)


def _cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """torch's CPU cumsum of float32 accumulates in float64: do the same explicitly."""
    return torch.cumsum(x.double(), dim=dim).to(x.dtype)


def _upsample_f0(f0: torch.Tensor, scale: int) -> torch.Tensor:
    """f0 [1, T] -> [1, T * scale, 1], nearest (the official f0_upsamp)."""
    return F.interpolate(f0[:, None], scale_factor=float(scale), mode="nearest").transpose(1, 2)


def _add_start_phase(rad: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Add the per-harmonic start phase [1, H] to the first sample of rad [1, L, H]."""
    return torch.cat([rad[:, :1, :] + start.unsqueeze(1), rad[:, 1:, :]], dim=1)


def _integrate_phase(gen: nn.Module, rad: torch.Tensor, mode: str) -> torch.Tensor:
    """SineGen2.integrate_phase times sine_amp, with the float64-accumulated cumsum."""
    scale = gen.upsample_scale
    rad = dsp.linear_rescale(rad.transpose(1, 2), scale, down=True).transpose(1, 2)
    phase = _cumsum(rad, 1) * 2 * math.pi
    phase = phase.transpose(1, 2) * scale
    if mode == "linear":
        phase = dsp.linear_rescale(phase, scale, down=False)
    else:
        phase = F.interpolate(phase, scale_factor=float(scale), mode=mode)
    return torch.sin(phase.transpose(1, 2)) * gen.sine_amp


def _source(
    hift: nn.Module, gen: nn.Module, f0: torch.Tensor, sine: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Voiced harmonics plus noise, merged by l_linear + tanh: [1, 1, L]."""
    uv = (f0 > gen.voiced_threshold).to(f0.dtype)
    noise_amp = uv * gen.noise_std + (1 - uv) * gen.sine_amp / 3
    return torch.tanh(hift.m_source.l_linear(sine * uv + noise_amp * noise)).transpose(1, 2)


def _conv1d_float64(x: torch.Tensor, conv: nn.Module, pad_right: bool = True) -> torch.Tensor:
    """A (causal) Conv1d of the v3 f0 predictor as one float64 MatMul over shifted slices; a
    right-looking conv without pad_right reads real look-ahead frames (one output per frame
    that has them)."""
    pad = conv.causal_padding
    if conv.causal_type == "left":
        x = F.pad(x, (pad, 0))
    elif pad_right:
        x = F.pad(x, (0, pad))
    kernel, dilation = conv.kernel_size[0], conv.dilation[0]
    length = x.shape[2]
    taps = [x[:, :, i * dilation : length - (kernel - 1 - i) * dilation] for i in range(kernel)]
    patches = torch.cat(taps, dim=1)  # [1, k * C, T], tap-major
    weight = conv.weight.double().permute(0, 2, 1).reshape(conv.weight.shape[0], -1)
    return torch.matmul(weight, patches) + conv.bias.double().unsqueeze(-1)


def _f0_float64(predictor: nn.Module, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
    """CausalConvRNNF0Predictor.forward(mel, finalize) in float64, ELU written out."""
    x = mel.double()
    for index, layer in enumerate(predictor.condnet):
        if isinstance(layer, nn.ELU):
            x = torch.where(x > 0, x, torch.exp(x) - 1)
        else:
            x = _conv1d_float64(x, layer, pad_right=finalize or index > 0)
    weight, bias = predictor.classifier.weight.double(), predictor.classifier.bias.double()
    return torch.abs(F.linear(x.transpose(1, 2), weight, bias).squeeze(-1))


def vocoder_graph(hift: nn.Module, finalize: bool = True) -> nn.Module:
    if hift.causal:
        return CausalHiFTGraph(hift, finalize).eval()
    return HiFTGraph(hift).eval()


def draw_source_noise(
    hift: nn.Module, n_frames: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(phase, noise) for a vocoder graph call on n_frames mel frames.

    v1/v2: drawn from `generator` in the order and layout `HiFTGenerator.inference` draws them
    (start phases, NSF noise, the unused noise branch), so the graph reproduces a torch call that
    used the same generator state. v3: the official fixed buffers (no generator)."""
    dim = hift.nb_harmonics + 1
    samples = n_frames * hift.upsample_scale
    if hift.causal:
        fixed = hift.m_source.l_sin_gen.fixed
        return fixed.rand_ini().clone(), fixed.sine_waves(samples).clone()
    if generator is None:
        raise ValueError("the v1/v2 vocoder source noise needs a torch.Generator")
    v1 = not hasattr(hift.m_source.l_sin_gen, "integrate_phase")
    phase = torch.rand((1, dim, 1) if v1 else (1, dim), generator=generator).reshape(1, dim)
    # Both generators' noise tensors are [1, H, L] in memory; v1's is contiguous (randn fills it
    # in blocks), v2's a transposed view (randn fills it element by element): draw them alike.
    noise = torch.empty(1, dim, samples)
    noise = (
        noise.normal_(generator=generator)
        if v1
        else noise.transpose(1, 2).normal_(generator=generator)
    )
    torch.empty(1, samples, 1).normal_(generator=generator)  # the official unused noise branch
    return phase, (noise.transpose(1, 2) if v1 else noise).contiguous()
