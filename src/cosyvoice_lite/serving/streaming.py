"""Audio to bytes, chunk by chunk: encoders for streamed responses and a streaming resampler.

Every encoder has ``feed(samples) -> bytes`` and ``finish() -> bytes``; what they return, joined,
is one valid file (or raw PCM). Streamed WAV carries an "unknown length" header, as players and
other TTS servers expect; mp3, ogg/opus and flac are produced by libsndfile as it encodes.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from ..audio.io import (
    AUDIO_FORMATS,
    MP3_RATES,
    OPUS_RATES,
    check_finite,
    encode_audio,
    mp3_frame_bytes,
    write_frames,
)
from ..audio.resample import output_length, reduced_rates, resample, resample_kernel
from ..errors import AudioError


class StreamTruncated(Exception):
    """A streamed response that cannot finish (timeout, engine error, shutdown). Raised from the
    response body after the headers are out: the serving middleware then aborts the transfer (no
    final chunk), so clients see an incomplete body rather than a short file that looks whole."""


UNKNOWN_SIZE = 0xFFFFFFFF  # RIFF/data size of a WAV whose length is not known yet


def pcm16(samples: np.ndarray) -> bytes:
    """float32 [-1, 1] -> 16-bit little-endian PCM bytes, quantized exactly as libsndfile does
    (x 32768, rounded down, clipped), so streamed and whole files carry the same samples."""
    scaled = np.floor(np.asarray(samples, dtype=np.float32) * np.float32(32768.0))
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


def wav_header(sample_rate: int, data_bytes: int = UNKNOWN_SIZE) -> bytes:
    """A 44-byte PCM16 mono WAV header; the default sizes say "streamed, length unknown"."""
    riff = UNKNOWN_SIZE if data_bytes == UNKNOWN_SIZE else 36 + data_bytes
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


class StreamResampler:
    """The torchaudio-default sinc resampler applied block by block; the joined output equals
    ``resample`` of the whole signal, so chunk seams add no clicks."""

    def __init__(self, orig_freq: int, new_freq: int) -> None:
        self.orig_freq, self.new_freq = orig_freq, new_freq
        self.orig, self.new = reduced_rates(orig_freq, new_freq)
        self.kernel, self.width = resample_kernel(orig_freq, new_freq)
        self.span = 2 * self.width + self.orig  # input samples one output frame looks at
        self.buffer = torch.zeros(self.width)  # the left zero padding of the offline version
        self.seen = 0  # input samples fed
        self.emitted = 0  # output samples returned

    def _frames(self) -> np.ndarray:
        if self.buffer.numel() < self.span:
            return np.zeros(0, np.float32)
        frames = (self.buffer.numel() - self.span) // self.orig + 1
        used = (frames - 1) * self.orig + self.span
        out = F.conv1d(self.buffer[None, None, :used], self.kernel, stride=self.orig)
        self.buffer = self.buffer[frames * self.orig :]
        return out[0].transpose(0, 1).reshape(-1).numpy()

    def feed(self, samples: np.ndarray) -> np.ndarray:
        if self.orig == self.new:
            return samples
        self.seen += len(samples)
        self.buffer = torch.cat([self.buffer, torch.from_numpy(np.asarray(samples, np.float32))])
        out = self._frames()
        self.emitted += len(out)
        return out

    def finish(self) -> np.ndarray:
        if self.orig == self.new:
            return np.zeros(0, np.float32)
        self.buffer = torch.cat([self.buffer, torch.zeros(self.width + self.orig)])
        out = self._frames()
        total = output_length(self.orig, self.new, self.seen)
        return out[: max(total - self.emitted, 0)]


class _Sink(io.RawIOBase):
    """A seekable in-memory file that remembers which bytes were already handed out. libsndfile
    may seek back at close to patch a header; such late patches are dropped (the header then
    keeps its valid "length unknown" values)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0
        self.sent = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b) -> int:
        b = bytes(b)
        end = self.pos + len(b)
        if end > len(self.data):
            self.data.extend(b"\0" * (end - len(self.data)))
        self.data[self.pos : end] = b
        self.pos = end
        return len(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.data)}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), len(self.data) - self.pos))
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def take(self) -> bytes:
        new = bytes(self.data[self.sent :])
        self.sent = len(self.data)
        return new


# MPEG audio layer III: bit rates (kbit/s) by index, MPEG-1 and MPEG-2/2.5; sample rates
def without_info_placeholder(head: bytes) -> bytes:
    """``head`` without its first frame if that frame is LAME's placeholder for the Info tag
    (header, then zeros), which only a seek back at the end fills in: a stream cannot, and
    decoders play the empty frame as silence before the audio."""
    size = mp3_frame_bytes(head)
    if size is not None and len(head) >= size and not any(head[4:size]):
        return head[size:]
    return head


