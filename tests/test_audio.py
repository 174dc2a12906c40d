"""cosyvoice_lite.audio.io: decoding every supported format, official load_wav parity, checks that
raise AudioError, writing and encoding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from cosyvoice_lite.audio.io import (
    AUDIO_FORMATS,
    MAX_PROMPT_SECONDS,
    check_duration,
    check_not_silent,
    check_prompt_audio,
    encode_audio,
    load_audio,
    load_wav,
    media_type,
    to_sample_rate,
    write_wav,
)
from cosyvoice_lite.audio.resample import resample
from cosyvoice_lite.errors import AudioError, InvalidRequestError

GOLDEN = Path(__file__).parent / "data" / "golden" / "features"
RATES = [16000, 22050, 44100, 48000]
# format -> (container, subtype, lossless)
SOUNDFILE_FORMATS = {
    "wav": ("WAV", "PCM_16", True),
    "flac": ("FLAC", "PCM_16", True),
    "ogg": ("OGG", "VORBIS", False),
    "mp3": ("MP3", "MPEG_LAYER_III", False),
}


def tone(sample_rate: int, seconds: float = 0.6, channels: int = 1) -> np.ndarray:
    """``[N, channels]`` float32 test signal, exactly representable in 16-bit PCM."""
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    columns = [
        0.4 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.1 * np.sin(2 * np.pi * 1250 * t)
        for c in range(channels)
    ]
    return (np.round(np.stack(columns, axis=1) * 32767) / 32768).astype(np.float32)


def encoded(data: np.ndarray, sample_rate: int, container: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, data, sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


# --------------------------------------------------------------------------------------------
# official load_wav parity
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def load_wav_golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "load_wav.npz") as data:
        return dict(data)


@pytest.mark.parametrize(
    ("source", "target_sr"),
    [("stereo", 16000), ("stereo", 24000), ("mono", 24000), ("mono", 16000)],
)
def test_load_wav_matches_official(load_wav_golden, source: str, target_sr: int) -> None:
    wav_bytes = load_wav_golden[f"{source}_wav"].tobytes()
    expected = load_wav_golden[f"{source}_{target_sr // 1000}k"]
    ours = load_wav(wav_bytes, target_sr)
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    assert float((ours - torch.from_numpy(expected)).abs().max()) <= 1e-6


def test_load_wav_same_rate_is_not_resampled(tmp_path: Path) -> None:
    data = tone(24000)
    sf.write(tmp_path / "p.wav", data, 24000, subtype="PCM_16")
    np.testing.assert_array_equal(load_wav(tmp_path / "p.wav", 24000)[0].numpy(), data[:, 0])


def test_load_wav_rejects_8k() -> None:
    wav = encoded(tone(8000), 8000, "WAV", "PCM_16")
    with pytest.raises(AudioError, match="8000 Hz.*16000 Hz"):
        load_wav(wav, 16000)
    with pytest.raises(AudioError, match="8000 Hz"):
        to_sample_rate(torch.zeros(8000), 8000, 24000)


# --------------------------------------------------------------------------------------------
# decoding every format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(SOUNDFILE_FORMATS))
@pytest.mark.parametrize("sample_rate", RATES)
@pytest.mark.parametrize("channels", [1, 2])
def test_formats_round_trip(fmt: str, sample_rate: int, channels: int) -> None:
    container, subtype, lossless = SOUNDFILE_FORMATS[fmt]
    data = tone(sample_rate, channels=channels)
    audio, rate = load_audio(encoded(data, sample_rate, container, subtype))
    mono = data.mean(axis=1)
    assert rate == sample_rate
    assert audio.dtype == torch.float32 and audio.dim() == 1
    if lossless:
        assert audio.shape[0] == data.shape[0]
        np.testing.assert_allclose(audio.numpy(), mono, rtol=0, atol=1e-7)
    else:
        # Lossy codecs: length within a frame, waveform clearly the same.
        assert abs(audio.shape[0] - data.shape[0]) <= 2048
        assert correlation(audio.numpy(), mono) > 0.9


@pytest.mark.parametrize("sample_rate", [16000, 24000, 48000])
def test_ogg_opus_round_trip(sample_rate: int) -> None:
    data = tone(sample_rate, channels=2)
    audio, rate = load_audio(encoded(data, sample_rate, "OGG", "OPUS"))
    assert rate == sample_rate
    assert abs(audio.shape[0] - data.shape[0]) <= 2048
    assert correlation(audio.numpy(), data.mean(axis=1)) > 0.9


def test_load_audio_accepts_path_str_and_file_object(tmp_path: Path) -> None:
    data = tone(22050, channels=2)
    path = tmp_path / "prompt.flac"
    sf.write(path, data, 22050, subtype="PCM_16")
    from_path, rate = load_audio(path)
    assert rate == 22050
    torch.testing.assert_close(load_audio(str(path))[0], from_path, rtol=0, atol=0)
    with open(path, "rb") as f:
        torch.testing.assert_close(load_audio(f)[0], from_path, rtol=0, atol=0)
    torch.testing.assert_close(
        load_audio(bytearray(path.read_bytes()))[0], from_path, rtol=0, atol=0
    )


def test_stereo_is_channel_mean_like_official() -> None:
    data = tone(16000, channels=2)
    audio, _ = load_audio(encoded(data, 16000, "WAV", "FLOAT"))
    expected = torch.from_numpy(data.T.copy()).mean(dim=0)
    torch.testing.assert_close(audio, expected, rtol=0, atol=0)


def test_many_channels_are_refused_before_decoding() -> None:
    """Decoding work grows with the channels: a small Vorbis file of 255 channels took 16 s."""
    audio, _ = load_audio(encoded(tone(16000, 0.1, channels=8), 16000, "WAV", "PCM_16"))
    assert audio.shape == (1600,)
    with pytest.raises(AudioError, match="9 channels; at most 8"):
        load_audio(encoded(tone(16000, 0.1, channels=9), 16000, "WAV", "PCM_16"))


def test_load_audio_max_seconds_checks_header() -> None:
    wav = encoded(tone(16000, seconds=2.0), 16000, "WAV", "PCM_16")
    with pytest.raises(AudioError, match="too long"):
        load_audio(wav, max_seconds=1.5)
    assert load_audio(wav, max_seconds=2.0)[0].shape == (32000,)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_garbage_bytes() -> None:
    with pytest.raises(AudioError, match="could not be decoded"):
        load_audio(b"this is not audio at all" * 20)


def test_truncated_header() -> None:
    wav = encoded(tone(16000), 16000, "WAV", "PCM_16")
    with pytest.raises(AudioError):
        load_audio(wav[:20])


def test_empty_bytes_and_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(io.BytesIO(b""))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(empty)


def test_wav_without_samples() -> None:
    wav = encoded(np.zeros((0, 1), dtype=np.float32), 16000, "WAV", "PCM_16")
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(wav)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "nope.wav")


def test_non_finite_samples() -> None:
    data = tone(16000)
    data[100] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        load_audio(encoded(data, 16000, "WAV", "FLOAT"))


def test_text_file_object_is_rejected() -> None:
    with pytest.raises(AudioError, match="binary mode"):
        load_audio(io.StringIO("RIFF"))


def test_silence() -> None:
    with pytest.raises(AudioError, match="all zeros"):
        check_not_silent(torch.zeros(16000))
    with pytest.raises(AudioError, match="constant: a DC offset"):  # not "all zeros"
        check_not_silent(torch.full((16000,), 0.5))
    tone = torch.sin(torch.arange(16000) * 0.1)
    with pytest.raises(AudioError, match="-80 dBFS"):
        check_not_silent(tone * 1e-4)
    check_not_silent(tone * 0.01)
    # a cheap microphone's DC offset, or a click or two, in silence: no sound to clone (both
    # were taken for speech by the absolute peak)
    hiss = torch.randn(16000, generator=torch.Generator().manual_seed(0)) * 1e-5
    with pytest.raises(AudioError, match="silent"):
        check_not_silent(hiss + 0.01)
    clicks = hiss.clone()
    clicks[[4000, 9000]] = 0.5
    with pytest.raises(AudioError, match="silent"):
        check_not_silent(clicks)
    silent_wav = encoded(np.zeros((16000, 1), dtype=np.float32), 16000, "WAV", "PCM_16")
    audio, rate = load_audio(silent_wav)
    with pytest.raises(AudioError, match="silent"):
        check_prompt_audio(audio, rate)


def test_duration_limits() -> None:
    check_duration(torch.zeros(16000 * 30), 16000)
    # a length that rounds to the limit is given in samples too ("30.0 s, at most 30 s")
    with pytest.raises(AudioError, match=r"too long: 30.0001 s \(480001 samples at 16000 Hz\)"):
        check_duration(torch.zeros(16000 * 30 + 1), 16000)
    with pytest.raises(AudioError, match=r"too short: 0.4999 s \(7999 samples"):
        check_duration(torch.zeros(7999), 16000)
    with pytest.raises(AudioError, match="too short: 0.25 s"):
        check_duration(torch.zeros(4000), 16000)
    with pytest.raises(AudioError, match="too long"):
        check_prompt_audio(torch.full((24000 * 31,), 0.1), 24000)
    assert MAX_PROMPT_SECONDS == 30.0
    # the server's check of an upload's header says so too (it had said "30.0 s, at most 30 s")
    from cosyvoice_lite.serving.errors import ApiError
    from cosyvoice_lite.serving.prompts import check_audio

    upload = encoded(np.full((16000 * 30 + 16, 1), 0.1, dtype=np.float32), 16000, "WAV", "PCM_16")
    with pytest.raises(ApiError, match=r"audio is too long: 30.0010 s \(480016 samples"):
        check_audio(upload, "audio", 1 << 24, 30.0)


def test_check_prompt_audio_accepts_real_prompt_and_rejects_8k() -> None:
    audio = torch.from_numpy(tone(24000, seconds=1.0)[:, 0])
    check_prompt_audio(audio, 24000)
    with pytest.raises(AudioError, match="8000 Hz"):
        check_prompt_audio(audio, 8000)


def test_audio_error_is_an_invalid_request() -> None:
    assert issubclass(AudioError, InvalidRequestError)


# --------------------------------------------------------------------------------------------
# writing and encoding
# --------------------------------------------------------------------------------------------


def test_write_wav_path_and_buffer(tmp_path: Path) -> None:
    audio = torch.from_numpy(tone(24000)[:, 0]).unsqueeze(0)  # [1, N] like the engine output
    write_wav(tmp_path / "out.wav", audio, 24000)
    info = sf.info(tmp_path / "out.wav")
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (
        24000,
        1,
        "PCM_16",
        audio.shape[1],
    )
    read, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    np.testing.assert_array_equal(read, audio[0].numpy())
    buffer = io.BytesIO()
    write_wav(buffer, audio, 24000)
    assert buffer.getvalue() == (tmp_path / "out.wav").read_bytes()


def test_write_wav_clips_overs() -> None:
    buffer = io.BytesIO()
    write_wav(buffer, np.array([1.5, -1.5, 0.5], dtype=np.float32), 16000)
    read, _ = sf.read(io.BytesIO(buffer.getvalue()), dtype="int16")
    assert read.tolist() == [32767, -32768, 16384]


@pytest.mark.parametrize("fmt", list(AUDIO_FORMATS))
@pytest.mark.parametrize("sample_rate", [22050, 24000])
def test_encode_audio_round_trip(fmt: str, sample_rate: int) -> None:
    audio = torch.from_numpy(tone(sample_rate)[:, 0])
    data = encode_audio(audio, sample_rate, fmt)
    assert isinstance(data, bytes) and data
    if fmt == "pcm":
        decoded = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768
        np.testing.assert_array_equal(decoded, audio.numpy())
        return
    decoded, rate = load_audio(data)
    if fmt == "opus" and sample_rate == 22050:
        assert rate == 48000  # Opus has no 22.05 kHz mode
        decoded = resample(decoded, 48000, 22050)
    else:
        assert rate == sample_rate
    if fmt in ("wav", "flac"):
        np.testing.assert_array_equal(decoded.numpy(), audio.numpy())
    else:
        assert abs(decoded.shape[0] - audio.shape[0]) <= 2048
        assert correlation(decoded.numpy(), audio.numpy()) > 0.9


def test_encode_audio_unknown_format() -> None:
    with pytest.raises(AudioError, match="unknown audio format"):
        encode_audio(torch.zeros(100), 16000, "aac")
    assert media_type("MP3") == "audio/mpeg"


# --------------------------------------------------------------------------------------------
# bounded work for any input rate (issue 11)
# --------------------------------------------------------------------------------------------

STANDARD_RATES = [16000, 22050, 24000, 32000, 44100, 48000]


def test_every_standard_rate_pair_keeps_the_exact_kernel() -> None:
    """The official polyphase kernel (bit-identical to torchaudio) serves every standard pair;
    only unusual ratios take the direct path."""
    from cosyvoice_lite.audio.resample import MAX_KERNEL_ELEMENTS, kernel_elements, resample_kernel

    for orig in STANDARD_RATES:
        for new in STANDARD_RATES:
            if orig != new:
                assert kernel_elements(orig, new) <= MAX_KERNEL_ELEMENTS
                resample_kernel(orig, new)  # builds
    assert kernel_elements(16001, 16000) > MAX_KERNEL_ELEMENTS
    with pytest.raises(AudioError, match="too large"):
        resample_kernel(16001, 16000)


@pytest.mark.parametrize(
    ("orig", "new"),
    [(48000, 16000), (44100, 16000), (16000, 22050), (32000, 24000), (22050, 24000)],
)
def test_direct_resampling_equals_the_kernel_path(orig: int, new: int) -> None:
    from cosyvoice_lite.audio.resample import resample_direct

    x = torch.from_numpy(tone(orig, 0.5, 2).T.copy())
    exact = resample(x, orig, new)
    direct = resample_direct(x, orig, new)
    assert direct.shape == exact.shape and direct.dtype == torch.float32
    # same weights up to the kernel's float32 rounding
    assert float((direct - exact).abs().max()) < 1e-4


def test_unusual_rate_is_resampled_in_bounded_memory_and_time() -> None:
    """16001 Hz -> 16000 Hz once asked for a 1 GB kernel (and 22051 -> 16000 for 5.6 GB); now a
    30 s prompt at such rates costs a few MB and well under a second each."""
    import subprocess
    import sys

    script = (
        "import resource, time, torch\n"
        "from cosyvoice_lite.audio.io import load_wav\n"
        "import numpy as np, soundfile as sf, io\n"
        "torch.zeros(1)\n"
        "bufs = []\n"
        "for rate in (16001, 22051, 47999):\n"
        "    b = io.BytesIO(); t = np.arange(rate * 30) / rate\n"
        "    sf.write(b, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate,"
        " format='WAV', subtype='FLOAT'); bufs.append((rate, b.getvalue()))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "start = time.monotonic()\n"
        "for rate, data in bufs:\n"
        "    y = load_wav(data, 16000); assert y.shape[1] == 16000 * 30, y.shape\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,"
        " time.monotonic() - start)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    grown_kb, seconds = out.stdout.split()
    assert int(grown_kb) < 150 * 1024, f"peak RSS grew by {int(grown_kb) // 1024} MB"
    assert float(seconds) < 20


def test_load_audio_caps_the_decoded_length_while_decoding() -> None:
    """A streamed WAV header says "length unknown": the cap applies while decoding."""
    from cosyvoice_lite.serving.streaming import pcm16, wav_header

    body = pcm16(np.full(16000 * 40, 0.1, np.float32))
    data = wav_header(16000) + body  # RIFF/data sizes 0xFFFFFFFF
    with pytest.raises(AudioError, match="too long"):
        load_audio(data, max_seconds=30)
    wav, rate = load_audio(wav_header(16000) + body[: 16000 * 2 * 5], max_seconds=30)
    assert rate == 16000 and wav.shape == (16000 * 5,)


def test_a_flac_stream_without_its_length_decodes_within_the_cap() -> None:
    """A streamed FLAC's header does not say its length (libsndfile: 2**63 - 1 frames, and its
    seek fails): it decodes as the whole file does, and the cap applies while decoding."""
    whole = encoded(tone(16000, 3.0), 16000, "FLAC", "PCM_16")
    streamed = bytearray(whole)
    streamed[21] &= 0xF0  # STREAMINFO's 36-bit sample count, zeroed
    streamed[22:26] = bytes(4)
    assert sf.info(io.BytesIO(bytes(streamed))).frames == 2**63 - 1
    wav, rate = load_audio(bytes(streamed), max_seconds=30)
    assert rate == 16000 and torch.equal(wav, load_audio(whole)[0])
    with pytest.raises(AudioError, match="too long: more than 2 s"):
        load_audio(bytes(streamed), max_seconds=2)
    # cut short, it is refused as the same file with its length is (it decoded 40% of it)
    with pytest.raises(AudioError, match="could not be decoded"):
        load_audio(bytes(streamed[: len(streamed) * 2 // 5]))
    # the server's own streamed FLAC (no length in its header either)
    from cosyvoice_lite.serving.streaming import Encoder

    samples = tone(22050, 2.0)[:, 0]
    encoder = Encoder("flac", 22050)
    ours = b"".join(encoder.feed(samples[i : i + 5000]) for i in range(0, samples.size, 5000))
    ours += encoder.finish()
    assert sf.info(io.BytesIO(ours)).frames == 2**63 - 1
    np.testing.assert_allclose(load_audio(ours)[0].numpy(), samples, atol=1 / 32768)


def test_decoded_samples_are_checked_as_a_file_is() -> None:
    """A ``Waveform`` (samples a server or a caller decoded) passes through ``load_audio`` as the
    file it came from would, and meets the same limits."""
    from cosyvoice_lite.audio.waveform import Waveform

    data = tone(24000, 2.0)
    from_file = load_audio(encoded(data, 24000, "WAV", "FLOAT"))
    for samples in (data[:, 0], torch.from_numpy(data[:, 0]), data[:, 0][None], data[:, :1]):
        wav, rate = load_audio(Waveform(samples, 24000))
        assert rate == 24000 and wav.dtype == torch.float32
        assert torch.equal(wav, from_file[0])
    with pytest.raises(AudioError, match="too long: 2.00 s, at most 1.5 s"):
        load_audio(Waveform(data[:, 0], 24000), max_seconds=1.5)
    with pytest.raises(AudioError, match="mono"):
        load_audio(Waveform(data.T.repeat(2, axis=0), 24000))
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(Waveform(np.array([0.1, np.nan], np.float32), 24000))
    with pytest.raises(AudioError, match="no samples"):
        load_audio(Waveform(np.zeros(0, np.float32), 24000))
    for rate in (0, True, 24000.5, 384000):
        with pytest.raises(AudioError, match="sample rate"):
            load_audio(Waveform(data[:, 0], rate))
    with pytest.raises(AudioError, match="not numbers"):
        load_audio(Waveform(["a"], 24000))
    # integer PCM (scipy's wavfile.read gives int16) is scaled as the file's samples are; it
    # was taken as floats 32768 times too loud
    for subtype, dtype in (("PCM_16", np.int16), ("PCM_32", np.int32), ("PCM_U8", np.uint8)):
        pcm = encoded(data, 24000, "WAV", subtype)
        as_ints, _ = sf.read(io.BytesIO(pcm), dtype=dtype if dtype != np.uint8 else "int16")
        if dtype == np.uint8:  # soundfile reads no uint8: the file's bytes after the header
            as_ints = np.frombuffer(pcm[-data.shape[0] :], np.uint8)
        wav, _ = load_audio(Waveform(as_ints[:, 0] if as_ints.ndim == 2 else as_ints, 24000))
        assert torch.allclose(wav, load_audio(pcm)[0], atol=1e-7), subtype
    with pytest.raises(AudioError, match="float .* or 8/16/32-bit PCM"):
        load_audio(Waveform(np.ones(100, np.int64), 24000))


def test_float_samples_at_integer_pcm_scale_are_refused(tmp_path: Path) -> None:
    """Floats are of full scale 1.0: an int16 array cast to floats unscaled (peak ~3e4) had been
    taken, a prompt mel off by up to 10 and a speaker embedding by 0.68 (a wrong voice, no
    error). The same from a float WAV file. A few dB over full scale (a resampler's overshoot,
    a hot float recording) is still taken."""
    from cosyvoice_lite.audio.waveform import Waveform

    data = tone(16000, 1.0)[:, 0]  # peak ~0.5
    unscaled = data * 32767 / np.abs(data).max() * 0.7  # the int16 slip, peak ~23,000
    for samples in (unscaled, unscaled.astype(np.float64), torch.from_numpy(unscaled)):
        with pytest.raises(AudioError, match=r"peak at 22937, far outside full scale 1\.0 .*int16"):
            load_audio(Waveform(samples, 16000))
    path = tmp_path / "unscaled.wav"
    sf.write(path, unscaled, 16000, subtype="FLOAT")
    for source in (path, path.read_bytes()):
        with pytest.raises(AudioError, match=r"peak at 22937, far outside full scale 1\.0 .*32768"):
            load_audio(source)
    with pytest.raises(AudioError, match="full scale"):  # one channel enough, when averaged
        load_audio(encoded(np.stack([unscaled, data], axis=1), 16000, "WAV", "DOUBLE"))
    # over full scale by 1.5x (+3.5 dB) and 4x: taken as they are, as libsndfile reads them
    for gain in (3.0, 8.0):
        hot = data * gain
        wav, _ = load_audio(Waveform(hot, 16000))
        assert torch.equal(wav, torch.from_numpy(hot))
        assert torch.equal(load_audio(encoded(hot, 16000, "WAV", "FLOAT"))[0], wav)
    # integer PCM is scaled, never refused
    as_int16 = (data * 32767).astype(np.int16)
    assert float(load_audio(Waveform(as_int16, 16000))[0].abs().max()) < 1


def test_load_audio_refuses_extreme_sample_rates() -> None:
    data = encoded(tone(8000, 0.1), 384000, "WAV", "PCM_16")
    with pytest.raises(AudioError, match="384000 Hz.*192000"):
        load_audio(data)


def test_block_decoding_keeps_the_channel_mean_exact() -> None:
    from cosyvoice_lite.audio import io as audio_io

    data = tone(44100, 9.0, 3)
    wav, _ = load_audio(encoded(data, 44100, "WAV", "FLOAT"))
    expected = torch.from_numpy(np.ascontiguousarray(data.T)).mean(dim=0)
    assert len(data) > audio_io.DECODE_BLOCK_SAMPLES // 3  # several blocks were decoded
    assert torch.equal(wav, expected)


def test_prompt_encoder_caps_the_decoded_length(v1_dir) -> None:
    """Prompts and voice-conversion sources are decoded at most 30 s deep, whatever the header
    says (a streamed WAV here; a low-bitrate Opus file would be hours of audio)."""
    from test_server_support import tiny_engine

    from cosyvoice_lite.serving.streaming import pcm16, wav_header

    data = wav_header(16000) + pcm16(np.full(16000 * 45, 0.1, np.float32))
    with pytest.raises(AudioError, match="too long"):
        tiny_engine(v1_dir).prompt_encoder.load(data)


def test_long_audio_encodes_to_ogg_without_crashing() -> None:
    """libsndfile's Vorbis encoder overflowed its stack on one write of ~2 M frames (100 s at
    22.05 kHz: a segfault that took a server down with every request in flight); writers hand it
    blocks. In a child process, so that a crash fails this test, not the whole run."""
    import subprocess
    import sys

    code = (
        "import io, sys, numpy as np, soundfile as sf\n"
        "from cosyvoice_lite.audio.io import AUDIO_FORMATS, encode_audio\n"
        "from cosyvoice_lite.serving.streaming import Encoder\n"
        "rate = 22050\n"
        "x = (np.random.default_rng(0).standard_normal(rate * 100) * 0.1).astype(np.float32)\n"
        "whole = encode_audio(x, rate, 'ogg')\n"
        "assert len(sf.read(io.BytesIO(whole))[0]) == len(x)\n"
        "encoder = Encoder('ogg', rate)\n"
        "streamed = encoder.feed(x) + encoder.finish()\n"
        "assert len(sf.read(io.BytesIO(streamed))[0]) == len(x)\n"
        "print('ok', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert done.stdout == "ok\n"


def test_a_recording_cut_short_is_refused() -> None:
    """Half of a WAV or mp3 file (an interrupted copy) had been taken as a shorter recording, and a
    voice saved from it kept a transcript of the whole. A streaming writer's WAV ("unknown"
    length) is still taken."""
    tone = (0.3 * np.sin(np.arange(16000 * 4) / 16000 * 2 * np.pi * 220)).astype(np.float32)
    for container, subtype in (("WAV", "PCM_16"), ("MP3", "MPEG_LAYER_III")):
        whole = encoded(tone[:, None], 16000, container, subtype)
        assert len(load_audio(whole)[0]) >= len(tone) * 0.99
        with pytest.raises(
            AudioError, match=r"ends early: its header says 4.00 s, [12].\d\d s are"
        ):
            load_audio(whole[: len(whole) // 2])
    streamed = bytearray(encoded(tone[:, None], 16000, "WAV", "PCM_16"))
    streamed[4:8] = streamed[40:44] = b"\xff\xff\xff\xff"  # RIFF and data sizes: unknown
    assert (
        len(load_audio(bytes(streamed[: len(streamed) // 2]))[0]) == (len(streamed) // 2 - 44) // 2
    )


def test_whole_files_of_odd_but_valid_layouts_are_taken() -> None:
    """The cut check had refused valid files: a WAV whose data size is sox's "unknown"
    (0x7FFFF000, written to a pipe), and an mp3 without a Xing header behind a large ID3v2 tag
    (libsndfile's length for it is a guess). A variable-bit-rate mp3 without one, which
    libsndfile decodes only as far as its guess, is refused, never taken shorter."""
    from cosyvoice_lite.audio.io import mp3_frame_bytes
    from cosyvoice_lite.serving.streaming import Encoder

    tone = (0.3 * np.sin(np.arange(16000 * 3) / 16000 * 2 * np.pi * 220)).astype(np.float32)
    sox = bytearray(encoded(tone[:, None], 16000, "WAV", "PCM_16"))
    sox[4:8] = sox[40:44] = (0x7FFFF000).to_bytes(4, "little")
    assert len(load_audio(bytes(sox))[0]) == len(tone)

    def without_xing(mp3: bytes) -> bytes:
        return mp3[mp3_frame_bytes(mp3) :]  # its first frame: the Xing/Info one

    cover = b"ID3\x04\x00\x00" + bytes([0, 0, 0x40, 0]) + b"\x00" * (0x40 << 7)  # 8 KB tag
    encoder = Encoder("mp3", 16000)  # constant bit rate, streamed: no Xing header
    cbr = encoder.feed(tone) + encoder.finish()
    assert abs(len(load_audio(cover + cbr)[0]) - len(tone)) < 0.1 * 16000
    noisy = np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.3
    quiet_then_noisy = np.concatenate([np.zeros(16000, np.float32), noisy])
    vbr = without_xing(encoded(quiet_then_noisy[:, None], 16000, "MP3", "MPEG_LAYER_III"))
    try:
        assert abs(len(load_audio(vbr)[0]) - len(quiet_then_noisy)) < 0.15 * 16000
    except AudioError as exc:
        assert "could not be decoded whole" in str(exc)
