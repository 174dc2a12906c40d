"""Causal HiFT vocoder of CosyVoice v3 (official `CausalHiFTGenerator`, `CausalConvRNNF0Predictor`).

Same parameter names as the v1/v2 generator (`hift.py`); the differences:

* every convolution is causal (left zero padding), except `conv_pre` (kernel 5) and the f0
  predictor's first conv (kernel 4), which look 4 and 3 frames ahead ("right" padding);
* `ups.i` nearest-upsample then convolve (Conv1d-shaped weights), `source_downs.i` pad left by
  stride - 1 and convolve with stride;
* the f0 predictor runs in float64 (the official code insists: precision matters when the same
  history is re-vocoded chunk after chunk);
* the source has no per-call randomness: the start phases (`rand_ini`) and the noise
  (`sine_waves`, uniform [0, 1)) are fixed tensors the official module draws from the global CPU
  RNG at construction time. They are not in `hift.pt`; `FixedSourceRandomness` regenerates them.

Streaming (`finalize=False`) uses the last 3 mel frames only as f0 look-ahead and the next 4 as
`conv_pre` look-ahead, and drops the last `upsample_scale` samples, exactly as the official code.
`new_stream` / `stream_step` (hift_causal_stream.py) emit the same samples as the official
re-vocoding of the whole history, with bounded work per chunk.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.networks import hift_causal_stream
from cosyvoice_lite.networks.abort import check
from cosyvoice_lite.networks.conv_layout import Conv1d, cat_time, pad_time, repeat_frames
from cosyvoice_lite.networks.hift import (
    FoldedWeightNorm,
    HiFTBase,
    ResBlock,
    SineGen2,
    _source_down_rates,
    stack_padded,
)

# ---------------------------------------------------------------------------------------------
# causal convolutions
# ---------------------------------------------------------------------------------------------


class CausalConv1d(Conv1d):
    """Conv1d padded with zeros on one side so that the output length equals the input length.
    'left': causal; 'right': looks `causal_padding` frames ahead. The right side may instead be
    given real frames (`context`) when more input follows (streaming)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        causal_type: str = "left",
    ):
        if stride != 1:
            raise ValueError("CausalConv1d supports stride 1 only")
        if causal_type not in ("left", "right"):
            raise ValueError(f"causal_type must be 'left' or 'right', got {causal_type!r}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=dilation
        )
        # official formula (equals (k - 1) * d for odd kernels)
        self.causal_padding = (
            int((kernel_size * dilation - dilation) / 2) * 2 + (kernel_size + 1) % 2
        )
        self.causal_type = causal_type

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            pad = (
                (self.causal_padding, 0) if self.causal_type == "left" else (0, self.causal_padding)
            )
            x = pad_time(x, *pad)
        elif self.causal_type == "right" and context.shape[2] == self.causal_padding:
            x = cat_time([x, context])
        else:
            raise ValueError(
                f"look-ahead context must be {self.causal_padding} frames, got {tuple(context.shape)}"
            )
        # the weights follow the input's dtype: the f0 predictor runs in float64
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


class WeightNormCausalConv1d(FoldedWeightNorm, CausalConv1d):
    """`weight_norm(CausalConv1d(...))` with the weight folded."""


class CausalConv1dDownSample(Conv1d):
    """Strided Conv1d after `stride - 1` zeros of left padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0)
        self.causal_padding = stride - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_time(x, self.causal_padding, 0))


class CausalConv1dUpsample(FoldedWeightNorm, Conv1d):
    """`weight_norm(CausalConv1dUpsample(...))`: nearest upsampling by `stride`, then a causal
    Conv1d (left padding kernel_size - 1). Weight folded."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__(in_channels, out_channels, kernel_size, 1, padding=0)
        self.causal_padding = kernel_size - 1
        self.upsample_factor = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = repeat_frames(x, self.upsample_factor)
        return super().forward(pad_time(x, self.causal_padding, 0))


class CausalResBlock(ResBlock):
    """ResBlock with left-padded (causal) convolutions."""

    def _make_conv(self, channels: int, kernel_size: int, dilation: int) -> nn.Module:
        return WeightNormCausalConv1d(
            channels, channels, kernel_size, 1, dilation=dilation, causal_type="left"
        )


