"""HiFT vocoder of CosyVoice v1 and v2 (official `cosyvoice/hifigan/generator.py`, `f0_predictor.py`).

mel -> f0 (ConvRNNF0Predictor) -> harmonic source (SourceModuleHnNSF, NSF) -> HiFi-GAN upsampling
stack fused with the source's STFT -> 18 channels of log-magnitude/phase -> iSTFT (n_fft 16, hop 4).

Module names follow the official tree so that `hift.pt` loads with `strict=True`:

    m_source.l_linear                  Linear(9, 1) merging the harmonics
    conv_pre, ups.i, conv_post         weight-normed convolutions
    source_downs.i                     plain Conv1d on the source STFT
    source_resblocks.i, resblocks.j    ResBlock: convs1/convs2.{0..2} (weight-normed),
                                       activations1/activations2.{0..2}.alpha (Snake)
    f0_predictor.condnet.{0,2,4,6,8}   weight-normed Conv1d (+ ELU), f0_predictor.classifier

Weight norm is folded at load time: our convolutions hold a plain `weight`, and their
`_load_from_state_dict` accepts both official spellings (`X.weight_g`/`X.weight_v` from the legacy
`torch.nn.utils.weight_norm`, and `X.parametrizations.weight.original0/original1`).

v1 (22.05 kHz) uses `SineGen`, v2 (24 kHz) `SineGen2`; the official code picks one by sampling
rate, and so do we. Every random draw takes an explicit `torch.Generator`; the draws happen in the
official order and shapes, so a CPU generator seeded `s` reproduces the official output after
`torch.manual_seed(s)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.networks.abort import check
from cosyvoice_lite.networks.conv_layout import Conv1d, ConvTranspose1d, reflect_pad_time
from cosyvoice_lite.networks.crossfade import fade_in_out
from cosyvoice_lite.networks.utterances import frame_mask

# ---------------------------------------------------------------------------------------------
# weight norm, folded at load time
# ---------------------------------------------------------------------------------------------

_LEGACY_SUFFIXES = ("weight_g", "weight_v")
_PARAMETRIZATION_SUFFIXES = (
    "parametrizations.weight.original0",
    "parametrizations.weight.original1",
)


def fold_weight_norm(weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
    """`w = g * v / ||v||`, the norm taken over every dim except dim 0 (as `torch._weight_norm`
    with dim=0; for ConvTranspose1d dim 0 is in_channels)."""
    if (
        weight_g.dim() != weight_v.dim()
        or weight_g.shape[0] != weight_v.shape[0]
        or weight_g.numel() != weight_g.shape[0]
    ):
        raise ModelDirError(
            f"weight-norm magnitude of shape {tuple(weight_g.shape)} does not fit direction of "
            f"shape {tuple(weight_v.shape)} (expected [{weight_v.shape[0]}, 1, ...])"
        )
    # the very op the official (legacy and parametrized) weight_norm evaluates on every forward,
    # so the folded weight is bit-identical to the one the official layer uses
    return torch._weight_norm(weight_v, weight_g, 0)


def _fold_weight_norm_keys(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Replace `prefix + (weight_g, weight_v)` or the parametrization pair by `prefix + weight`,
    folded in the parameter's dtype (what the official module computes on every forward)."""
    for g_suffix, v_suffix in (_LEGACY_SUFFIXES, _PARAMETRIZATION_SUFFIXES):
        g_key, v_key = prefix + g_suffix, prefix + v_suffix
        if g_key not in state_dict and v_key not in state_dict:
            continue
        if g_key not in state_dict or v_key not in state_dict:
            # leave the lone key in place: the strict load reports it as unexpected
            continue
        if prefix + "weight" in state_dict:
            raise ModelDirError(f"checkpoint holds both '{prefix}weight' and '{g_key}'/'{v_key}'")
        dtype = module.weight.dtype
        state_dict[prefix + "weight"] = fold_weight_norm(
            state_dict.pop(g_key).to(dtype), state_dict.pop(v_key).to(dtype)
        )


