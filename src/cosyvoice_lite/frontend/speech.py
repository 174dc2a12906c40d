"""onnxruntime wrappers for the two ONNX models shipped in every CosyVoice model directory:

* ``campplus.onnx`` -- CAM++ speaker encoder: mean-normalised 80-bin kaldi fbank of 16 kHz audio
  ``(1, T, 80)`` -> 192-d x-vector,
* ``speech_tokenizer_v{1,2,3}.onnx`` -- S3 speech tokenizer: 128-bin whisper log-mel ``(1, 128, T)``
  plus its length ``(1,)`` int32 -> speech token ids (50 Hz for v1, 25 Hz for v2/v3).

Like the official frontend, input names are read from the session (the official files name them
``input`` and ``feats``/``feats_length``), sessions use ``ORT_ENABLE_ALL`` with one intra-op
thread, and outputs are flattened, whatever shape the model gives them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cosyvoice_lite.audio.features import kaldi_fbank, log_mel_spectrogram
from cosyvoice_lite.errors import AudioError, ModelDirError
from cosyvoice_lite.onnx_threads import session_options

SPEECH_TOKENIZER_SAMPLE_RATE = 16000
SPEECH_TOKENIZER_MAX_SECONDS = 30.0
CPU_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)


def _session(path: str | os.PathLike, providers: Sequence[str | tuple[str, dict]], what: str):
    """An ``InferenceSession`` with the official options, or ModelDirError with the reason."""
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"{what} model {os.fspath(path)!r} does not exist")
    options = session_options(1)
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return onnxruntime.InferenceSession(
            os.fspath(path), sess_options=options, providers=list(providers)
        )
    except Exception as err:  # onnxruntime raises its own pybind exception types
        raise ModelDirError(
            f"{what} model {os.fspath(path)!r} is not a valid ONNX model ({err}); "
            "the file may be truncated -- download it again"
        ) from err


def _check_inputs(session, path: str | os.PathLike, what: str, expected: int) -> list[str]:
    names = [node.name for node in session.get_inputs()]
    if len(names) != expected:
        raise ModelDirError(
            f"{what} model {os.fspath(path)!r} has {len(names)} inputs ({', '.join(names)}), "
            f"expected {expected}: is it the right file?"
        )
    return names


def _mono_16k(wav: torch.Tensor) -> torch.Tensor:
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2 or wav.shape[0] != 1:
        raise AudioError(f"expected mono 16 kHz audio [1, N], got shape {tuple(wav.shape)}")
    return wav.detach().to(device="cpu", dtype=torch.float32)


class SpeakerEncoder:
    """CAM++ x-vector extractor (``campplus.onnx``), always on the CPU as in the official code."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.session = _session(path, CPU_PROVIDERS, "speaker encoder (campplus)")
        (self.input_name,) = _check_inputs(self.session, path, "speaker encoder (campplus)", 1)

    def embed_features(self, feat: torch.Tensor) -> torch.Tensor:
        """Mean-normalised fbank ``[T, 80]`` (or ``[1, T, 80]``) -> embedding ``[1, 192]`` float32."""
        if feat.dim() == 2:
            feat = feat.unsqueeze(0)
        array = feat.detach().to(device="cpu", dtype=torch.float32).numpy()
        output = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(np.asarray(output, dtype=np.float32).reshape(1, -1).copy())

    def __call__(self, wav16k: torch.Tensor) -> torch.Tensor:
        """16 kHz mono audio ``[1, N]`` -> x-vector ``[1, 192]`` (official ``_extract_spk_embedding``)."""
        feat = kaldi_fbank(_mono_16k(wav16k), num_mel_bins=80, sample_frequency=16000)
        feat = feat - feat.mean(dim=0, keepdim=True)
        return self.embed_features(feat)


class SpeechTokenizer:
    """S3 speech tokenizer (``speech_tokenizer_v*.onnx``).

    ``providers`` is chosen by the caller (the official code uses the CUDA provider when CUDA is
    available, the CPU provider otherwise).
    """

    def __init__(
        self, path: str | os.PathLike, providers: Sequence[str | tuple[str, dict]] = CPU_PROVIDERS
    ) -> None:
        self.path = Path(path)
        self.session = _session(path, providers, "speech tokenizer")
        self.feats_name, self.length_name = _check_inputs(self.session, path, "speech tokenizer", 2)

    def tokenize_features(self, feat: torch.Tensor) -> torch.Tensor:
        """Whisper log-mel ``[1, 128, T]`` -> token ids ``[1, N]`` int32."""
        if feat.dim() == 2:
            feat = feat.unsqueeze(0)
        array = feat.detach().to(device="cpu", dtype=torch.float32).numpy()
        length = np.array([array.shape[2]], dtype=np.int32)
        output = self.session.run(None, {self.feats_name: array, self.length_name: length})[0]
        return torch.from_numpy(np.asarray(output).reshape(1, -1).astype(np.int32))

    def __call__(self, wav16k: torch.Tensor) -> torch.Tensor:
        """16 kHz mono audio ``[1, N]`` -> token ids ``[1, N_tok]`` int32
        (official ``_extract_speech_token``; refuses audio longer than 30 s like the official)."""
        wav = _mono_16k(wav16k)
        seconds = wav.shape[1] / SPEECH_TOKENIZER_SAMPLE_RATE
        if seconds > SPEECH_TOKENIZER_MAX_SECONDS:
            raise AudioError(
                f"audio is too long for the speech tokenizer: {seconds:.1f} s, at most "
                f"{SPEECH_TOKENIZER_MAX_SECONDS:g} s; trim the prompt"
            )
        feat = log_mel_spectrogram(wav, n_mels=128)
        if not bool(torch.isfinite(feat).all()):
            # finite samples, but so far outside [-1, 1] (~1e19) that their power overflows: the
            # tokens of such features are garbage (all zeros), not speech
            peak = float(wav.abs().max())
            raise AudioError(
                f"its samples reach {peak:.3g}, far outside [-1, 1], and give no usable "
                "features; normalise the recording"
            )
        return self.tokenize_features(feat)
