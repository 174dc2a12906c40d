"""Incremental streaming for the causal v3 vocoder (`CausalHiFTGenerator`, see `hift_causal.py`).

The official CosyVoice3Model streams audio by accumulating every mel frame so far, re-vocoding
the whole history with `hift.inference(all_mel, finalize=False)` at each chunk and emitting only
the samples beyond what it already emitted (the last call uses finalize=True). Its cost grows with
the history. Here each call re-runs the vocoder over a bounded window of recent frames instead,
and emits the same samples.

Why a window is enough: the vocoder is causal apart from fixed look-aheads (f0 predictor 3
frames, `conv_pre` 4 frames, the last 480 samples of a non-final call are dropped), so a sample
depends on a bounded stretch of the past, except through the NSF source:

* the source phase is a running sum over the whole history (causal SineGen2: per-frame phase
  increments, cumsum, nearest upsampling). The state carries that sum. The official cumsum runs
  on float32 tensors and the CPU kernel accumulates sequentially in float64, so the carried sum
  is the float64 accumulator and the continuation is a float64 cumsum seeded with it: the phase
  (times 2 pi x 480, where one float32 ulp of the sum is already ~0.1 rad) comes out bit for bit;
* the noise buffer and the sample positions are absolute, so the window starts at a known
  absolute frame (a multiple of 480 samples, hence of the STFT hop);
* f0 is computed once per frame (with its 8 frames of left context and 3 of look-ahead) and
  cached, so the window's source is exact from its first sample.

The rest (STFT of the source, conv_pre, upsampling convs, resblocks, conv_post, iSTFT) only sees
the window's own frames; the left edge of the window (zero padding, reflection padding) disturbs
the first `decoder_left_context_samples` output samples and no more. The window therefore starts
that far before the first sample still to emit: computed from the layer geometry below, it is
13,736 samples (28.6 frames; the deepest path is the first stage's source branch) for the released
v3 vocoder. A call decodes that context, the new frames and the look-ahead (about 134 frames for
a 100-frame chunk): the work per call is bounded by the chunk size, not the history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.errors import ModelDirError

if TYPE_CHECKING:
    from cosyvoice_lite.networks.hift_causal import CausalHiFTGenerator

__all__ = [
    "HiFTStreamState",
    "new_stream",
    "stream_step",
    "stream_steps",
    "decoder_left_context_samples",
    "f0_left_context_frames",
]


# ---------------------------------------------------------------------------------- geometry


def _causal_extent(module: nn.Module) -> int:
    """Left padding of a causal conv (0 for the right-looking ones)."""
    if getattr(module, "causal_type", "left") != "left":
        return 0
    return int(getattr(module, "causal_padding", 0))


def _resblock_extent(block: nn.Module) -> int:
    """How far back a CausalResBlock reads: its convs run one after another."""
    return sum(
        _causal_extent(c1) + _causal_extent(c2)
        for c1, c2 in zip(block.convs1, block.convs2, strict=True)
    )


def f0_left_context_frames(hift: CausalHiFTGenerator) -> int:
    """Mel frames before a frame that its f0 depends on (8 for the released predictor)."""
    return sum(_causal_extent(layer) for layer in hift.f0_predictor.condnet)


def decoder_left_context_samples(hift: CausalHiFTGenerator) -> int:
    """The first exact output sample of `decode` run on a window that starts inside a longer
    signal, given exact mel frames and source samples from the window's first one on.

    Forward propagation of the window edge: for each intermediate sequence, the first index that
    equals the full run (window relative). A left-padded conv moves it by its padding; a nearest
    upsample x u then conv by e * u + padding; a strided conv to ceil((e + padding) / stride);
    the STFT's centre reflection to the first frame that reads no padded sample; the last
    stage's ReflectionPad1d((1, 0)) by one; the iSTFT (overlap-add, window envelope) to the first
    sample whose frames all exist and are exact.
    """
    n_fft, hop = hift.istft_params["n_fft"], hift.istft_params["hop_len"]
    first_stft = math.ceil((n_fft // 2) / hop)  # STFT frame g reads samples hop*g - n_fft/2 ...
    first = 0  # conv_pre looks right only: exact from frame 0
    for i in range(hift.num_upsamples):
        up = hift.ups[i]
        first = first * up.upsample_factor + up.causal_padding
        if i == hift.num_upsamples - 1:
            first += 1  # ReflectionPad1d((1, 0))
        down = hift.source_downs[i]
        stride = down.stride[0]
        source_first = math.ceil((first_stft + _causal_extent(down)) / stride)
        source_first += _resblock_extent(hift.source_resblocks[i])
        first = max(first, source_first)
        first += max(
            _resblock_extent(hift.resblocks[i * hift.num_kernels + j])
            for j in range(hift.num_kernels)
        )
    first += _causal_extent(hift.conv_post)
    # iSTFT output sample n (after the centre trim) gets frames g with hop*g <= n + n_fft/2 <=
    # hop*g + n_fft - 1; all of them must be exact frames
    return max(0, hop * (first - 1) + n_fft - n_fft // 2)


# ------------------------------------------------------------------------------------- state


@dataclass
class HiFTStreamState:
    """Everything one v3 vocoder stream remembers between chunks. Owned by one request.

    Create it with `CausalHiFTGenerator.new_stream`, feed mel with `stream_step`.
    """

    mel: torch.Tensor | None = None  # [1, 80, k] recent mel frames, the first is `mel_start`
    mel_start: int = 0
    frames: int = 0  # mel frames received so far
    f0: torch.Tensor | None = None  # [1, j] f0 of frames f0_start .. f0_done - 1
    f0_start: int = 0
    f0_done: int = 0
    window_start: int = 0  # first frame of the next decode window
    phase: torch.Tensor | None = None  # [1, 1, harmonics] float64 phase sum before window_start
    speech_offset: int = 0  # samples emitted so far
    finished: bool = False
    last_step_frames: int = 0  # mel frames the decoder ran on in the last call (cost probe)


def new_stream(hift: CausalHiFTGenerator) -> HiFTStreamState:
    """A fresh stream; the vocoder itself holds no per-request state."""
    return HiFTStreamState()


@torch.inference_mode()
def stream_step(
    hift: CausalHiFTGenerator, state: HiFTStreamState, mel: torch.Tensor, finalize: bool = False
) -> torch.Tensor:
    """Append mel frames [1, 80, m] (m >= 0); returns the new speech samples [1, n].

    The samples equal what the official stream emits for the same mel chunks: with all mel so
    far M frames, `hift.inference(all_mel, finalize)` minus the samples already emitted, i.e.
    up to (M - 8) * 480 samples before finalize and M * 480 with it.
    """
    return stream_steps(hift, [state], [mel], [finalize])[0]


@torch.inference_mode()
def stream_steps(
    hift: CausalHiFTGenerator,
    states: list[HiFTStreamState],
    mels: list[torch.Tensor],
    finals: list[bool],
) -> list[torch.Tensor]:
    """`stream_step` of several streams, their windows decoded as one padded batch
    (`HiFTBase.decode_rows`; one window: `decode`). Each stream's samples are as alone."""
    windows = [
        _next_window(hift, state, mel, final)
        for state, mel, final in zip(states, mels, finals, strict=True)
    ]
    due = [(w, final) for w, final in zip(windows, finals, strict=True) if w is not None]
    if len(due) <= 1:
        speeches = [hift.decode(w.mel, w.source, finalize=final) for w, final in due]
    else:
        speeches = hift.decode_rows(
            [w.mel for w, _ in due], [w.source for w, _ in due], [final for _, final in due]
        )
    out, speech = [], iter(speeches)
    for state, window in zip(states, windows, strict=True):
        if window is None:
            out.append(state.mel.new_zeros(1, 0))  # state.mel holds at least this call's mel
            continue
        out.append(_emit(hift, state, window, next(speech)))
    return out