class CausalConvRNNF0Predictor(nn.Module):
    """mel [B, 80, T] -> f0 [B, T] in float64. The first conv looks 3 frames ahead; with
    `finalize=False` the last 3 input frames serve only as that look-ahead (output T - 3)."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512):
        super().__init__()
        self.num_class = num_class
        layers: list[nn.Module] = [
            WeightNormCausalConv1d(in_channels, cond_channels, kernel_size=4, causal_type="right"),
            nn.ELU(),
        ]
        for _ in range(4):
            layers += [
                WeightNormCausalConv1d(
                    cond_channels, cond_channels, kernel_size=3, causal_type="left"
                ),
                nn.ELU(),
            ]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)
        # float64 parameters: official checkpoints (float32 g, v) are then folded in float64,
        # exactly as the official module computes its weight after `.to(torch.float64)`
        self.double()

    @property
    def look_ahead(self) -> int:
        return self.condnet[0].causal_padding

    def forward(self, x: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        x = x.to(torch.float64)
        if finalize:
            x = self.condnet[0](x)
        else:
            x = self.condnet[0](x[:, :, : -self.look_ahead], x[:, :, -self.look_ahead :])
        for layer in self.condnet[1:]:
            x = layer(x)
        x = x.transpose(1, 2)
        weight, bias = self.classifier.weight, self.classifier.bias
        return torch.abs(F.linear(x, weight.to(x.dtype), bias.to(x.dtype)).squeeze(-1))


# ---------------------------------------------------------------------------------------------
# fixed source randomness
# ---------------------------------------------------------------------------------------------

# The released v3 model is built by hyperpyyaml in this order after `set_all_random_seed(0)` in
# `CausalConditionalCFM.__init__` (everything before that seed does not matter):
#   flow.decoder.rand_noise             torch.randn(1, 80, 15000)
#   flow.input_embedding                nn.Embedding(6561, 80): normal_
#   flow.spk_embed_affine_layer         nn.Linear(192, 80): kaiming_uniform_ weight, uniform_ bias
#   hift.f0_predictor                   5 convs + Linear: uniform_ weight, uniform_ bias each
#   hift.m_source.l_sin_gen.rand_ini    torch.rand(1, 9), column 0 set to 0
#   hift.m_source.l_sin_gen.sine_waves  torch.rand(1, 300 * 24000, 9)
# (then l_linear's init and an unused `uv` buffer). CPU draws only depend on the number and
# dtype of the values drawn, so replaying the same shapes on a generator seeded 0 gives the same
# tensors bit for bit.
_RELEASE_FLOW_NOISE_SHAPE = (1, 80, 15000)
_RELEASE_FLOW_EMBEDDING_SHAPE = (6561, 80)
_RELEASE_FLOW_SPK_AFFINE_SHAPES = ((80, 192), (80,))
_SINE_WAVES_MAX_SAMPLES = 300 * 24000


class FixedSourceRandomness:
    """The official causal SineGen2's fixed `rand_ini` [1, dim] and noise `sine_waves`
    [1, 7.2M, dim], regenerated lazily. CPU `rand` draws values one after another, so any
    prefix of `sine_waves` can be drawn on its own from the generator state that follows
    `rand_ini`; only the prefix a request needs is materialised (and kept, grown on demand)."""

    def __init__(self, f0_predictor_shapes: Sequence[torch.Size], dim: int = 9):
        self.f0_predictor_shapes = [tuple(s) for s in f0_predictor_shapes]
        self.dim = dim
        self._lock = threading.Lock()
        self._rand_ini: torch.Tensor | None = None
        self._noise_state: torch.Tensor | None = None
        self._sine_waves = torch.empty(1, 0, dim)

    def __getstate__(self) -> dict:
        # a lock cannot be copied or pickled (deepcopy of the vocoder); a fresh one is made
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _replay(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rand_ini, generator state right after it), from a generator seeded 0."""
        g = torch.Generator(device="cpu").manual_seed(0)
        torch.empty(_RELEASE_FLOW_NOISE_SHAPE).normal_(generator=g)
        torch.empty(_RELEASE_FLOW_EMBEDDING_SHAPE).normal_(generator=g)
        for shape in (*_RELEASE_FLOW_SPK_AFFINE_SHAPES, *self.f0_predictor_shapes):
            # the official parameters are float32 when drawn (a float64 draw uses twice the bits)
            torch.empty(shape, dtype=torch.float32).uniform_(generator=g)
        rand_ini = torch.rand(1, self.dim, generator=g)
        rand_ini[:, 0] = 0
        return rand_ini, g.get_state()

    def _ensure_replayed(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rand_ini is None or self._noise_state is None:
            self._rand_ini, self._noise_state = self._replay()
        return self._rand_ini, self._noise_state

    def rand_ini(self) -> torch.Tensor:
        """The official `rand_ini` [1, dim] (column 0 is 0)."""
        with self._lock:
            return self._ensure_replayed()[0]

    def sine_waves(self, num_samples: int) -> torch.Tensor:
        """`sine_waves[:, :num_samples]` of the official buffer (float32, CPU)."""
        if num_samples > _SINE_WAVES_MAX_SAMPLES:
            raise ValueError(
                f"the v3 vocoder handles at most {_SINE_WAVES_MAX_SAMPLES} samples (300 s) per call, "
                f"got {num_samples}"
            )
        with self._lock:
            _, noise_state = self._ensure_replayed()
            if self._sine_waves.shape[1] < num_samples:
                # grow geometrically so that streaming (which re-vocodes the whole history) stays linear
                size = min(max(num_samples, 2 * self._sine_waves.shape[1]), _SINE_WAVES_MAX_SAMPLES)
                g = torch.Generator(device="cpu")
                g.set_state(noise_state)
                self._sine_waves = torch.rand(1, size, self.dim, generator=g)
            return self._sine_waves[:, :num_samples]


class CausalSineGen2(SineGen2):
    """SineGen2 with the official causal inference path: fixed start phases, nearest phase
    upsampling and fixed uniform noise."""

    def __init__(
        self,
        samp_rate: int,
        upsample_scale: int,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        noise_std: float = 0.003,
        voiced_threshold: float = 0,
    ):
        super().__init__(
            samp_rate, upsample_scale, harmonic_num, sine_amp, noise_std, voiced_threshold
        )
        self.fixed: FixedSourceRandomness | None = None  # set by CausalHiFTGenerator

    def forward(self, f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """f0 [B, L, 1] at sample rate -> (sine_waves [B, L, dim], uv [B, L, 1])."""
        if self.fixed is None:
            raise ModelDirError("CausalSineGen2 is missing its fixed source randomness")
        rad_values = self.harmonic_rads(f0)
        rad_values[:, 0, :] = rad_values[:, 0, :] + self.fixed.rand_ini().to(rad_values)
        sine_waves = self.integrate_phase(rad_values, "nearest") * self.sine_amp
        check("vocoder source noise")
        uv = (f0 > self.voiced_threshold).to(f0.dtype)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        noise = noise_amp * self.fixed.sine_waves(sine_waves.shape[1]).to(sine_waves)
        return sine_waves * uv + noise, uv


class CausalSourceModuleHnNSF(nn.Module):
    """Causal harmonic source: `tanh(l_linear(sine harmonics))`. The official module's noise
    branch (a fixed `uv` buffer) is unused by the generator and not reproduced."""

    def __init__(
        self,
        sampling_rate: int,
        upsample_scale: int,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        add_noise_std: float = 0.003,
        voiced_threshod: float = 0,
    ):
        super().__init__()
        self.sine_amp = sine_amp
        self.noise_std = add_noise_std
        self.l_sin_gen = CausalSineGen2(
            sampling_rate, upsample_scale, harmonic_num, sine_amp, add_noise_std, voiced_threshod
        )
        self.l_linear = nn.Linear(harmonic_num + 1, 1)

    def forward(self, f0: torch.Tensor) -> torch.Tensor:
        sine_waves, _ = self.l_sin_gen(f0)
        check("vocoder source merge")  # (networks.abort; a long utterance's steps: ~1 s each)
        return torch.tanh(self.l_linear(sine_waves))


# ---------------------------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------------------------


class CausalHiFTGenerator(HiFTBase):
    """Causal HiFTNet generator of CosyVoice v3 (the official streams by re-vocoding the mel
    history; `stream_step` re-runs a bounded window instead)."""

    causal = True

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
        conv_pre_look_right: int = 4,
        f0_predictor: CausalConvRNNF0Predictor | None = None,
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
        if sampling_rate == 22050:
            # the official code would pick the v1 SineGen, which has no causal path
            raise ModelDirError(
                "CausalHiFTGenerator supports the SineGen2 source only (sampling_rate != 22050)"
            )
        if f0_predictor is None:
            raise ModelDirError("CausalHiFTGenerator needs an f0_predictor module")
        n_fft = self.istft_params["n_fft"]
        self.nb_harmonics = nb_harmonics
        self.conv_pre_look_right = conv_pre_look_right
        self.m_source = CausalSourceModuleHnNSF(
            sampling_rate=sampling_rate,
            upsample_scale=self.upsample_scale,
            harmonic_num=nb_harmonics,
            sine_amp=nsf_alpha,
            add_noise_std=nsf_sigma,
            voiced_threshod=nsf_voiced_threshold,
        )
        self.conv_pre = WeightNormCausalConv1d(
            in_channels, base_channels, conv_pre_look_right + 1, 1, causal_type="right"
        )
        self.ups = nn.ModuleList(
            [
                CausalConv1dUpsample(base_channels // 2**i, base_channels // 2 ** (i + 1), k, u)
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
                self.source_downs.append(CausalConv1d(n_fft + 2, ch, 1, 1, causal_type="left"))
            else:
                self.source_downs.append(CausalConv1dDownSample(n_fft + 2, ch, u * 2, u))
            self.source_resblocks.append(CausalResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            [
                CausalResBlock(base_channels // 2 ** (i + 1), k, d)
                for i in range(len(self.ups))
                for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes, strict=True)
            ]
        )
        self.conv_post = WeightNormCausalConv1d(
            base_channels // 2 ** len(self.ups), n_fft + 2, 7, 1, causal_type="left"
        )
        self.f0_predictor = f0_predictor
        # the fixed buffers depend on the f0 predictor's init draws, hence its parameter shapes
        self.m_source.l_sin_gen.fixed = FixedSourceRandomness(
            [p.shape for p in f0_predictor.parameters()], dim=nb_harmonics + 1
        )

    def decode(self, x: torch.Tensor, s: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """mel [B, 80, T] + source [B, 1, L] -> waveform. With finalize=False the last
        `conv_pre_look_right` frames are look-ahead only and the last hop of output is dropped."""
        dtype = self.compute_dtype
        s_stft = self._stft(s.squeeze(1)).to(dtype)
        x = x.to(dtype)
        if finalize:
            x = self.conv_pre(x)
        else:
            look = self.conv_pre_look_right
            x = self.conv_pre(x[:, :, :-look], x[:, :, -look:])
            s_stft = s_stft[:, :, : -math.prod(self.upsample_rates) * look]
        x = self._upsample_and_fuse(x, s_stft)
        x = self._to_waveform(x)
        if not finalize:
            x = x[:, : -self.upsample_scale]
        return torch.clamp(x, -self.audio_limit, self.audio_limit)

    @torch.inference_mode()
    def inference(
        self, speech_feat: torch.Tensor, finalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, 80, T] -> (speech [B, samples], source [B, 1, L]).

        finalize=True: samples = T * upsample_scale. finalize=False (more mel follows): the last
        3 frames are f0 look-ahead and the 4 before them conv_pre look-ahead, so
        samples = (T - 8) * upsample_scale and the source covers T - 3 frames."""
        look_f0 = self.f0_predictor.look_ahead
        self._check_mel(speech_feat, 1 if finalize else look_f0 + self.conv_pre_look_right + 1)
        f0 = self.f0_predictor(speech_feat, finalize=finalize).to(speech_feat.dtype)
        check("vocoder source")
        s = self.m_source(self._upsample_f0(f0)).transpose(1, 2)
        mel = speech_feat if finalize else speech_feat[:, :, :-look_f0]
        return self.decode(mel, s, finalize=finalize), s

    @torch.inference_mode()
    def inference_rows(self, mels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Whole utterances' mels [1, 80, T_i] -> their waveforms [1, T_i * upsample_scale], as
        ``inference`` gives each alone, computed as one zero-padded batch: every layer after the
        look-ahead of conv_pre and the f0 predictor (which see the same zero frames past a row's
        end as alone) is causal, so a row never sees the padding; the source's STFT and the
        iSTFT are per row (``decode_rows``)."""
        for mel in mels:
            self._check_mel(mel, 1)
        mel = stack_padded(mels)
        f0 = self.f0_predictor(mel, finalize=True).to(mel.dtype)
        check("vocoder source")
        source = self.m_source(self._upsample_f0(f0)).transpose(1, 2)
        scale = self.upsample_scale
        sources = [source[row : row + 1, :, : m.shape[2] * scale] for row, m in enumerate(mels)]
        return self.decode_rows(mels, sources)

    # incremental streaming (hift_causal_stream.py): bounded work per chunk, official samples

    def new_stream(self) -> hift_causal_stream.HiFTStreamState:
        """Per-request state of an incremental vocoder stream."""
        return hift_causal_stream.new_stream(self)

    def stream_step(
        self, state: hift_causal_stream.HiFTStreamState, mel: torch.Tensor, finalize: bool = False
    ) -> torch.Tensor:
        """Append mel [1, 80, m]; returns the new samples [1, n] (see hift_causal_stream)."""
        return hift_causal_stream.stream_step(self, state, mel, finalize)

    def stream_steps(
        self,
        states: list[hift_causal_stream.HiFTStreamState],
        mels: list[torch.Tensor],
        finals: list[bool],
    ) -> list[torch.Tensor]:
        """``stream_step`` of several streams, their windows decoded as one padded batch."""
        return hift_causal_stream.stream_steps(self, states, mels, finals)
