"""Prompt-audio features, reimplemented in plain torch/numpy so that no audio library is needed
at run time:

* :func:`kaldi_fbank` -- ``torchaudio.compliance.kaldi.fbank`` (input of the CAM++ speaker encoder),
* :func:`log_mel_spectrogram` -- ``whisper.log_mel_spectrogram`` (input of the speech tokenizer),
* :func:`mel_spectrogram` -- Matcha-TTS ``mel_spectrogram`` (the prompt mel of the flow model),
* :func:`slaney_mel_filters` -- ``librosa.filters.mel`` (Slaney scale, Slaney norm).

Each one follows the reference arithmetic step by step (same dtypes, same operation order), so the
results agree to float32 rounding.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from cosyvoice_lite.errors import AudioError

# --------------------------------------------------------------------------------------------
# librosa-compatible Slaney mel filterbank
# --------------------------------------------------------------------------------------------

_SLANEY_F_SP = 200.0 / 3  # Hz per mel in the linear part
_SLANEY_MIN_LOG_HZ = 1000.0  # start of the log part
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP
_SLANEY_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_slaney_mel(freq: float) -> float:
    mel = freq / _SLANEY_F_SP
    if freq >= _SLANEY_MIN_LOG_HZ:
        mel = _SLANEY_MIN_LOG_MEL + np.log(freq / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP
    return float(mel)


def _slaney_mel_to_hz(mels: np.ndarray) -> np.ndarray:
    freqs = _SLANEY_F_SP * mels
    log_part = mels >= _SLANEY_MIN_LOG_MEL
    freqs[log_part] = _SLANEY_MIN_LOG_HZ * np.exp(
        _SLANEY_LOGSTEP * (mels[log_part] - _SLANEY_MIN_LOG_MEL)
    )
    return freqs


def slaney_mel_filters(
    sr: float, n_fft: int, n_mels: int = 128, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Mel filterbank ``[n_mels, n_fft // 2 + 1]`` (float32), equal to
    ``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)`` with its
    defaults ``htk=False, norm='slaney'``. ``fmax=None`` means ``sr / 2``."""
    if fmax is None:
        fmax = float(sr) / 2
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_points = np.linspace(_hz_to_slaney_mel(fmin), _hz_to_slaney_mel(fmax), n_mels + 2)
    mel_freqs = _slaney_mel_to_hz(mel_points)
    fdiff = np.diff(mel_freqs)
    ramps = np.subtract.outer(mel_freqs, fft_freqs)

    # librosa stores each triangle in float32 before applying the float64 Slaney norm in place;
    # the double rounding is part of its output.
    weights = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_freqs[2 : n_mels + 2] - mel_freqs[:n_mels])
    weights *= enorm[:, np.newaxis]
    return weights


# --------------------------------------------------------------------------------------------
# Kaldi fbank (torchaudio.compliance.kaldi.fbank)
# --------------------------------------------------------------------------------------------

_FLOAT32_EPS = torch.finfo(torch.float32).eps