@dataclass
class _Window:
    """One stream's next decode: mel frames start .. end - 1 (with its look-ahead), their
    source, the float64 phase sums, and the samples to emit up to."""

    mel: torch.Tensor
    source: torch.Tensor
    phase: torch.Tensor
    start: int
    end: int
    emit_end: int


def _next_window(
    hift: CausalHiFTGenerator, state: HiFTStreamState, mel: torch.Tensor, finalize: bool
) -> _Window | None:
    """Take mel [1, 80, m] into the stream; the window to decode, or None (nothing to emit)."""
    if state.finished:
        raise ValueError("this vocoder stream has already been finalized")
    if mel.dim() != 3 or mel.shape[0] != 1 or mel.shape[1] != hift.in_channels:
        raise ValueError(f"mel must be [1, {hift.in_channels}, m], got {tuple(mel.shape)}")
    state.mel = mel if state.mel is None else torch.cat([state.mel, mel.to(state.mel)], dim=2)
    state.frames += mel.shape[2]
    state.finished = finalize
    state.last_step_frames = 0
    scale = hift.upsample_scale
    total = state.frames
    look_f0 = hift.f0_predictor.look_ahead
    look_pre = hift.conv_pre_look_right
    if finalize:
        f0_end, end = total, total
        emit_end = total * scale
    else:
        # the official drops the last hop of a non-final call, one more frame
        f0_end, end = total - look_f0, total - look_f0
        emit_end = (end - look_pre - 1) * scale
    if emit_end <= state.speech_offset:
        return None

    _update_f0(hift, state, f0_end, finalize)
    start = state.window_start
    source, phase = _source(hift, state, start, end)
    window = state.mel[:, :, start - state.mel_start : end - state.mel_start]
    return _Window(window, source, phase, start, end, emit_end)