class FoldedWeightNorm:
    """Mixin for a conv that the official code wraps in `weight_norm`: holds the folded weight
    and folds either official key spelling while loading."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        _fold_weight_norm_keys(self, state_dict, prefix)  # type: ignore[arg-type]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


class WeightNormConv1d(FoldedWeightNorm, Conv1d):
    """`weight_norm(nn.Conv1d(...))` with the weight folded."""


class WeightNormConvTranspose1d(FoldedWeightNorm, ConvTranspose1d):
    """`weight_norm(nn.ConvTranspose1d(...))` with the weight folded (g over in_channels)."""


def load_hift_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load an official `hift.pt` state dict strictly into `module` (HiFTGenerator or
    CausalHiFTGenerator). A leading `generator.` (checkpoints saved from the HiFiGan training
    wrapper) is stripped as the official loader does; weight-norm pairs of either spelling are
    folded. Raises ModelDirError on any missing or unexpected key or shape mismatch."""
    cleaned = {k.removeprefix("generator."): v for k, v in state_dict.items()}
    try:
        module.load_state_dict(cleaned, strict=True)
    except RuntimeError as exc:
        raise ModelDirError(
            f"hift checkpoint does not match the vocoder built from the yaml: {exc}"
        ) from exc


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


class Snake(nn.Module):
    """`x + sin^2(alpha x) / alpha` with a per-channel, linear-scale alpha (BigVGAN)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            # in half precision 1e-9 is 0 and 1 / alpha overflows for |alpha| < 1.5e-5
            # (inf * 0 = nan where alpha is 0): computed in float32
            return _snake(x.float(), self.alpha.float()).to(torch.float16)
        return _snake(x, self.alpha)


def _snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    alpha = alpha.unsqueeze(0).unsqueeze(-1)
    return x + (1.0 / (alpha + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class ResBlock(nn.Module):
    """HiFi-GAN residual block with Snake activations: for each dilation,
    `x = x + conv2(snake(conv1_dilated(snake(x))))`, "same" padding."""

    def __init__(
        self, channels: int = 512, kernel_size: int = 3, dilations: Sequence[int] = (1, 3, 5)
    ):
        super().__init__()
        self.convs1 = nn.ModuleList([self._make_conv(channels, kernel_size, d) for d in dilations])
        self.convs2 = nn.ModuleList([self._make_conv(channels, kernel_size, 1) for _ in dilations])
        self.activations1 = nn.ModuleList([Snake(channels) for _ in dilations])
        self.activations2 = nn.ModuleList([Snake(channels) for _ in dilations])

    def _make_conv(self, channels: int, kernel_size: int, dilation: int) -> nn.Module:
        padding = (kernel_size * dilation - dilation) // 2
        return WeightNormConv1d(
            channels, channels, kernel_size, 1, dilation=dilation, padding=padding
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid``: [B, 1, T] 1 within each row of a padded batch, 0 after it (see
        ``HiFTBase.decode_rows``); x is 0 there and stays 0."""
        for conv1, conv2, act1, act2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            xt = _zero_past_rows(conv1(act1(x)), valid)
            x = _zero_past_rows(conv2(act2(xt)), valid) + x
        return x


