"""The persistent voice library: prompt recordings saved by name, with their features.

Layout of the library directory (one sub-directory per voice):

    <root>/<name>/voice.json          name, transcript, duration, sample rate, creation time
    <root>/<name>/prompt.wav          the decoded prompt (float32 WAV: the features are exactly
                                      reproducible from it)
    <root>/<name>/features/<key>.pt   prompt features for one model family (e.g. "v1-22050"):
                                      plain tensors + the normalised transcript, read back with
                                      ``torch.load(weights_only=True)``; recomputed from prompt.wav
                                      when another model family first uses the voice

Every write is atomic: a voice is assembled in ``.tmp-*`` and renamed into place, feature files
are written to a temporary name and ``os.replace``d, and deletion renames the voice away before
removing it. A crash therefore leaves either the old state or the new one, never half a voice;
stray ``.tmp-*``/``.trash-*`` entries are cleaned up when the library opens.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import soundfile as sf
import torch

from ..audio.io import check_prompt_audio, load_audio
from ..errors import InvalidRequestError, UnknownVoiceError
from ..frontend.prompt import PromptFeatures

log = logging.getLogger(__name__)

# Letters and digits of any script, then letters, digits, space, dot, dash or underscore; no
# slashes, no leading dot, no trailing space or dot: a name is always one safe path component.
NAME_PATTERN = re.compile(r"^\w(?:[\w .-]{0,62}[\w-])?$")
MAX_NAME_CHARS = 64
LAYOUT_VERSION = 1

Encode = Callable[[bytes, str], PromptFeatures]


class VoiceExistsError(InvalidRequestError):
    """A voice (saved or preset) already has this name."""


class InvalidVoiceNameError(InvalidRequestError):
    """A voice name that is not one safe path component."""


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid voice name, else raise InvalidRequestError."""
    if not isinstance(name, str) or not name:
        raise InvalidVoiceNameError("a voice needs a name")
    if len(name) > MAX_NAME_CHARS or not NAME_PATTERN.match(name) or ".." in name:
        raise InvalidVoiceNameError(
            f"invalid voice name {name!r}: use 1-{MAX_NAME_CHARS} letters, digits, spaces, '.', "
            "'-' or '_', starting with a letter or digit and not ending with a space or '.'"
        )
    return name


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    prompt_text: str
    duration: float
    sample_rate: int
    created_at: float

    def to_api(self) -> dict:
        return {
            "id": self.name,
            "name": self.name,
            "object": "audio.voice",
            "kind": "saved",
            "prompt_text": self.prompt_text,
            "duration": round(self.duration, 3),
            "sample_rate": self.sample_rate,
            "created_at": int(self.created_at),
        }


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _features_bytes(features: PromptFeatures) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "speech_tokens": features.speech_tokens.detach().cpu().contiguous(),
            "speech_feat": features.speech_feat.detach().cpu().contiguous(),
            "embedding": features.embedding.detach().cpu().contiguous(),
            "prompt_text": features.prompt_text,
        },
        buffer,
    )
    return buffer.getvalue()


def _load_features(path: Path) -> PromptFeatures:
    data = torch.load(path, map_location="cpu", weights_only=True)
    tokens, feat, embedding = data["speech_tokens"], data["speech_feat"], data["embedding"]
    if tokens.dim() != 2 or feat.dim() != 3 or embedding.dim() != 2:
        raise ValueError(f"unexpected tensor shapes in {path}")
    return PromptFeatures(tokens, feat, embedding, str(data.get("prompt_text", "")))