def _emit(
    hift: CausalHiFTGenerator, state: HiFTStreamState, window: _Window, speech: torch.Tensor
) -> torch.Tensor:
    """The new samples of a decoded window; the stream moves on past them."""
    scale, start, end = hift.upsample_scale, window.start, window.end
    state.last_step_frames = window.mel.shape[2]
    out = speech[:, state.speech_offset - start * scale : window.emit_end - start * scale]
    state.speech_offset = window.emit_end

    # the next window starts early enough for its first exact sample to precede speech_offset
    context = decoder_left_context_samples(hift)
    next_start = min(max(start, (state.speech_offset - context) // scale), end)
    state.phase = window.phase[:, next_start - start : next_start - start + 1]
    state.window_start = next_start
    keep_mel = min(next_start, state.f0_done - f0_left_context_frames(hift))
    _trim(state, keep_mel, next_start)
    return out


# ----------------------------------------------------------------------------------- helpers


def _update_f0(
    hift: CausalHiFTGenerator, state: HiFTStreamState, f0_end: int, finalize: bool
) -> None:
    """Computes the f0 of frames f0_done .. f0_end - 1 (each frame once, with its context)."""
    if f0_end <= state.f0_done or state.mel is None:
        return
    first = max(0, state.f0_done - f0_left_context_frames(hift))
    last = state.frames  # the look-ahead frames follow f0_end (or zeros with finalize)
    mel = state.mel[:, :, first - state.mel_start : last - state.mel_start]
    f0 = hift.f0_predictor(mel, finalize=finalize).to(mel.dtype)
    f0 = f0[:, f0.shape[1] - (f0_end - state.f0_done) :]
    state.f0 = f0 if state.f0 is None else torch.cat([state.f0, f0], dim=1)
    state.f0_done = f0_end


def _source(
    hift: CausalHiFTGenerator, state: HiFTStreamState, start: int, end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The NSF source [1, 1, (end - start) * 480] of frames start .. end - 1, and the float64
    phase sums [1, end - start + 1, harmonics] before each of those frames (and after the last).

    The same operations as CausalSineGen2 + CausalSourceModuleHnNSF, with the phase cumsum
    continued from the carried float64 accumulator.
    """
    sine_gen = hift.m_source.l_sin_gen
    scale = sine_gen.upsample_scale
    if state.f0 is None or sine_gen.fixed is None:
        raise ModelDirError("the vocoder stream needs f0 and the fixed source buffers")
    f0 = state.f0[:, start - state.f0_start : end - state.f0_start]
    f0 = hift._upsample_f0(f0)  # [1, L, 1] at sample rate
    rad_values = sine_gen.harmonic_rads(f0)
    if start == 0 and sine_gen.fixed is not None:
        rad_values[:, 0, :] = rad_values[:, 0, :] + sine_gen.fixed.rand_ini().to(rad_values)
    rad_values = F.interpolate(
        rad_values.transpose(1, 2), scale_factor=1 / scale, mode="linear"
    ).transpose(1, 2)
    carried = (
        state.phase if state.phase is not None else rad_values.new_zeros(1, 1, rad_values.shape[2])
    )
    # sequential float64 accumulation, as the official float32 CPU cumsum does internally
    phases = torch.cumsum(
        torch.cat([carried.to(torch.float64), rad_values.to(torch.float64)], dim=1), dim=1
    )
    phase = phases[:, 1:].to(rad_values.dtype) * 2 * math.pi
    phase = F.interpolate(
        phase.transpose(1, 2) * scale, scale_factor=float(scale), mode="nearest"
    ).transpose(1, 2)
    sine_waves = torch.sin(phase) * sine_gen.sine_amp
    uv = (f0 > sine_gen.voiced_threshold).to(f0.dtype)
    noise_amp = uv * sine_gen.noise_std + (1 - uv) * sine_gen.sine_amp / 3
    noise = sine_gen.fixed.sine_waves(end * scale)[:, start * scale :].to(sine_waves)
    sine_waves = sine_waves * uv + noise_amp * noise
    source = torch.tanh(hift.m_source.l_linear(sine_waves)).transpose(1, 2)
    return source, phases


def _trim(state: HiFTStreamState, keep_mel: int, keep_f0: int) -> None:
    """Drops mel frames before `keep_mel` and f0 values before `keep_f0`."""
    if state.mel is not None and keep_mel > state.mel_start:
        state.mel = state.mel[:, :, keep_mel - state.mel_start :].clone()
        state.mel_start = keep_mel
    if state.f0 is not None and keep_f0 > state.f0_start:
        state.f0 = state.f0[:, keep_f0 - state.f0_start :].clone()
        state.f0_start = keep_f0