def _kaldi_mel_scale(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * (1.0 + freq / 700.0).log()


@lru_cache(maxsize=16)
def _kaldi_mel_banks(
    num_bins: int,
    padded_window_size: int,
    sample_frequency: float,
    low_freq: float,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Triangular Kaldi mel banks ``[num_bins, padded_window_size // 2 + 1]`` (last column zero).

    Built in float32 on the CPU with the same operations as torchaudio, then moved.
    """
    nyquist = 0.5 * sample_frequency
    high_freq = nyquist  # kaldi's high_freq=0 means "the Nyquist frequency"
    fft_bin_width = sample_frequency / padded_window_size
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    mel_delta = (mel_high - mel_low) / (num_bins + 1)

    bins = torch.arange(num_bins).unsqueeze(1).to(torch.float32)
    left_mel = mel_low + bins * mel_delta
    center_mel = mel_low + (bins + 1.0) * mel_delta
    right_mel = mel_low + (bins + 2.0) * mel_delta
    mel = _kaldi_mel_scale(
        fft_bin_width * torch.arange(padded_window_size // 2, dtype=torch.float32)
    )
    mel = mel.unsqueeze(0)
    up_slope = (mel - left_mel) / (center_mel - left_mel)
    down_slope = (right_mel - mel) / (right_mel - center_mel)
    banks = torch.max(torch.zeros(1), torch.min(up_slope, down_slope))
    # The Nyquist bin gets no weight (torchaudio pads a zero column).
    banks = F.pad(banks, (0, 1), mode="constant", value=0.0)
    return banks.to(device=device, dtype=dtype)


def _povey_window(window_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.hann_window(window_size, periodic=False, device=device, dtype=dtype).pow(0.85)


def kaldi_fbank(
    waveform: torch.Tensor,
    num_mel_bins: int = 80,
    sample_frequency: float = 16000.0,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    low_freq: float = 20.0,
    preemphasis_coefficient: float = 0.97,
) -> torch.Tensor:
    """Log mel filterbank energies ``[frames, num_mel_bins]`` of a mono waveform (``[1, N]`` or
    ``[N]``, float scale), equal to ``torchaudio.compliance.kaldi.fbank(waveform,
    num_mel_bins=..., dither=0, sample_frequency=...)`` with every other option at its default:
    povey window, DC removal, pre-emphasis, power spectrum, ``snip_edges=True``, FFT size rounded up
    to a power of two, no energy column.
    """
    if waveform.dim() == 2:
        if waveform.shape[0] != 1:
            raise AudioError(f"kaldi_fbank needs mono audio, got {waveform.shape[0]} channels")
        waveform = waveform[0]
    elif waveform.dim() != 1:
        raise AudioError(
            f"kaldi_fbank needs a [N] or [1, N] waveform, got shape {tuple(waveform.shape)}"
        )
    device, dtype = waveform.device, waveform.dtype

    window_shift = int(sample_frequency * frame_shift * 0.001)
    window_size = int(sample_frequency * frame_length * 0.001)
    padded_window_size = 1 if window_size == 0 else 2 ** (window_size - 1).bit_length()
    num_samples = waveform.shape[0]
    if num_samples < window_size:
        raise AudioError(
            f"audio too short for a filterbank: {num_samples} samples, need at least {window_size}"
        )

    # snip_edges=True: only frames that fit entirely inside the signal.
    num_frames = 1 + (num_samples - window_size) // window_shift
    waveform = waveform.contiguous()
    frames = waveform.as_strided((num_frames, window_size), (window_shift, 1))
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = F.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)[:, :-1]
    frames = frames - preemphasis_coefficient * previous
    frames = frames * _povey_window(window_size, device, dtype).unsqueeze(0)
    frames = F.pad(frames, (0, padded_window_size - window_size))

    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = _kaldi_mel_banks(
        num_mel_bins, padded_window_size, float(sample_frequency), float(low_freq), device, dtype
    )
    energies = torch.mm(power, banks.T)
    return torch.max(energies, torch.tensor(_FLOAT32_EPS, device=device, dtype=dtype)).log()


# --------------------------------------------------------------------------------------------
# Whisper log-mel (whisper.log_mel_spectrogram, no padding)
# --------------------------------------------------------------------------------------------

WHISPER_SAMPLE_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP_LENGTH = 160


@lru_cache(maxsize=8)
def _whisper_filters(n_mels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    filters = slaney_mel_filters(WHISPER_SAMPLE_RATE, WHISPER_N_FFT, n_mels)
    return torch.from_numpy(filters).to(device=device, dtype=dtype)


@lru_cache(maxsize=8)
def _hann_window(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Built in float32 on the CPU like the references (torch.hann_window(size).to(device)).
    return torch.hann_window(size).to(device=device, dtype=dtype)


def log_mel_spectrogram(audio: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Whisper log-mel of 16 kHz audio ``[..., N]`` -> ``[..., n_mels, N // 160]``.

    STFT with n_fft 400, hop 160, periodic Hann window, centred with reflect padding; the last
    frame is dropped; power spectrum; Slaney mel filters (equal to whisper's ``mel_filters.npz``
    for the 80 and 128 bins whisper ships);
    ``log10`` clamped at 1e-10, floored at (global max - 8), then ``(x + 4) / 4``.
    """
    if audio.shape[-1] <= WHISPER_N_FFT // 2:
        raise AudioError(
            f"audio too short for the speech tokenizer features: {audio.shape[-1]} samples, "
            f"need more than {WHISPER_N_FFT // 2}"
        )
    window = _hann_window(WHISPER_N_FFT, audio.device, audio.dtype)
    stft = torch.stft(audio, WHISPER_N_FFT, WHISPER_HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel_spec = _whisper_filters(n_mels, audio.device, audio.dtype) @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# --------------------------------------------------------------------------------------------
# Matcha-TTS mel (the flow model's prompt mel)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _matcha_mel_basis(
    sampling_rate: int,
    n_fft: int,
    num_mels: int,
    fmin: float,
    fmax: float | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    # Keyed on every parameter: the official cache is keyed on fmax and device only, so CosyVoice
    # v1 and v2 in one process would share a basis of the wrong shape. That bug is not reproduced.
    basis = slaney_mel_filters(sampling_rate, n_fft, num_mels, fmin, fmax)
    return torch.from_numpy(basis).to(device=device, dtype=dtype)


def mel_spectrogram(
    y: torch.Tensor,
    n_fft: int,
    num_mels: int,
    sampling_rate: int,
    hop_size: int,
    win_size: int,
    fmin: float,
    fmax: float | None,
    center: bool = False,
) -> torch.Tensor:
    """Natural-log mel magnitude spectrogram ``[B, num_mels, frames]`` of ``y`` (``[B, N]``),
    equal to Matcha-TTS ``matcha.utils.audio.mel_spectrogram`` (the CosyVoice ``feat_extractor``).

    The signal is reflect-padded by ``(n_fft - hop_size) // 2`` on both sides, so there are
    ``N // hop_size`` frames; magnitudes are ``sqrt(re^2 + im^2 + 1e-9)``; log clamped at 1e-5.
    """
    pad = int((n_fft - hop_size) / 2)
    if y.shape[-1] <= pad:
        raise AudioError(
            f"audio too short for the prompt mel: {y.shape[-1]} samples, need more than {pad}"
        )
    y = F.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(
        y,
        n_fft,
        hop_length=hop_size,
        win_length=win_size,
        window=_hann_window(win_size, y.device, y.dtype),
        center=center,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    spec = torch.view_as_real(spec)
    spec = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    basis = _matcha_mel_basis(
        int(sampling_rate),
        int(n_fft),
        int(num_mels),
        float(fmin),
        None if fmax is None else float(fmax),
        y.device,
        y.dtype,
    )
    spec = torch.matmul(basis, spec)
    return torch.log(torch.clamp(spec, min=1e-5))
