"""One-off prompts: prompt audio sent with the request (multipart upload, a data URI or base64),
checked cheaply on the event loop, encoded in a worker, and cached by content for a while.

Every mode that clones a prompt works this way without saving a voice first: zero-shot (audio +
transcript), cross-lingual (audio alone), instruct on CosyVoice2/3 (audio + instruction) and voice
conversion (source audio + a prompt or a voice).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import soundfile as sf

from ..audio.io import UNKNOWN_FRAMES, check_prompt_audio, length_text, load_audio
from ..audio.waveform import Waveform
from ..errors import AudioError, InvalidRequestError, UnsupportedModeError
from ..frontend.prompt import PromptFeatures
from ..request import Mode, SynthesisRequest
from .errors import ApiError, field_name
from .guard import check_texts
from .metrics import Metrics
from .synthesis import require_text, supported_modes, voice_key
from .voices import unknown_voice

if TYPE_CHECKING:
    from ..engine import Engine
    from .app import ServerState

AUDIO_HINT = "wav, flac, mp3 or ogg (vorbis/opus)"


class PromptCache:
    """Prompt features of one-off requests by content hash (audio bytes, transcript, model family):
    a bounded LRU whose entries expire ``ttl`` seconds after their last use. Repeating a prompt
    (a client that sends the same reference with every request) then costs nothing."""

    def __init__(self, size: int, ttl: float, metrics: Metrics | None = None) -> None:
        self.size, self.ttl = size, ttl
        self._items: OrderedDict[str, tuple[float, PromptFeatures]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        if metrics is not None:
            metrics.gauge(
                "prompt_cache_entries",
                "One-off prompts whose features are cached.",
                lambda: len(self._items),
            )
            metrics.counter(
                "prompt_cache_hits_total",
                "One-off prompts served from the cache.",
                lambda: self.hits,
            )
            metrics.counter(
                "prompt_cache_misses_total", "One-off prompts encoded.", lambda: self.misses
            )

    @staticmethod
    def key(audio: bytes, prompt_text: str, family: str) -> str:
        digest = hashlib.sha256(audio)
        digest.update(
            b"\0" + prompt_text.encode("utf-8", "surrogatepass") + b"\0" + family.encode()
        )
        return digest.hexdigest()

    def get(self, key: str) -> PromptFeatures | None:
        now = time.monotonic()
        with self._lock:
            item = self._items.get(key)
            if item is None or now - item[0] > self.ttl:
                self._items.pop(key, None)
                return None
            self._items[key] = (now, item[1])
            self._items.move_to_end(key)
            self.hits += 1
            return item[1]

    def put(self, key: str, features: PromptFeatures) -> None:
        if self.size <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self._items[key] = (now, features)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            for stale in [k for k, (used, _) in self._items.items() if now - used > self.ttl]:
                del self._items[stale]

    def features(
        self, engine: Engine, audio: bytes, prompt_text: str, max_seconds: float, field: str
    ) -> PromptFeatures:
        """Cached features, or decode + check + encode (in the calling worker thread)."""
        key = self.key(audio, prompt_text.strip(), voice_key(engine))
        cached = self.get(key)
        if cached is not None:
            return cached
        # decoded once, here, within the server's limit; the engine takes the samples as they are
        features = engine.encode_prompt(decoded(audio, field, max_seconds), prompt_text)
        with self._lock:
            self.misses += 1
        self.put(key, features)
        return features


# ---------------------------------------------------------------------------------- inputs


def decoded(audio: bytes, field: str, max_seconds: float) -> Waveform:
    """An upload decoded and checked as a prompt (also a voice conversion's source), within the
    server's ``max_prompt_seconds`` even where its header did not say its length."""
    try:
        wav, rate = load_audio(audio, max_seconds=max_seconds)
        check_prompt_audio(wav, rate, max_seconds=max_seconds)
    except AudioError as exc:
        raise ApiError(400, f"{field}: {exc}", code="invalid_audio", param=field) from None
    return Waveform(wav, rate)


def check_audio(data: bytes, field: str, limit: int, max_seconds: float | None = None) -> bytes:
    """Cheap checks before queueing: size (413), decodability (415), length from the header (400)."""
    if len(data) > limit:
        raise ApiError(
            413,
            f"{field} is too large: more than {limit} bytes of audio",
            code="upload_too_large",
            param=field,
        )
    if not data:
        raise ApiError(400, f"{field} is empty", code="invalid_audio", param=field)
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - anything libsndfile cannot open
        raise ApiError(
            415,
            f"{field} could not be decoded; send {AUDIO_HINT}",
            code="unsupported_audio_format",
            param=field,
        ) from None
    # a header that does not say the length (a streamed FLAC) is checked as it is decoded
    known = max_seconds is not None and 0 < info.frames < UNKNOWN_FRAMES and info.samplerate > 0
    if known and info.frames / info.samplerate > max_seconds:
        length = length_text(info.frames, info.samplerate, max_seconds)
        raise ApiError(
            400,
            f"{field} is too long: {length}, at most {max_seconds:g} s",
            code="invalid_audio",
            param=field,
        )
    return data


def decode_audio_field(value: str, field: str, limit: int) -> bytes:
    """Audio given as a JSON string: a ``data:audio/...;base64,`` URI or bare base64. URLs are
    refused (the server never fetches anything on a client's behalf)."""
    text = value.strip()
    if text.startswith(("http://", "https://", "file:", "ftp://")):
        raise ApiError(
            400,
            f"{field} must be a data URI (data:audio/wav;base64,...) or base64 "
            "audio; URLs are not fetched",
            code="invalid_audio",
            param=field,
        )
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(
                400,
                f"{field}: a data URI must be base64-encoded (data:audio/wav;base64,...)",
                code="invalid_audio",
                param=field,
            )
    if len(text) > (limit + 2) * 4 // 3 + 4:
        raise ApiError(
            413,
            f"{field} is too large: more than {limit} bytes of audio",
            code="upload_too_large",
            param=field,
        )
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, f"{field} is not valid base64", code="invalid_audio", param=field
        ) from None
    return check_audio(data, field, limit)


