"""Golden data for cosyvoice_lite.audio (resampling, kaldi fbank, whisper log-mel, matcha mel,
mel filterbanks, load_wav), produced with the official reference implementations.

Run in the reference environment (never in the project venv):

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \
        /tmp/refenv/bin/python tools/golden/features.py

Writes tests/data/golden/features/*.npz. Inputs are deterministic speech-like signals (a gliding
harmonic source with a syllable envelope plus noise), stored as int16 PCM so that the tests read
exactly the samples the references saw.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import librosa
import numpy as np
import onnxruntime
import soundfile as sf
import torch
import torchaudio
import torchaudio.compliance.kaldi as kaldi
import whisper
from cosyvoice.cli.frontend import CosyVoiceFrontEnd
from cosyvoice.utils.file_utils import load_wav
from matcha.utils import audio as matcha_audio

REPO = Path(__file__).resolve().parents[2]
# GOLDEN_ROOT: where the goldens go (tests/data/golden; tests/data/golden/avx2 from an AVX2 CPU)
OUT_DIR = Path(os.environ.get("GOLDEN_ROOT", REPO / "tests" / "data" / "golden")) / "features"
sys.path.insert(0, str(REPO / "tools"))
from make_onnx_standins import write_standins  # noqa: E402

RESAMPLE_PAIRS = [(48000, 16000), (44100, 16000), (22050, 24000), (24000, 16000), (48000, 22050)]
# name -> (input rate, n_fft, hop, fmax); win_size = n_fft, 80 mels, fmin 0 (the yaml values)
MATCHA_PARAMS = {
    "v1": (22050, 1024, 256, 8000),
    "v2": (24000, 1920, 480, 8000),
    "v3": (24000, 1920, 480, None),
}


def speech_like(sample_rate: int, seconds: float, seed: int, channels: int = 1) -> np.ndarray:
    """Deterministic speech-like int16 signal ``[channels, N]``."""
    rng = np.random.default_rng(seed)
    n = int(round(sample_rate * seconds))
    t = np.arange(n) / sample_rate
    out = []
    for ch in range(channels):
        f0 = 110 + 25 * ch + 30 * np.sin(2 * np.pi * 1.3 * t) + 8 * np.sin(2 * np.pi * 5.1 * t)
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        voiced = np.zeros(n)
        for k in range(1, 60):
            if k * 150 >= sample_rate / 2:
                break
            # Two broad "formants" around 600 Hz and 1800 Hz over a falling spectrum.
            fk = k * 120.0
            gain = (
                np.exp(-(((fk - 600) / 300) ** 2))
                + 0.5 * np.exp(-(((fk - 1800) / 500) ** 2))
                + 0.05
            ) / k**0.5
            voiced += gain * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
        voiced /= np.abs(voiced).max()
        envelope = 0.5 * (1 - np.cos(2 * np.pi * 3.0 * t)) ** 1.5
        noise = rng.standard_normal(n) * (0.01 + 0.03 * (envelope < 0.2))
        signal = 0.5 * envelope * voiced + noise + 0.002  # small DC offset, like real recordings
        signal[: int(0.05 * sample_rate)] *= 0.05  # quiet lead-in
        out.append(signal)
    pcm = np.clip(np.round(np.stack(out) * 32767), -32768, 32767).astype(np.int16)
    return pcm


def as_float(pcm: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0)


def save(name: str, **arrays: np.ndarray) -> None:
    path = OUT_DIR / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    print(f"{path.relative_to(OUT_DIR.parents[3])}: {path.stat().st_size / 1024:.0f} KiB")


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)

    for i, (orig, new) in enumerate(RESAMPLE_PAIRS):
        pcm = speech_like(orig, 0.5, seed=100 + i)
        y = torchaudio.transforms.Resample(orig_freq=orig, new_freq=new)(as_float(pcm))
        save(f"resample_{orig}_{new}", x=pcm, y=y.numpy().astype(np.float32))

    pcm = speech_like(16000, 1.5, seed=1)
    wav = as_float(pcm)
    fbank = kaldi.fbank(wav, num_mel_bins=80, dither=0, sample_frequency=16000)
    logmel = whisper.log_mel_spectrogram(wav, n_mels=128)
    save("features_16k", x=pcm, fbank=fbank.numpy(), whisper_logmel=logmel.numpy())

    for i, (name, (rate, n_fft, hop, fmax)) in enumerate(MATCHA_PARAMS.items()):
        pcm = speech_like(rate, 1.2, seed=10 + i)
        # The official cache is keyed by fmax only; clear it so each set gets its own basis.
        matcha_audio.mel_basis.clear()
        matcha_audio.hann_window.clear()
        mel = matcha_audio.mel_spectrogram(
            as_float(pcm), n_fft, 80, rate, hop, n_fft, 0, fmax, center=False
        )
        basis = librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=80, fmin=0, fmax=fmax)
        save(f"matcha_{name}", x=pcm, mel=mel.numpy(), mel_basis=basis)

    filters_path = Path(whisper.__file__).parent / "assets" / "mel_filters.npz"
    with np.load(filters_path) as f:
        save("whisper_mel_filters", mel_80=f["mel_80"], mel_128=f["mel_128"])

    # Official load_wav on a stereo 44.1 kHz file and a mono 24 kHz file.
    stereo = speech_like(44100, 0.5, seed=20, channels=2)
    buffer = io.BytesIO()
    sf.write(buffer, stereo.T, 44100, format="WAV", subtype="PCM_16")
    stereo_wav = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    mono = speech_like(24000, 0.5, seed=21)
    buffer = io.BytesIO()
    sf.write(buffer, mono.T, 24000, format="WAV", subtype="PCM_16")
    mono_wav = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    save(
        "load_wav",
        stereo_wav=stereo_wav,
        stereo_16k=load_wav(io.BytesIO(stereo_wav.tobytes()), 16000).numpy(),
        stereo_24k=load_wav(io.BytesIO(stereo_wav.tobytes()), 24000).numpy(),
        mono_wav=mono_wav,
        mono_24k=load_wav(io.BytesIO(mono_wav.tobytes()), 24000).numpy(),
        mono_16k=load_wav(io.BytesIO(mono_wav.tobytes()), 16000).numpy(),
    )

    # The official frontend glue (_extract_spk_embedding / _extract_speech_token) run on the
    # ONNX stand-ins, with the official session options, for a 16 kHz prompt file.
    prompt = speech_like(16000, 1.5, seed=30)
    buffer = io.BytesIO()
    sf.write(buffer, prompt.T, 16000, format="WAV", subtype="PCM_16")
    prompt_wav = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    option = onnxruntime.SessionOptions()
    option.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    option.intra_op_num_threads = 1
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for version in (1, 2, 3):
            paths = write_standins(tmp, version)
            frontend = SimpleNamespace(
                device=torch.device("cpu"),
                campplus_session=onnxruntime.InferenceSession(
                    str(paths["campplus"]), sess_options=option, providers=["CPUExecutionProvider"]
                ),
                speech_tokenizer_session=onnxruntime.InferenceSession(
                    str(paths["speech_tokenizer"]),
                    sess_options=option,
                    providers=["CPUExecutionProvider"],
                ),
            )
            tokens, _ = CosyVoiceFrontEnd._extract_speech_token(
                frontend, io.BytesIO(prompt_wav.tobytes())
            )
            results[f"tokens_v{version}"] = tokens.numpy()
        results["embedding"] = CosyVoiceFrontEnd._extract_spk_embedding(
            frontend, io.BytesIO(prompt_wav.tobytes())
        ).numpy()
    save("speech_onnx", prompt_wav=prompt_wav, **results)


if __name__ == "__main__":
    main()