def _zero_past_rows(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """x with every row's frames past its end set to 0, as the zero padding a convolution of the
    row alone sees there (Snake and leaky ReLU keep 0 at 0); x itself when ``valid`` is None."""
    return x if valid is None else x * valid


class ConvRNNF0Predictor(nn.Module):
    """mel [B, 80, T] -> f0 [B, T]: five (Conv1d k3 + ELU), a Linear, then abs."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512):
        super().__init__()
        self.num_class = num_class
        layers: list[nn.Module] = []
        for i in range(5):
            layers.append(
                WeightNormConv1d(
                    in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1
                )
            )
            layers.append(nn.ELU())
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.condnet(x).transpose(1, 2)
        return torch.abs(self.classifier(x).squeeze(-1))


# ---------------------------------------------------------------------------------------------
# neural source filter
# ---------------------------------------------------------------------------------------------


def _rand(generator: torch.Generator, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """`torch.rand(shape)` drawn on the generator's device and moved to `like`'s device: a CPU
    generator gives the same numbers wherever the model runs."""
    values = torch.rand(
        tuple(shape), generator=generator, device=generator.device, dtype=like.dtype
    )
    return values.to(like.device)


def _randn_like(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """`torch.randn_like(like)` from `generator`. randn_like keeps `like`'s memory layout and
    fills memory in order, so for a transposed view the values land transposed; empty_like
    preserves the strides the same way."""
    values = torch.empty_like(like, device=generator.device).normal_(generator=generator)
    return values.to(like.device)


class SineGen(nn.Module):
    """v1 sine source: harmonics with a per-harmonic random start phase, plus noise."""

    def __init__(
        self,
        samp_rate: int,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        noise_std: float = 0.003,
        voiced_threshold: float = 0,
    ):
        super().__init__()
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.harmonic_num = harmonic_num
        self.sampling_rate = samp_rate
        self.voiced_threshold = voiced_threshold

    def forward(
        self, f0: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 [B, L, 1] at sample rate -> (sine_waves [B, L, dim], uv [B, L, 1])."""
        f0 = f0.transpose(1, 2)
        dim = self.harmonic_num + 1
        harmonics = torch.arange(1, dim + 1, device=f0.device, dtype=f0.dtype).view(1, dim, 1)
        f_mat = f0 * harmonics / self.sampling_rate
        theta_mat = 2 * math.pi * (torch.cumsum(f_mat, dim=-1) % 1)
        # official: Uniform(-pi, pi).sample(), i.e. low + rand * (high - low) in float32
        low, high = torch.tensor(-math.pi, dtype=f0.dtype), torch.tensor(math.pi, dtype=f0.dtype)
        rand = _rand(generator, (f0.shape[0], dim, 1), f0)
        phase_vec = low.to(f0.device) + rand * (high - low).to(f0.device)
        phase_vec[:, 0, :] = 0
        sine_waves = self.sine_amp * torch.sin(theta_mat + phase_vec)
        uv = (f0 > self.voiced_threshold).to(f0.dtype)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        noise = noise_amp * _randn_like(generator, sine_waves)
        sine_waves = sine_waves * uv + noise
        return sine_waves.transpose(1, 2), uv.transpose(1, 2)


class SineGen2(nn.Module):
    """v2 sine source: instantaneous phase integrated at frame rate (linear down/upsampling by
    `upsample_scale`), random start phase per harmonic, plus noise."""

    def __init__(
        self,
        samp_rate: int,
        upsample_scale: int,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        noise_std: float = 0.003,
        voiced_threshold: float = 0,
    ):
        super().__init__()
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.harmonic_num = harmonic_num
        self.dim = harmonic_num + 1
        self.sampling_rate = samp_rate
        self.voiced_threshold = voiced_threshold
        self.upsample_scale = upsample_scale

    def harmonic_rads(self, f0: torch.Tensor) -> torch.Tensor:
        """f0 [B, L, 1] -> per-sample phase increments in cycles [B, L, dim], wrapped to [0, 1)."""
        harmonics = torch.arange(1, self.dim + 1, device=f0.device, dtype=f0.dtype).view(
            1, 1, self.dim
        )
        return (f0 * harmonics / self.sampling_rate) % 1

    def integrate_phase(self, rad_values: torch.Tensor, upsample_mode: str) -> torch.Tensor:
        """Cumulative phase computed on the frame grid and spread back to samples."""
        rad_values = F.interpolate(
            rad_values.transpose(1, 2), scale_factor=1 / self.upsample_scale, mode="linear"
        ).transpose(1, 2)
        # accumulated in float64 on every device: torch's float32 cumsum does so on a CPU (what
        # the official computes and the streamed vocoder copies), a GPU scan would not
        phase = torch.cumsum(rad_values, dim=1, dtype=torch.float64).to(rad_values.dtype)
        phase = phase * 2 * math.pi
        phase = F.interpolate(
            phase.transpose(1, 2) * self.upsample_scale,
            scale_factor=float(self.upsample_scale),
            mode=upsample_mode,
        ).transpose(1, 2)
        return torch.sin(phase)

    def forward(
        self, f0: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 [B, L, 1] at sample rate -> (sine_waves [B, L, dim], uv [B, L, 1])."""
        rad_values = self.harmonic_rads(f0)
        rand_ini = _rand(generator, (f0.shape[0], self.dim), f0)
        rand_ini[:, 0] = 0
        rad_values[:, 0, :] = rad_values[:, 0, :] + rand_ini
        sine_waves = self.integrate_phase(rad_values, "linear") * self.sine_amp
        check("vocoder source noise")  # (networks.abort; a long utterance's steps: ~1 s each)
        uv = (f0 > self.voiced_threshold).to(f0.dtype)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        noise = noise_amp * _randn_like(generator, sine_waves)
        return sine_waves * uv + noise, uv


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise source: sine harmonics merged by `l_linear` + tanh."""

    def __init__(
        self,
        sampling_rate: int,
        upsample_scale: int,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        add_noise_std: float = 0.003,
        voiced_threshod: float = 0,
        sinegen_type: str = "1",
    ):
        super().__init__()
        self.sine_amp = sine_amp
        self.noise_std = add_noise_std
        self.l_sin_gen: SineGen | SineGen2
        if sinegen_type == "1":
            self.l_sin_gen = SineGen(
                sampling_rate, harmonic_num, sine_amp, add_noise_std, voiced_threshod
            )
        else:
            self.l_sin_gen = SineGen2(
                sampling_rate,
                upsample_scale,
                harmonic_num,
                sine_amp,
                add_noise_std,
                voiced_threshod,
            )
        self.l_linear = nn.Linear(harmonic_num + 1, 1)

    def forward(self, f0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """f0 [B, L, 1] -> source [B, L, 1]."""
        sine_waves, uv = self.l_sin_gen(f0, generator)
        check("vocoder source merge")
        sine_merge = torch.tanh(self.l_linear(sine_waves))
        # The official module also draws a noise branch (randn like uv) that nobody uses; draw it
        # anyway so the generator ends in the same state as the official global RNG.
        _randn_like(generator, uv)
        return sine_merge


# ---------------------------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------------------------


class HiFTBase(nn.Module):
    """What the non-causal and causal generators share: STFT/iSTFT and the upsampling stack.
    Subclasses build `conv_pre`, `ups`, `source_downs`, `source_resblocks`, `resblocks`,
    `conv_post` and `f0_predictor`.

    The convolution stack computes in the dtype its weights are stored in (precision chosen at
    load); the parts below keep their own dtype (see precision.py)."""

    precision_exempt = {
        "f0_predictor": "f0 picks the voiced/unvoiced switch by a threshold and sets every "
        "harmonic's frequency: float32 (float64 in CosyVoice3, as the official)",
        "m_source": "the sine source integrates phase over thousands of samples per frame",
        "stft_window": "the STFT/iSTFT run in float32: CPU FFTs take no bfloat16",
    }

    istft_params: dict[str, int]
    upsample_scale: int
    num_kernels: int
    num_upsamples: int
    lrelu_slope: float
    audio_limit: float
    stft_window: torch.Tensor
    conv_pre: nn.Module
    ups: nn.ModuleList
    source_downs: nn.ModuleList
    source_resblocks: nn.ModuleList
    resblocks: nn.ModuleList
    conv_post: nn.Module

    def _init_common(
        self,
        in_channels: int,
        sampling_rate: int,
        istft_params: Mapping[str, int],
        upsample_rates: Sequence[int],
        resblock_kernel_sizes: Sequence[int],
        lrelu_slope: float,
        audio_limit: float,
    ) -> None:
        self.in_channels = in_channels
        self.sampling_rate = sampling_rate
        self.istft_params = {
            "n_fft": int(istft_params["n_fft"]),
            "hop_len": int(istft_params["hop_len"]),
        }
        self.upsample_rates = [int(u) for u in upsample_rates]
        self.upsample_scale = math.prod(self.upsample_rates) * self.istft_params["hop_len"]
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.lrelu_slope = lrelu_slope
        self.audio_limit = audio_limit
        # scipy.signal.get_window("hann", n_fft, fftbins=True): periodic, computed in float64
        window = torch.hann_window(self.istft_params["n_fft"], periodic=True, dtype=torch.float64)
        self.register_buffer("stft_window", window.float(), persistent=False)

    # every convolution causal but conv_pre's look-ahead (v3): padded rows need no masks
    causal = False
    conv_pre_look_right = 0  # frames conv_pre looks ahead (the causal generator's look-ahead)

    def _check_mel(self, speech_feat: torch.Tensor, min_frames: int) -> None:
        if speech_feat.dim() != 3 or speech_feat.shape[1] != self.in_channels:
            raise ValueError(
                f"vocoder input must be a mel of shape [B, {self.in_channels}, T], got {tuple(speech_feat.shape)}"
            )
        if speech_feat.shape[2] < min_frames:
            raise ValueError(
                f"vocoder input needs at least {min_frames} mel frames, got {speech_feat.shape[2]}"
            )

    def _upsample_f0(self, f0: torch.Tensor) -> torch.Tensor:
        """f0 [B, T] -> [B, T * upsample_scale, 1] (nearest, as the official `f0_upsamp`)."""
        return F.interpolate(
            f0[:, None], scale_factor=float(self.upsample_scale), mode="nearest"
        ).transpose(1, 2)

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        """source [B, L] -> [B, n_fft + 2, frames]: real parts then imaginary parts."""
        n_fft, hop = self.istft_params["n_fft"], self.istft_params["hop_len"]
        spec = torch.stft(x, n_fft, hop, n_fft, window=self.stft_window.to(x), return_complex=True)
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        n_fft, hop = self.istft_params["n_fft"], self.istft_params["hop_len"]
        magnitude = torch.clip(magnitude, max=1e2)
        real = magnitude * torch.cos(phase)
        img = magnitude * torch.sin(phase)
        return torch.istft(
            torch.complex(real, img), n_fft, hop, n_fft, window=self.stft_window.to(magnitude)
        )

    def _upsample_and_fuse(
        self, x: torch.Tensor, s_stft: torch.Tensor, frames: list[int] | None = None
    ) -> torch.Tensor:
        """conv_pre output -> last-stage features, fusing the downsampled source at each stage.
        ``frames``: each row's conv_pre frames in a padded batch of non-causal layers; every
        convolution's output past a row's end is then zeroed, as the row alone is padded."""
        x = _zero_past_rows(x, _valid_frames(frames, x))
        for i in range(self.num_upsamples):
            # a long utterance's stages take seconds each (a 2-minute CosyVoice2 utterance's
            # vocoder ~4 s on 2 cores): a cancelled or closing one stops between them
            check(f"vocoder stage {i}")  # (networks.abort)
            x = F.leaky_relu(x, self.lrelu_slope)
            x = self.ups[i](x)
            if frames is not None:
                up = self.ups[i]
                growth = up.kernel_size[0] - up.stride[0] - 2 * up.padding[0]
                frames = [n * up.stride[0] + growth for n in frames]
            if i == self.num_upsamples - 1:
                x = reflect_pad_time(x, 1, 0)  # the official ReflectionPad1d((1, 0))
                frames = None if frames is None else [n + 1 for n in frames]
            valid = _valid_frames(frames, x)
            x = _zero_past_rows(x, valid)
            si = self.source_resblocks[i](
                _zero_past_rows(self.source_downs[i](s_stft), valid), valid
            )
            x = x + si
            xs = self.resblocks[i * self.num_kernels](x, valid)
            for j in range(1, self.num_kernels):
                check(f"vocoder stage {i} resblock {j}")
                xs += self.resblocks[i * self.num_kernels + j](x, valid)
            x = xs / self.num_kernels
        return x

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the convolution weights, in which the stack computes."""
        return self.conv_post.weight.dtype

    def _to_waveform(self, x: torch.Tensor) -> torch.Tensor:
        """last-stage features -> waveform [B, samples] (not yet clamped)."""
        return self._spectrum_to_waveform(self._spectrum(x))

    def _spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """last-stage features -> float32 [B, n_fft + 2, frames]: log-magnitudes, phase inputs."""
        x = F.leaky_relu(x)  # default slope 0.01 here, as official (not lrelu_slope)
        return self.conv_post(x).float()  # exp, sin and the iSTFT in float32

    def _spectrum_to_waveform(self, x: torch.Tensor) -> torch.Tensor:
        check("vocoder waveform")
        n_bins = self.istft_params["n_fft"] // 2 + 1
        magnitude = torch.exp(x[:, :n_bins, :])
        phase = torch.sin(x[:, n_bins:, :])  # the official "redundant" sin, kept for parity
        return self._istft(magnitude, phase)

    def decode_rows(
        self,
        mels: Sequence[torch.Tensor],
        sources: Sequence[torch.Tensor],
        finals: Sequence[bool] | None = None,
    ) -> list[torch.Tensor]:
        """Mels [1, 80, T_i] and their sources [1, 1, L_i] -> clamped waveforms [1, samples_i], as
        ``decode`` gives each alone (``finals[i]`` its ``finalize``; default all True), the
        convolutions computed as one zero-padded batch. The source's STFT and the iSTFT are per
        row (their reflect padding looks at the row's own end). Past a row's end the non-causal
        generator zeroes every convolution's output, as the row alone is zero-padded; the causal
        one (``causal``) never looks there, but for conv_pre's look-ahead, which sees zero
        frames past a final row as alone, and a non-final row's own last frames as alone."""
        finals = [True] * len(mels) if finals is None else list(finals)
        dtype = self.compute_dtype
        look = self.conv_pre_look_right
        if look == 0 and not all(finals):
            raise ValueError("only a vocoder with a conv_pre look-ahead decodes non-final rows")
        stft_per_frame = math.prod(self.upsample_rates)
        spectra = []
        for source, final in zip(sources, finals, strict=True):
            spectrum = self._stft(source.squeeze(1))
            if not final:  # as decode: the look-ahead frames' source goes
                spectrum = spectrum[:, :, : -stft_per_frame * look]
            spectra.append(spectrum)
        x = self.conv_pre(stack_padded(list(mels)).to(dtype))
        # the STFT frames of the longest mel (a non-final row's are cut short)
        s_stft = stack_padded(spectra, x.shape[2] * stft_per_frame + 1).to(dtype)
        frames = None if self.causal else [m.shape[2] for m in mels]
        x = self._spectrum(self._upsample_and_fuse(x, s_stft, frames))
        speech = []
        for row, (spectrum, final) in enumerate(zip(spectra, finals, strict=True)):
            wave = self._spectrum_to_waveform(x[row : row + 1, :, : spectrum.shape[2]])
            if not final:
                wave = wave[:, : -self.upsample_scale]
            speech.append(torch.clamp(wave, -self.audio_limit, self.audio_limit))
        return speech


class HiFTGenerator(HiFTBase):
    """HiFTNet generator (neural source filter + iSTFTNet) of CosyVoice v1/v2."""

    def __init__(
        self,
        in_channels: int = 80,
        base_channels: int = 512,
        nb_harmonics: int = 8,
        sampling_rate: int = 22050,
        nsf_alpha: float = 0.1,
        nsf_sigma: float = 0.003,
        nsf_voiced_threshold: float = 10,
        upsample_rates: Sequence[int] = (8, 8),
        upsample_kernel_sizes: Sequence[int] = (16, 16),
        istft_params: Mapping[str, int] | None = None,
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        source_resblock_kernel_sizes: Sequence[int] = (7, 11),
        source_resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5)),
        lrelu_slope: float = 0.1,
        audio_limit: float = 0.99,
        f0_predictor: nn.Module | None = None,
    ):
        super().__init__()
        istft_params = istft_params or {"n_fft": 16, "hop_len": 4}
        self._init_common(
            in_channels,
            sampling_rate,
            istft_params,
            upsample_rates,
            resblock_kernel_sizes,
            lrelu_slope,
            audio_limit,
        )
        n_fft = self.istft_params["n_fft"]
        self.nb_harmonics = nb_harmonics
        # official quirk: the sine generator is chosen by sampling rate (SineGen only for 22.05 kHz)
        self.m_source = SourceModuleHnNSF(
            sampling_rate=sampling_rate,
            upsample_scale=self.upsample_scale,
            harmonic_num=nb_harmonics,
            sine_amp=nsf_alpha,
            add_noise_std=nsf_sigma,
            voiced_threshod=nsf_voiced_threshold,
            sinegen_type="1" if sampling_rate == 22050 else "2",
        )
        self.conv_pre = WeightNormConv1d(in_channels, base_channels, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            [
                WeightNormConvTranspose1d(
                    base_channels // 2**i, base_channels // 2 ** (i + 1), k, u, padding=(k - u) // 2
                )
                for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes, strict=True))
            ]
        )
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(
                _source_down_rates(self.upsample_rates),
                source_resblock_kernel_sizes,
                source_resblock_dilation_sizes,
                strict=True,
            )
        ):
            ch = base_channels // 2 ** (i + 1)
            if u == 1:
                self.source_downs.append(Conv1d(n_fft + 2, ch, 1, 1))
            else:
                self.source_downs.append(Conv1d(n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            [
                ResBlock(base_channels // 2 ** (i + 1), k, d)
                for i in range(len(self.ups))
                for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes, strict=True)
            ]
        )
        self.conv_post = WeightNormConv1d(
            base_channels // 2 ** len(self.ups), n_fft + 2, 7, 1, padding=3
        )
        if f0_predictor is None:
            raise ModelDirError("HiFTGenerator needs an f0_predictor module")
        self.f0_predictor = f0_predictor

    def decode(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """mel [B, 80, T] + source [B, 1, L] -> waveform [B, samples], clamped to audio_limit."""
        dtype = self.compute_dtype
        s_stft = self._stft(s.squeeze(1)).to(dtype)
        x = self._upsample_and_fuse(self.conv_pre(x.to(dtype)), s_stft)
        return torch.clamp(self._to_waveform(x), -self.audio_limit, self.audio_limit)

    @torch.inference_mode()
    def inference(
        self,
        speech_feat: torch.Tensor,
        cache_source: torch.Tensor | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, 80, T] -> (speech [B, T * upsample_scale], source [B, 1, T * upsample_scale]).

        `cache_source` [B, 1, N] (None or empty for none) overwrites the first N source samples,
        as the official streaming code does to avoid glitches between chunks. Random draws (v1:
        start phases, noise, unused noise branch; v2: start phases, noise, unused noise branch)
        come from `generator` in the official order."""
        s = self._source(speech_feat, cache_source, generator)
        return self.decode(speech_feat, s), s

    def _source(
        self, mel: torch.Tensor, cache_source: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor:
        """The NSF source [B, 1, T * upsample_scale] of mel [B, 80, T], its head overwritten by
        ``cache_source`` (see ``inference``)."""
        self._check_mel(mel, 1)
        f0 = self.f0_predictor(mel)
        check("vocoder source")
        s = self.m_source(self._upsample_f0(f0), generator).transpose(1, 2)
        if cache_source is not None and cache_source.shape[2] != 0:
            if cache_source.shape[2] > s.shape[2]:
                raise ValueError(
                    f"cache_source has {cache_source.shape[2]} samples, more than the {s.shape[2]} this mel gives"
                )
            s[:, :, : cache_source.shape[2]] = cache_source
        return s

    @torch.inference_mode()
    def inference_rows(
        self, mels: Sequence[torch.Tensor], generators: Sequence[torch.Generator]
    ) -> list[torch.Tensor]:
        """Whole utterances' mels [1, 80, T_i] -> their waveforms [1, T_i * upsample_scale], each
        as ``inference`` gives it alone with its own generator: f0 and source per row (cheap,
        and the source's phase sum would turn any rounding into audible drift), the convolution
        stack as one padded batch (``decode_rows``)."""
        sources = [self._source(m, None, g) for m, g in zip(mels, generators, strict=True)]
        return self.decode_rows(mels, sources)

    def new_stream(self, mel_cache: int) -> CrossFadeStream:
        """Streaming state of the official v1/v2 vocoding: each chunk is vocoded with the last
        ``mel_cache`` mel frames of the previous one in front, its source overwritten by the
        previous source there, and the overlap cross-faded with a Hamming window."""
        return CrossFadeStream(mel_cache, mel_cache * self.upsample_scale)

    @torch.inference_mode()
    def stream_step(
        self,
        state: CrossFadeStream,
        mel: torch.Tensor,
        generator: torch.Generator,
        finalize: bool,
        speed: float = 1.0,
    ) -> torch.Tensor:
        """The waveform [1, N] of the next mel chunk [1, 80, T]; the last ``mel_cache`` frames'
        worth of samples are held back for the cross-fade until ``finalize``. ``speed`` (last
        chunk only, as the official) stretches the mel in time."""
        return self.stream_steps([state], [mel], [generator], [finalize], [speed])[0]

    @torch.inference_mode()
    def stream_steps(
        self,
        states: Sequence[CrossFadeStream],
        mels: Sequence[torch.Tensor],
        generators: Sequence[torch.Generator],
        finals: Sequence[bool],
        speeds: Sequence[float],
    ) -> list[torch.Tensor]:
        """``stream_step`` of several streams, their convolutions as one padded batch
        (``decode_rows``; one stream: ``decode``). Each stream's result is as alone."""
        rows = list(zip(states, mels, generators, finals, speeds, strict=True))
        inputs, sources = [], []
        for state, mel, generator, final, speed in rows:
            cache_source = None
            if state.mel is not None:
                mel, cache_source = torch.concat([state.mel, mel], dim=2), state.source
            mel = at_speed(mel, speed) if final else mel
            inputs.append(mel)
            sources.append(self._source(mel, cache_source, generator))
        if len(rows) == 1:
            speech = [self.decode(inputs[0], sources[0])]
        else:
            speech = self.decode_rows(inputs, sources)
        out = []
        for (state, _, _, final, _), mel, source, wave in zip(
            rows, inputs, sources, speech, strict=True
        ):
            if state.speech is not None:
                wave = fade_in_out(wave, state.speech, state.window)
            if not final:
                state.mel = mel[:, :, -state.mel_cache :]
                state.source = source[:, :, -state.samples :]
                state.speech = wave[:, -state.samples :]
                wave = wave[:, : -state.samples]
            out.append(wave)
        return out


class CrossFadeStream:
    """Per-request state of :meth:`HiFTGenerator.stream_step`."""

    def __init__(self, mel_cache: int, samples: int) -> None:
        self.mel_cache, self.samples = mel_cache, samples
        self.window = torch.from_numpy(np.hamming(2 * samples))
        self.mel: torch.Tensor | None = None  # look-back mel frames
        self.source: torch.Tensor | None = None
        self.speech: torch.Tensor | None = None  # samples held back for the cross-fade


def _source_down_rates(upsample_rates: Sequence[int]) -> list[int]:
    """Stride of `source_downs[i]`: the product of the upsample rates after stage i."""
    rates = [1, *upsample_rates[::-1][:-1]]
    return [math.prod(rates[: i + 1]) for i in range(len(rates))][::-1]


def at_speed(mel: torch.Tensor, speed: float) -> torch.Tensor:
    """mel [B, 80, T] stretched in time for ``speed`` (linear, as the official's last chunk)."""
    if speed == 1.0:
        return mel
    # at least one frame: the official's int() gives none for a 1-frame mel above speed 1
    return F.interpolate(mel, size=max(1, int(mel.shape[2] / speed)), mode="linear")


def stack_padded(rows: Sequence[torch.Tensor], size: int | None = None) -> torch.Tensor:
    """[1, C, T_i] rows zero-padded along time into one [B, C, size] batch (default max T_i)."""
    size = max(r.shape[2] for r in rows) if size is None else size
    return torch.cat([F.pad(r, (0, size - r.shape[2])) for r in rows])


def _valid_frames(frames: list[int] | None, like: torch.Tensor) -> torch.Tensor | None:
    """[B, 1, T] of ``like``'s dtype: 1 for each row's first ``frames`` frames, 0 after."""
    return None if frames is None else frame_mask(frames, like.shape[2], like)