class VoiceLibrary:
    """Saved voices under ``root``; safe to use from several threads."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._features: dict[tuple[str, str], PromptFeatures] = {}
        self._clean_leftovers()

    def _clean_leftovers(self) -> None:
        for entry in self.root.iterdir():
            if entry.name.startswith((".tmp-", ".trash-")):
                log.warning("removing leftover %s from an interrupted write", entry)
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(
                    missing_ok=True
                )

    def _dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    # ------------------------------------------------------------------ reading
    def _read_info(self, path: Path) -> VoiceInfo:
        meta = json.loads((path / "voice.json").read_text(encoding="utf-8"))
        return VoiceInfo(
            meta["name"],
            meta.get("prompt_text", ""),
            float(meta["duration"]),
            int(meta["sample_rate"]),
            float(meta["created_at"]),
        )

    def list(self) -> list[VoiceInfo]:
        voices = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                voices.append(self._read_info(entry))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("skipping unreadable voice %s: %s", entry, exc)
        return voices

    def names(self) -> list[str]:
        return [voice.name for voice in self.list()]

    def exists(self, name: str) -> bool:
        try:
            return (self._dir(name) / "voice.json").is_file()
        except InvalidRequestError:
            return False

    def get(self, name: str) -> VoiceInfo:
        path = self._dir(name)
        try:
            return self._read_info(path)
        except FileNotFoundError:
            raise UnknownVoiceError(f"no saved voice named {name!r}") from None
        except (OSError, ValueError, KeyError) as exc:
            raise UnknownVoiceError(f"saved voice {name!r} is unreadable: {exc}") from None

    def audio_path(self, name: str) -> Path:
        self.get(name)
        return self._dir(name) / "prompt.wav"

    # ------------------------------------------------------------------ writing
    def create(
        self,
        name: str,
        audio: bytes,
        prompt_text: str,
        key: str,
        encode: Encode,
        max_seconds: float | None = None,
    ) -> VoiceInfo:
        """Decode and check ``audio``, compute its features with ``encode``, and store the voice
        atomically. Raises AudioError for bad audio, VoiceExistsError if the name is taken."""
        validate_name(name)
        if self.exists(name):
            raise VoiceExistsError(f"a voice named {name!r} already exists; delete it first")
        wav, rate = load_audio(audio, max_seconds=max_seconds)
        check_prompt_audio(wav, rate, max_seconds=max_seconds or 30.0)
        buffer = io.BytesIO()
        sf.write(buffer, wav.numpy(), rate, format="WAV", subtype="FLOAT")
        stored = buffer.getvalue()
        prompt_text = prompt_text.strip()
        features = encode(stored, prompt_text)  # from the stored bytes: reproducible later
        info = VoiceInfo(name, prompt_text, wav.numel() / rate, rate, time.time())

        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        try:
            (tmp / "features").mkdir(parents=True)
            _write_file(tmp / "prompt.wav", stored)
            _write_file(tmp / "features" / f"{key}.pt", _features_bytes(features))
            meta = {**asdict(info), "layout": LAYOUT_VERSION}
            _write_file(tmp / "voice.json", json.dumps(meta, ensure_ascii=False, indent=1).encode())
            _fsync_dir(tmp / "features")
            _fsync_dir(tmp)
            with self._lock:
                if self.exists(name):
                    raise VoiceExistsError(
                        f"a voice named {name!r} already exists; delete it first"
                    )
                os.rename(tmp, self._dir(name))  # atomic: the voice appears complete or not at all
                self._features[(name, key)] = features
            _fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return info

    def delete(self, name: str) -> None:
        path = self._dir(name)
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        with self._lock:
            if not (path / "voice.json").is_file():
                raise UnknownVoiceError(f"no saved voice named {name!r}")
            os.rename(path, trash)  # atomic: gone at once, even if the removal below is cut short
            for cached in [k for k in self._features if k[0] == name]:
                del self._features[cached]
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ features
    def features(self, name: str, key: str, encode: Encode) -> PromptFeatures:
        """The voice's features for model family ``key``: from memory, from disk, or computed
        once from the stored prompt and saved."""
        with self._lock:
            cached = self._features.get((name, key))
        if cached is not None:
            return cached
        info = self.get(name)
        path = self._dir(name) / "features" / f"{key}.pt"
        features = None
        if path.is_file():
            try:
                features = _load_features(path)
            except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
                log.warning("recomputing damaged features %s: %s", path, exc)
        if features is None:
            features = encode((self._dir(name) / "prompt.wav").read_bytes(), info.prompt_text)
            path.parent.mkdir(exist_ok=True)
            _write_atomic(path, _features_bytes(features))
        with self._lock:
            if self.exists(name):
                self._features[(name, key)] = features
        return features
