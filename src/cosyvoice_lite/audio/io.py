"""Reading, checking and writing audio with soundfile (libsndfile): wav, flac, mp3, ogg/vorbis and
ogg/opus, from a path, bytes or a binary file object; or samples already decoded (``Waveform``).

``load_wav`` reproduces the official ``cosyvoice.utils.file_utils.load_wav``: decode to float32,
average the channels, resample with the torchaudio-default sinc resampler only when the rates
differ, and refuse sources below 16 kHz. Every failure raises :class:`AudioError` with a message
that says what is wrong with the audio.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch

from cosyvoice_lite.audio.resample import resample
from cosyvoice_lite.audio.waveform import Waveform
from cosyvoice_lite.errors import AudioError
from cosyvoice_lite.request import MAX_PROMPT_SECONDS

AudioArray = torch.Tensor | np.ndarray


AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Waveform

MIN_SAMPLE_RATE = 16000
"""The official loader refuses to resample sources below 16 kHz (they lack the 4-8 kHz band that
the 16 kHz tokenizer and speaker encoder expect)."""

MAX_SAMPLE_RATE = 192000
"""Highest source rate decoded: resampling work grows with the rate, and no voice recording needs
more (libsndfile itself reads up to 655 kHz)."""

DECODE_BLOCK_SAMPLES = 1 << 20
"""Samples (frames x channels) decoded at a time: bounds the memory one block needs."""

UNKNOWN_FRAMES = 2**63 - 1
"""libsndfile's frame count for a file whose header does not say its length (a streamed FLAC)."""


MIN_PROMPT_SECONDS = 0.5
"""Shortest prompt we accept. Every extractor technically runs on ~0.05 s, but below 0.5 s there
are fewer than 12 speech tokens at 25 Hz and 48 fbank frames for CAM++; such a prompt carries
almost no speaker information and mostly reflects a user error (wrong file, cut recording)."""

SILENCE_PEAK = 10 ** (-60 / 20)
"""A prompt whose level is below -60 dBFS (~1e-3) is treated as silent: the peak, less any DC
offset, of its 4th loudest 25 ms frame (a click or two in silence is not speech)."""
LOUD_FRAMES = 4

MAX_FLOAT_PEAK = 4.0
"""Float samples peaking above this are refused: full scale is 1.0, and such a peak is integer PCM
cast to floats unscaled (``int16.astype(float32)``: ~3e4), which changes the prompt's features
(a wrong voice, no error). A resampler's overshoot or a hot float recording past 0 dBFS (up to
+12 dB) stays accepted."""

MAX_CHANNELS = 8
"""Most channels decoded (7.1 surround): decoding work grows with them, and a voice recording
needs one (a small file of 255 channels at 192 kHz took 16 s of decoding)."""

# Rates libsndfile's Opus encoder accepts; other rates are resampled to 48 kHz before encoding.
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)

