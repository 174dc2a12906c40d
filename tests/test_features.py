"""Parity of cosyvoice_lite.audio.{resample,features} with the official references (torchaudio,
whisper, librosa, Matcha-TTS), through goldens made by tools/golden/features.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _golden import golden_file

from cosyvoice_lite.audio.features import (
    kaldi_fbank,
    log_mel_spectrogram,
    mel_spectrogram,
    slaney_mel_filters,
)
from cosyvoice_lite.audio.resample import resample, resample_kernel
from cosyvoice_lite.errors import AudioError

RESAMPLE_PAIRS = [(48000, 16000), (44100, 16000), (22050, 24000), (24000, 16000), (48000, 22050)]
MATCHA_PARAMS = {  # name -> (rate, n_fft, hop, fmax), as in the official yamls
    "v1": (22050, 1024, 256, 8000),
    "v2": (24000, 1920, 480, 8000),
    "v3": (24000, 1920, 480, None),
}


def golden(name: str) -> dict[str, np.ndarray]:
    # the official fbank of an AVX2 CPU is 2.3e-5 from the AVX-512 one: tests/_golden.py
    with np.load(golden_file(f"features/{name}.npz")) as data:
        return dict(data)


def pcm_to_float(pcm: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0)


def max_err(a: torch.Tensor, b: np.ndarray) -> float:
    return float((a - torch.from_numpy(b)).abs().max())


# --------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("orig", "new"), RESAMPLE_PAIRS)
def test_resample_matches_torchaudio(orig: int, new: int) -> None:
    data = golden(f"resample_{orig}_{new}")
    y = resample(pcm_to_float(data["x"]), orig, new)
    assert y.shape == data["y"].shape
    assert y.dtype == torch.float32
    # Bit-identical in practice (same kernel, same conv1d); allow float32 rounding.
    assert max_err(y, data["y"]) <= 1e-6


def test_resample_equal_rates_is_identity() -> None:
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    assert resample(x, 16000, 16000) is x


@pytest.mark.parametrize(
    ("orig", "new", "length"), [(48000, 16000, 1001), (44100, 16000, 44101), (16000, 22050, 7)]
)
def test_resample_length_is_ceil(orig: int, new: int, length: int) -> None:
    y = resample(torch.zeros(length), orig, new)
    assert y.shape == (math.ceil(new * length / orig),)


def test_resample_batches_rows_independently() -> None:
    x = torch.randn(3, 2, 4410, generator=torch.Generator().manual_seed(1))
    y = resample(x, 44100, 16000)
    assert y.shape == (3, 2, 1600)
    # conv1d may pick another summation order for a batch: equal up to float32 rounding.
    torch.testing.assert_close(y[2, 1], resample(x[2, 1], 44100, 16000), rtol=0, atol=1e-6)


def test_resample_kernel_cache_keys_dtype_and_device() -> None:
    k32, width = resample_kernel(48000, 16000, torch.float32, torch.device("cpu"))
    assert resample_kernel(48000, 16000, torch.float32, torch.device("cpu"))[0] is k32
    k64, width64 = resample_kernel(48000, 16000, torch.float64, torch.device("cpu"))
    assert k64.dtype == torch.float64 and width64 == width
    # The float64 kernel is the float32-rounded official kernel, widened.
    torch.testing.assert_close(k64, k32.double(), rtol=0, atol=0)
    assert k32.shape == (1, 1, 2 * width + 3)  # 48 kHz -> 16 kHz reduces to 3 -> 1


def test_resample_float64_input() -> None:
    x = torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = resample(x, 24000, 16000)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.float(), resample(x.float(), 24000, 16000), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -16000, 16000.5])
def test_resample_rejects_bad_rates(bad: float) -> None:
    with pytest.raises(AudioError, match="sample rates"):
        resample(torch.zeros(10), bad, 16000)


def test_resample_rejects_integer_audio() -> None:
    with pytest.raises(AudioError, match="floating point"):
        resample(torch.zeros(10, dtype=torch.int16), 48000, 16000)


# --------------------------------------------------------------------------------------------
# kaldi fbank
# --------------------------------------------------------------------------------------------


def test_kaldi_fbank_matches_torchaudio() -> None:
    data = golden("features_16k")
    fbank = kaldi_fbank(pcm_to_float(data["x"]), num_mel_bins=80, sample_frequency=16000)
    assert fbank.shape == data["fbank"].shape == (148, 80)
    assert max_err(fbank, data["fbank"]) <= 1e-5


def test_kaldi_fbank_matches_kaldi_native_fbank() -> None:
    knf = pytest.importorskip("kaldi_native_fbank")
    x = pcm_to_float(golden("features_16k")["x"])[0]
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = 80
    online = knf.OnlineFbank(opts)
    online.accept_waveform(16000, x.tolist())
    online.input_finished()
    reference = np.stack([online.get_frame(i) for i in range(online.num_frames_ready)])
    ours = kaldi_fbank(x)
    assert ours.shape == reference.shape
    # An independent implementation (own FFT, mel banks in double): agrees to ~2e-4 in log energy.
    assert max_err(ours, reference) <= 1e-3


def test_kaldi_fbank_accepts_1d_and_rejects_short() -> None:
    x = pcm_to_float(golden("features_16k")["x"])
    torch.testing.assert_close(kaldi_fbank(x[0]), kaldi_fbank(x), rtol=0, atol=0)
    strided = torch.stack([x[0], torch.zeros_like(x[0])], dim=1)[:, 0]  # non-contiguous view
    torch.testing.assert_close(kaldi_fbank(strided), kaldi_fbank(x), rtol=0, atol=0)
    with pytest.raises(AudioError, match="too short"):
        kaldi_fbank(torch.zeros(1, 399))
    with pytest.raises(AudioError, match="mono"):
        kaldi_fbank(torch.zeros(2, 4000))


# --------------------------------------------------------------------------------------------
# whisper log-mel and mel filterbanks
# --------------------------------------------------------------------------------------------


def test_whisper_log_mel_matches_whisper() -> None:
    data = golden("features_16k")
    logmel = log_mel_spectrogram(pcm_to_float(data["x"]), n_mels=128)
    assert logmel.shape == data["whisper_logmel"].shape == (1, 128, 150)
    assert max_err(logmel, data["whisper_logmel"]) <= 1e-5


def test_whisper_log_mel_rejects_tiny_audio() -> None:
    with pytest.raises(AudioError, match="too short"):
        log_mel_spectrogram(torch.zeros(1, 200))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_slaney_filters_equal_whisper_asset(n_mels: int) -> None:
    expected = golden("whisper_mel_filters")[f"mel_{n_mels}"]
    ours = slaney_mel_filters(16000, 400, n_mels)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("name", list(MATCHA_PARAMS))
def test_slaney_filters_equal_librosa(name: str) -> None:
    rate, n_fft, _, fmax = MATCHA_PARAMS[name]
    np.testing.assert_array_equal(
        slaney_mel_filters(rate, n_fft, 80, 0, fmax), golden(f"matcha_{name}")["mel_basis"]
    )


# --------------------------------------------------------------------------------------------
# matcha mel
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MATCHA_PARAMS))
def test_matcha_mel_matches_official(name: str) -> None:
    rate, n_fft, hop, fmax = MATCHA_PARAMS[name]
    data = golden(f"matcha_{name}")
    x = pcm_to_float(data["x"])
    mel = mel_spectrogram(x, n_fft, 80, rate, hop, n_fft, 0, fmax, center=False)
    assert mel.shape == data["mel"].shape
    assert mel.shape[-1] == x.shape[-1] // hop
    assert max_err(mel, data["mel"]) <= 1e-5


def test_matcha_mel_cache_is_keyed_on_all_parameters() -> None:
    # The official cache (keyed by fmax) would reuse the v1 basis (513 bins) for v2 (961 bins).
    for name in ("v1", "v2", "v3", "v1"):
        rate, n_fft, hop, fmax = MATCHA_PARAMS[name]
        data = golden(f"matcha_{name}")
        mel = mel_spectrogram(pcm_to_float(data["x"]), n_fft, 80, rate, hop, n_fft, 0, fmax)
        assert max_err(mel, data["mel"]) <= 1e-5


def test_matcha_mel_float64() -> None:
    rate, n_fft, hop, fmax = MATCHA_PARAMS["v2"]
    data = golden("matcha_v2")
    mel = mel_spectrogram(pcm_to_float(data["x"]).double(), n_fft, 80, rate, hop, n_fft, 0, fmax)
    assert mel.dtype == torch.float64
    assert max_err(mel, data["mel"].astype(np.float64)) <= 1e-4