# ---------------------------------------------------------------------------------- planning


@dataclass
class Prompted:
    """A planned request whose prompt comes with it (or from a voice, for voice conversion)."""

    request: SynthesisRequest
    saved_voice: str | None
    prompt: Callable[[], PromptFeatures] | None


def plan_prompted(
    state: ServerState,
    cache: PromptCache,
    *,
    text: str,
    prompt: bytes | None,
    prompt_field: str,
    prompt_text: str | None,
    voice: str | None,
    instruct: str | None,
    source: bytes | None,
    speed: float,
    seed: int | None,
    mode: str | None,
    engine_stream: bool,
    fields: Mapping[str, str] | None = None,
) -> Prompted:
    """The mode follows from what was sent: ``source`` -> voice conversion (into the prompt's or
    the voice's timbre); a prompt with an instruction -> instruct (v2/v3); with a transcript ->
    zero-shot; without -> cross-lingual. ``mode`` may force one; the model must support it.
    ``fields``: the route's names for the request's fields, which errors name."""
    engine = state.engine

    instruct = (instruct or "").strip() or None
    prompt_text = (prompt_text or "").strip()
    check_texts(state.settings, text=text, instruct=instruct, prompt_text=prompt_text)
    saved, request_voice = None, None
    if source is not None:
        chosen = Mode.VOICE_CONVERSION
        if prompt is None:
            if not voice:
                raise ApiError(
                    400,
                    "voice conversion needs a target: a prompt recording or a voice",
                    code="missing_field",
                    param=prompt_field,
                )
            if voice in engine.presets:  # no saved voice takes a preset's name
                request_voice = voice
            elif state.library.exists(voice):
                saved = voice
            else:
                raise unknown_voice(voice, engine.voices() + state.library.listed_names())
    else:
        if prompt is None:
            raise ApiError(
                400,
                f"missing {prompt_field} (the prompt recording)",
                code="missing_field",
                param=prompt_field,
            )
        if voice:
            raise ApiError(
                400,
                f"give either a voice or {prompt_field}, not both",
                code="invalid_request",
                param=field_name(fields, "voice"),
            )
        require_text(text, field_name(fields, "text"))
        if instruct:
            if engine.spec.instruct_with_preset:
                raise ApiError(
                    400,
                    "CosyVoice v1 follows instructions only with its preset voices (the -Instruct "
                    "model); a prompt recording takes instructions with CosyVoice2/3",
                    code="unsupported_mode",
                    param=field_name(fields, "instruct"),
                    supported_modes=supported_modes(engine),
                )
            chosen = Mode.INSTRUCT
        else:
            chosen = Mode.ZERO_SHOT if prompt_text else Mode.CROSS_LINGUAL
    if mode is not None and Mode(mode) != chosen:
        forced = Mode(mode)
        cloning = (Mode.ZERO_SHOT, Mode.CROSS_LINGUAL)
        if forced not in cloning or chosen not in cloning:
            raise InvalidRequestError(
                f"mode '{forced.value}' does not fit this request, which reads as '{chosen.value}'"
            )
        if forced == Mode.ZERO_SHOT:
            raise InvalidRequestError(
                "zero-shot cloning needs the transcript of the prompt "
                "(prompt_text); without one use mode cross_lingual"
            )
        chosen = forced
    if chosen not in engine.modes:
        raise UnsupportedModeError(
            f"{engine.model.name} (CosyVoice v{engine.version}, {engine.model.variant}) cannot do "
            f"mode '{chosen.value}'; it supports: {', '.join(supported_modes(engine))}"
        )
    provider = None
    if prompt is not None:
        limit = state.settings.max_prompt_seconds
        text_for_prompt = prompt_text if chosen == Mode.ZERO_SHOT else ""
        if text_for_prompt:  # checked as the text is (its tags; \[sic] is text)
            engine.check_markup(text_for_prompt, "prompt_text")

        def provider() -> PromptFeatures:
            return cache.features(engine, prompt, text_for_prompt, limit, prompt_field)

    request = SynthesisRequest(
        mode=chosen,
        text=text if chosen != Mode.VOICE_CONVERSION else "",
        voice=request_voice,
        instruct=instruct if chosen == Mode.INSTRUCT else None,
        source_audio=source,  # decoded by the engine once admitted, within the server's limit
        max_audio_seconds=state.settings.max_prompt_seconds,
        speed=speed,
        seed=seed,
        stream=engine_stream and speed == 1.0,
    )
    return Prompted(request, saved, provider)