# format name -> (libsndfile container, subtype, HTTP media type)
AUDIO_FORMATS: dict[str, tuple[str, str, str]] = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "ogg": ("OGG", "VORBIS", "audio/ogg"),
    "opus": ("OGG", "OPUS", "audio/ogg; codecs=opus"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    # raw 16-bit little-endian samples (X-Sample-Rate says the rate): audio/L16 would declare
    # big-endian ones (RFC 2586); audio/pcm is what OpenAI-compatible servers send
    "pcm": ("RAW", "PCM_16", "audio/pcm"),
}


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _describe(source: AudioSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"audio file {os.fspath(source)!r}"
    return "audio data"


def _open_source(source: AudioSource) -> str | io.BytesIO:
    """A path or an in-memory buffer soundfile can read; raises AudioError for empty sources."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"audio file {os.fspath(source)!r} does not exist or is not a file")
        if path.stat().st_size == 0:
            raise AudioError(f"audio file {os.fspath(source)!r} is empty (0 bytes)")
        return os.fspath(path)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        if isinstance(source, io.TextIOBase):  # reading it would fail decoding the audio as text
            raise AudioError("audio file object must be opened in binary mode")
        # Read everything: upload streams are not always seekable, and prompts are small.
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise AudioError("audio file object must be opened in binary mode")
        data = bytes(data)
    else:
        raise AudioError(f"cannot read audio from a {type(source).__name__}")
    if not data:
        raise AudioError("audio data is empty (0 bytes)")
    return io.BytesIO(data)


def load_audio(source: AudioSource, max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """Decode ``source`` to mono float32 ``[N]`` (channels averaged) and its sample rate.

    ``max_seconds``, if given, is checked against the header before decoding and again while
    decoding block by block (headers of streamed formats may not know or may lie about their
    length), so an oversized upload is refused without decoding it fully. Sources above
    :data:`MAX_SAMPLE_RATE` are refused.
    """
    if isinstance(source, Waveform):
        return _decoded(source, max_seconds)
    what = _describe(source)
    opened = _open_source(source)
    try:
        with sf.SoundFile(opened) as f:
            sample_rate, container, declared = int(f.samplerate), f.format, f.frames
            if sample_rate <= 0:
                raise AudioError(f"{what} has an invalid sample rate {sample_rate}")
            if sample_rate > MAX_SAMPLE_RATE:
                raise AudioError(
                    f"{what} has a sample rate of {sample_rate} Hz; at most "
                    f"{MAX_SAMPLE_RATE} Hz is accepted"
                )
            if f.channels > MAX_CHANNELS:
                raise AudioError(
                    f"{what} has {f.channels} channels; at most {MAX_CHANNELS} are accepted (a "
                    "mono recording is best)"
                )
            if (
                max_seconds is not None
                and 0 < f.frames < UNKNOWN_FRAMES
                and f.frames / sample_rate > max_seconds
            ):
                raise AudioError(
                    f"{what} is too long: {length_text(f.frames, sample_rate, max_seconds)}, at "
                    f"most {max_seconds:g} s is accepted"
                )
            limit = None if max_seconds is None else math.floor(max_seconds * sample_rate)
            block = max(1, DECODE_BLOCK_SAMPLES // max(f.channels, 1))
            pieces: list[torch.Tensor] = []
            frames = 0
            for data in _blocks(f, block):  # [n, C], float scale
                frames += data.shape[0]
                if limit is not None and frames > limit:
                    raise AudioError(
                        f"{what} is too long: more than {max_seconds:g} s, at most "
                        f"{max_seconds:g} s is accepted"
                    )
                # the channel mean per block equals the mean over the whole [C, N] array
                piece = torch.from_numpy(np.ascontiguousarray(data.T)).mean(dim=0)
                _check_level(
                    what, piece, "integer PCM values stored as floats? divide them by 32768"
                )
                pieces.append(piece)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
        raise AudioError(
            f"{what} could not be decoded ({err}); supported formats are wav, flac, mp3, "
            "ogg/vorbis and ogg/opus"
        ) from err
    if frames == 0:
        raise AudioError(f"{what} contains no audio samples")
    _check_whole(what, opened, container, declared, frames, sample_rate)
    waveform = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return waveform, sample_rate


_MP3_KBPS = {
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def mp3_frame_bytes(header: bytes) -> int | None:
    """The length of the layer III frame that ``header`` (its first 4 bytes) starts; None if
    it starts none."""
    if len(header) < 4 or header[0] != 0xFF or (header[1] & 0xE0) != 0xE0:
        return None
    version, layer = (header[1] >> 3) & 3, (header[1] >> 1) & 3
    bitrate, rate, padding = header[2] >> 4, (header[2] >> 2) & 3, (header[2] >> 1) & 1
    if layer != 1 or version == 1 or bitrate in (0, 15) or rate == 3:
        return None
    kbps = _MP3_KBPS[1 if version == 3 else 2][bitrate]
    per_frame = 144 if version == 3 else 72  # bytes per (kbit/s / Hz) of a frame
    return per_frame * kbps * 1000 // _MP3_RATES[version][rate] + padding


# A recording that ends before its header says (a file cut short in a copy) is an error, not a
# shorter recording: a voice saved from it kept a transcript of the whole. The slack covers the
# encoders' delay and padding and a last partial frame.
CUT_TOLERANCE_SECONDS = 0.05
MP3_SLACK_FRAMES = 4  # an mp3's Info frame, encoder delay, decoder delay, end padding
# a WAV data size at or past this is a streaming writer's "unknown" (sox writes 0x7FFFF000)
WAV_UNKNOWN_SIZE = 0x7FFFF000


def _check_whole(
    what: str, opened: str | BinaryIO, container: str, declared: int, frames: int, rate: int
) -> None:
    """An AudioError where fewer ``frames`` were decoded than the file holds: a WAV data
    chunk's size (libsndfile shortens the count it gives to the bytes there), an mp3's frames
    counted one by one (libsndfile's count for an mp3 without a Xing header is a guess from the
    first frame's bit rate, and it decodes no further than that guess), else the header's
    count (FLAC). Ogg states no length: a cut one cannot be told."""
    slack = max(CUT_TOLERANCE_SECONDS * rate, 0.01 * frames)
    if container == "MP3":
        counted = _mp3_samples(opened)
        if counted is None:
            return
        samples, per_frame, tagged = counted
        slack = max(slack, MP3_SLACK_FRAMES * per_frame)
        # a Xing/Info/VBRI header's count is the file's (its frames may be cut off); without
        # one, libsndfile's count is a guess, and the frames there are all there is
        if not (tagged and declared - frames > slack) and samples - frames > slack:
            raise AudioError(
                f"{what} could not be decoded whole: {frames / rate:.2f} s of its "
                f"{samples / rate:.2f} s (a variable-bit-rate mp3 without a length header); "
                "send it as wav or flac, or as an mp3 written with one"
            )
        if not tagged:
            return
    elif container in ("WAV", "WAVEX"):
        declared = _wav_declared_frames(opened) or UNKNOWN_FRAMES
    if declared in (0, UNKNOWN_FRAMES) or declared - frames <= slack:
        return
    raise AudioError(
        f"{what} ends early: its header says {declared / rate:.2f} s, "
        f"{frames / rate:.2f} s are there (a file cut short?)"
    )


def _wav_declared_frames(opened: str | BinaryIO) -> int | None:
    """The frames a RIFF/WAVE file's data chunk says it holds; None where it says nothing
    (0, or ``WAV_UNKNOWN_SIZE`` and above: a streaming writer's "unknown") or the header is not
    plain RIFF."""
    with _reading(opened) as handle:
        if handle.read(4) != b"RIFF" or handle.read(8)[4:] != b"WAVE":
            return None
        block_align = 0
        while len(head := handle.read(8)) == 8:
            size = int.from_bytes(head[4:], "little")
            if head[:4] == b"fmt ":
                block_align = int.from_bytes(handle.read(16)[12:14], "little")
                handle.seek(size - 16 + (size & 1), io.SEEK_CUR)
            elif head[:4] == b"data":
                unknown = size == 0 or size >= WAV_UNKNOWN_SIZE or block_align == 0
                return None if unknown else size // block_align
            else:
                handle.seek(size + (size & 1), io.SEEK_CUR)
        return None


def _mp3_samples(opened: str | BinaryIO) -> tuple[int, int, bool] | None:
    """(samples, samples per frame, whether the first frame is a Xing/Info/VBRI length header)
    of an mp3's layer III frames walked one by one after its ID3v2 tag, up to the first thing
    that is not a frame (an ID3v1 tag, the end); None where none starts there."""
    with _reading(opened) as handle:
        head = handle.read(10)
        if head[:3] == b"ID3" and len(head) == 10:  # its size: 4 bytes of 7 bits
            size = sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
            handle.seek(10 + size + (10 if head[5] & 0x10 else 0))
        else:
            handle.seek(0)
        count, per_frame, tagged = 0, 0, False
        while (size := mp3_frame_bytes(header := handle.read(4))) is not None:
            if count == 0:
                first = handle.read(size - 4)
                tagged = any(mark in first[:40] for mark in (b"Xing", b"Info", b"VBRI"))
            else:
                handle.seek(size - 4, io.SEEK_CUR)
            count += 1
            per_frame = 1152 if (header[1] >> 3) & 3 == 3 else 576  # MPEG-1, else 2 / 2.5
        return (count * per_frame, per_frame, tagged) if count else None


@contextlib.contextmanager
def _reading(opened: str | BinaryIO) -> Iterator[BinaryIO]:
    """``opened`` (a path, or the upload's bytes) from its start, for reading its header."""
    if isinstance(opened, str):
        with open(opened, "rb") as handle:
            yield handle
        return
    opened.seek(0)
    yield opened


def _blocks(f: sf.SoundFile, block: int) -> Iterator[np.ndarray]:
    """``f``'s frames, ``[n, C]`` float32, ``block`` at a time."""
    if f.frames != UNKNOWN_FRAMES:
        while (data := f.read(block, dtype="float32", always_2d=True)).shape[0]:
            yield data
        return
    # soundfile's read() first asks libsndfile where it is (a seek), which a FLAC stream without
    # its length refuses ("psf_fseek() failed"): read through libsndfile's own call instead
    from soundfile import _ffi, _snd

    buffer = np.empty((block, f.channels), np.float32)
    pointer = _ffi.cast("float *", buffer.ctypes.data)
    while (n := _snd.sf_readf_float(f._file, pointer, block)) > 0:
        # asked after every call, as soundfile's read() does (the next call clears it): a
        # damaged or cut stream is an error, not a shorter recording
        if error := _snd.sf_error(f._file):
            raise sf.LibsndfileError(error)
        yield buffer[:n].copy()


# integer PCM samples -> (offset, scale) to floats of full scale 1.0, as libsndfile reads them
_PCM_SCALES = {
    torch.uint8: (128.0, 128.0),
    torch.int8: (0.0, 128.0),
    torch.int16: (0.0, 32768.0),
    torch.int32: (0.0, 2147483648.0),
}


def _decoded(source: Waveform, max_seconds: float | None) -> tuple[torch.Tensor, int]:
    """``load_audio``'s checks for samples decoded elsewhere."""
    rate = source.sample_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise AudioError(f"decoded audio has an invalid sample rate {rate!r}")
    if rate > MAX_SAMPLE_RATE:
        raise AudioError(
            f"decoded audio has a sample rate of {rate} Hz; at most {MAX_SAMPLE_RATE} Hz is accepted"
        )
    samples = source.samples
    if isinstance(samples, np.ndarray) and not samples.flags.writeable:
        samples = samples.copy()  # (np.frombuffer's: torch warns it cannot share them safely)
    try:
        waveform = torch.as_tensor(samples).detach().to("cpu")
    except (TypeError, ValueError, RuntimeError) as err:
        raise AudioError(f"decoded audio samples are not numbers ({err})") from None
    pcm = _PCM_SCALES.get(waveform.dtype)  # integer PCM (scipy's wavfile gives int16)
    if pcm is None and not waveform.is_floating_point():
        raise AudioError(
            f"decoded audio samples must be float (full scale 1.0) or 8/16/32-bit PCM, got "
            f"{waveform.dtype}"
        )
    if waveform.dim() == 2 and 1 in waveform.shape:  # [1, N], or [N, 1] (a sounddevice rec())
        waveform = waveform.reshape(-1)
    if waveform.dim() != 1:
        raise AudioError(
            f"decoded audio must be mono [N], [1, N] or [N, 1], got {tuple(waveform.shape)}"
        )
    if waveform.numel() == 0:
        raise AudioError("decoded audio contains no samples")
    if max_seconds is not None and waveform.numel() > math.floor(max_seconds * rate):
        raise AudioError(
            f"decoded audio is too long: {length_text(waveform.numel(), rate, max_seconds)}, at "
            f"most {max_seconds:g} s is accepted"
        )
    if pcm is not None:  # to full scale, as libsndfile reads a file's (finite, within it)
        offset, scale = pcm
        return ((waveform.to(torch.float32) - offset) / scale).contiguous(), int(rate)
    _check_level("decoded audio", waveform, "integer PCM? pass the int16 array itself")
    return waveform.to(torch.float32).contiguous(), int(rate)


def _check_level(what: str, samples: torch.Tensor, hint: str) -> None:
    """An AudioError for NaN or infinite float samples, or a peak above :data:`MAX_FLOAT_PEAK`:
    one pass over ``samples`` (no copy), before any work on them."""
    low, high = (float(x) for x in torch.aminmax(samples))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise AudioError(f"{what} contains NaN or infinite samples")
    peak = max(-low, high)
    if peak > MAX_FLOAT_PEAK:
        shown = f"{peak:.1f}" if peak < 10 else f"{peak:.0f}" if peak < 1e6 else f"{peak:.3g}"
        why = f" ({hint})" if peak <= 2**31 else ""  # within 32-bit PCM's range
        raise AudioError(
            f"{what} has float samples that peak at {shown}, far outside full scale 1.0{why}"
        )


def to_sample_rate(
    audio: AudioArray, sample_rate: int, target_sr: int, min_sr: int = MIN_SAMPLE_RATE
) -> torch.Tensor:
    """Mono audio (``[N]`` or ``[1, N]``) at ``sample_rate`` -> ``[1, N']`` at ``target_sr``
    (official ``load_wav`` semantics after decoding)."""
    waveform = torch.as_tensor(audio, dtype=torch.float32)
    if waveform.dim() == 1:
        waveform = waveform.unsqueeze(0)
    if waveform.dim() != 2 or waveform.shape[0] != 1:
        raise AudioError(f"expected mono audio [N] or [1, N], got shape {tuple(waveform.shape)}")
    if sample_rate < min_sr:
        raise AudioError(
            f"audio sample rate is {sample_rate} Hz; at least {min_sr} Hz is needed "
            "(record or export it at 16 kHz or more)"
        )
    if sample_rate != target_sr:
        waveform = resample(waveform, sample_rate, target_sr)
    return waveform


def load_wav(source: AudioSource, target_sr: int, min_sr: int = MIN_SAMPLE_RATE) -> torch.Tensor:
    """Decode ``source``, average its channels and resample to ``target_sr`` -> ``[1, N]`` float32.

    Same result as the official ``load_wav(wav, target_sr, min_sr)``; sources below ``min_sr``
    raise :class:`AudioError` (the official code asserts).
    """
    waveform, sample_rate = load_audio(source)
    return to_sample_rate(waveform, sample_rate, target_sr, min_sr)


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _as_tensor(audio: AudioArray) -> torch.Tensor:
    return torch.as_tensor(audio)


def check_not_empty(audio: AudioArray) -> None:
    if _as_tensor(audio).numel() == 0:
        raise AudioError("audio contains no samples")


def check_finite(audio: AudioArray) -> None:
    """Also before any encoding: LAME aborts the process on one NaN (an assertion in C), and
    integer formats would write NaN or inf as full-scale noise or silence."""
    finite = torch.isfinite(_as_tensor(audio))
    if not bool(finite.all()):
        bad = finite.numel() - int(finite.sum())
        raise AudioError(f"audio contains {bad} NaN or infinite samples")


def check_not_silent(
    audio: AudioArray, peak: float = SILENCE_PEAK, sample_rate: int = MIN_SAMPLE_RATE
) -> None:
    """Raise if the level is below ``peak`` (default -60 dBFS): the peak, less the DC offset,
    of the ``LOUD_FRAMES``-th loudest 25 ms frame (all samples for a shorter audio)."""
    waveform = _as_tensor(audio).reshape(-1).float()
    check_not_empty(waveform)
    centred = (waveform - waveform.mean()).abs()  # a microphone's DC offset is no sound
    frame = max(1, sample_rate // 40)
    count = centred.numel() // frame
    if count >= LOUD_FRAMES:
        peaks = centred[: count * frame].reshape(count, frame).amax(dim=1)
        level = float(peaks.topk(LOUD_FRAMES).values[-1])
    else:
        level = float(centred.max())
    if level < peak:
        if level > 0:
            where = f"peak {20 * math.log10(level):.0f} dBFS"
        elif bool((waveform == 0).all()):
            where = "all zeros"
        else:
            where = "constant: a DC offset and no sound"
        raise AudioError(
            f"audio is silent ({where}, threshold {20 * math.log10(peak):.0f} dBFS); "
            "check the recording"
        )


def check_duration(
    audio: AudioArray,
    sample_rate: int,
    min_seconds: float = MIN_PROMPT_SECONDS,
    max_seconds: float = MAX_PROMPT_SECONDS,
) -> None:
    """Raise if the duration of ``audio`` (samples on its last axis) is outside the limits."""
    frames = _as_tensor(audio).shape[-1]
    seconds = frames / sample_rate
    if seconds < min_seconds:
        raise AudioError(
            f"audio is too short: {length_text(frames, sample_rate, min_seconds)}, at least "
            f"{min_seconds:g} s is needed"
        )
    if seconds > max_seconds:
        raise AudioError(
            f"audio is too long: {length_text(frames, sample_rate, max_seconds)}; the speech "
            f"tokenizer accepts at most {max_seconds:g} s, trim the prompt"
        )


def length_text(frames: int, rate: int, limit: float) -> str:
    """An audio's length for a message about ``limit``: in samples too where its seconds,
    rounded, would read as the limit itself ("0.50 s, at least 0.5 s")."""
    seconds = frames / rate
    if float(f"{seconds:.2f}") != limit:
        return f"{seconds:.2f} s"
    return f"{seconds:.4f} s ({frames} samples at {rate} Hz)"


def check_prompt_audio(
    audio: AudioArray,
    sample_rate: int,
    min_seconds: float = MIN_PROMPT_SECONDS,
    max_seconds: float = MAX_PROMPT_SECONDS,
    min_sr: int = MIN_SAMPLE_RATE,
) -> None:
    """All prompt checks: non-empty, finite, sample rate, duration, not silent."""
    check_not_empty(audio)
    check_finite(audio)
    if sample_rate < min_sr:
        raise AudioError(
            f"audio sample rate is {sample_rate} Hz; at least {min_sr} Hz is needed "
            "(record or export it at 16 kHz or more)"
        )
    check_duration(audio, sample_rate, min_seconds, max_seconds)
    check_not_silent(audio, sample_rate=sample_rate)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _frames_for_soundfile(audio: AudioArray) -> np.ndarray:
    """``[N]`` or ``[C, N]`` audio -> float32 numpy ``[N]`` / ``[N, C]`` clipped to [-1, 1]."""
    if isinstance(audio, torch.Tensor):
        array = audio.detach().to(device="cpu", dtype=torch.float32).numpy()
    else:
        array = np.asarray(audio, dtype=np.float32)
    if array.ndim == 2:
        array = array[0] if array.shape[0] == 1 else array.T
    elif array.ndim != 1:
        raise AudioError(f"expected audio [N] or [C, N], got shape {array.shape}")
    if array.size == 0:
        raise AudioError("cannot write audio with no samples")
    check_finite(array)
    # Integer subtypes would otherwise wrap around on overs.
    return np.clip(array, -1.0, 1.0)


def write_wav(
    path_or_buffer: str | os.PathLike | BinaryIO,
    audio: AudioArray,
    sample_rate: int,
    subtype: str = "PCM_16",
) -> None:
    """Write ``audio`` (``[N]``, ``[1, N]`` or ``[C, N]``, float scale) as a WAV file."""
    target = (
        os.fspath(path_or_buffer)
        if isinstance(path_or_buffer, (str, os.PathLike))
        else path_or_buffer
    )
    sf.write(target, _frames_for_soundfile(audio), int(sample_rate), format="WAV", subtype=subtype)


def encode_audio(audio: AudioArray, sample_rate: int, format: str = "wav") -> bytes:
    """Encode ``audio`` to bytes in ``format`` (a key of :data:`AUDIO_FORMATS`).

    ``wav``/``flac`` are 16-bit PCM, ``ogg`` is Ogg Vorbis, ``opus`` is Ogg Opus (resampled to
    48 kHz when the rate is not one Opus supports), ``mp3`` is MPEG layer III, ``pcm`` is raw
    16-bit little-endian samples with no header.
    """
    key = format.lower()
    if key not in AUDIO_FORMATS:
        raise AudioError(
            f"unknown audio format {format!r}; choose one of {', '.join(AUDIO_FORMATS)}"
        )
    container, subtype, _ = AUDIO_FORMATS[key]
    frames = _frames_for_soundfile(audio)
    rate = int(sample_rate)
    allowed = {"opus": OPUS_RATES, "mp3": MP3_RATES}.get(key)
    if allowed is not None and rate not in allowed:
        resampled = resample(torch.from_numpy(np.ascontiguousarray(frames.T)), rate, 48000)
        frames, rate = np.clip(resampled.numpy().T, -1.0, 1.0), 48000
    buffer = io.BytesIO()
    extra = {"endian": "LITTLE"} if container == "RAW" else {}
    channels = 1 if frames.ndim == 1 else frames.shape[1]
    with sf.SoundFile(buffer, "w", rate, channels, subtype, format=container, **extra) as file:
        write_frames(file, frames)
    return buffer.getvalue()


# libsndfile's Vorbis encoder overflows its stack on one write of ~2 M frames (90 s at 22 kHz:
# a segfault that took the whole server down, libsndfile 1.2.2): writers hand it blocks
WRITE_BLOCK_FRAMES = 1 << 16


def write_frames(file: sf.SoundFile, frames: np.ndarray) -> None:
    """``frames`` written to ``file`` in blocks of ``WRITE_BLOCK_FRAMES``."""
    for start in range(0, len(frames), WRITE_BLOCK_FRAMES):
        file.write(frames[start : start + WRITE_BLOCK_FRAMES])


def media_type(format: str) -> str:
    """HTTP media type of an :func:`encode_audio` format."""
    key = format.lower()
    if key not in AUDIO_FORMATS:
        raise AudioError(
            f"unknown audio format {format!r}; choose one of {', '.join(AUDIO_FORMATS)}"
        )
    return AUDIO_FORMATS[key][2]