def output_rate(format: str, rate: int) -> int:
    """The rate a format is written at: Opus and MP3 accept only some rates (else 48 kHz, as
    ``encode_audio`` does)."""
    allowed = {"opus": OPUS_RATES, "mp3": MP3_RATES}.get(format)
    return 48000 if allowed is not None and rate not in allowed else rate


class Encoder:
    """Streams audio as raw PCM, WAV, or through libsndfile (flac, mp3, ogg, opus)."""

    def __init__(self, format: str, sample_rate: int, out_rate: int | None = None) -> None:
        if format not in AUDIO_FORMATS:
            raise AudioError(
                f"unknown audio format {format!r}; choose one of {', '.join(AUDIO_FORMATS)}"
            )
        self.format = format
        rate = output_rate(format, out_rate or sample_rate)
        self.sample_rate = rate
        self.resampler = StreamResampler(sample_rate, rate) if rate != sample_rate else None
        self.started = False
        self._head: bytes | None = b"" if format == "mp3" else None  # until its first frame
        self.file: sf.SoundFile | None = None
        self.sink: _Sink | None = None
        if format not in ("wav", "pcm"):
            container, subtype, _ = AUDIO_FORMATS[format]
            self.sink = _Sink()
            # Streamed mp3 is constant-bitrate: its VBR header can only be written at the end, and
            # without it decoders misjudge a VBR stream's length.
            extra = (
                {"compression_level": 0.5, "bitrate_mode": "CONSTANT"} if format == "mp3" else {}
            )
            self.file = sf.SoundFile(self.sink, "w", rate, 1, subtype, format=container, **extra)

    def _encode(self, samples: np.ndarray) -> bytes:
        check_finite(samples)
        if self.file is not None:
            if len(samples):
                write_frames(self.file, np.clip(samples, -1.0, 1.0).astype(np.float32))
            return self._stripped(self.sink.take())
        head = b""
        if not self.started and self.format == "wav":
            head = wav_header(self.sample_rate)
        self.started = True
        return head + pcm16(samples)

    def feed(self, samples: np.ndarray) -> bytes:
        if self.resampler is not None:
            samples = self.resampler.feed(samples)
        return self._encode(samples)

    def _stripped(self, data: bytes, last: bool = False) -> bytes:
        """``data``, less an mp3 stream's empty first frame (``without_info_placeholder``):
        held back until that frame is whole."""
        if self._head is None:
            return data
        head = self._head + data
        size = mp3_frame_bytes(head)
        if not last and (len(head) < 4 or (size is not None and len(head) < size)):
            self._head = head
            return b""
        self._head = None
        return without_info_placeholder(head)

    def finish(self) -> bytes:
        tail = self.resampler.finish() if self.resampler is not None else np.zeros(0, np.float32)
        out = self._encode(tail)
        if self.file is not None:
            self.file.close()
            out += self._stripped(self.sink.take(), last=True)
        return out


class WholeEncoder:
    """Non-streamed responses: collect everything, then write one complete file (exact sizes)."""

    def __init__(self, format: str, sample_rate: int, out_rate: int | None = None) -> None:
        if format not in AUDIO_FORMATS:
            raise AudioError(
                f"unknown audio format {format!r}; choose one of {', '.join(AUDIO_FORMATS)}"
            )
        self.format, self.rate, self.out_rate = format, sample_rate, out_rate or sample_rate
        self.pieces: list[np.ndarray] = []

    def feed(self, samples: np.ndarray) -> bytes:
        self.pieces.append(samples)
        return b""

    def finish(self) -> bytes:
        samples = np.concatenate(self.pieces) if self.pieces else np.zeros(0, np.float32)
        if self.out_rate != self.rate:
            samples = resample(torch.from_numpy(samples), self.rate, self.out_rate).numpy()
        if len(samples) == 0:  # nothing spoken: still a valid (empty) file
            return wav_header(self.out_rate, 0) if self.format == "wav" else b""
        return encode_audio(samples, self.out_rate, self.format)


def sse_event(payload: dict) -> bytes:
    """One server-sent event; the event name repeats the payload's ``type`` (OpenAI style)."""
    return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def sse_delta(audio: bytes) -> bytes:
    return sse_event(
        {"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode("ascii")}
    )


def sse_done(input_tokens: int, output_tokens: int) -> bytes:
    usage = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }
    return sse_event({"type": "speech.audio.done", "usage": usage})


def seconds_to_tokens(seconds: float, token_rate: int) -> int:
    return int(math.ceil(seconds * token_rate))
