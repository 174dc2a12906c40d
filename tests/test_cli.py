"""The command line: normalize prints segments with no weights loaded; say reports progress,
picks the format from the extension, checks the output first, streams into the file; help and
version answer without importing torch; the OpenMP wait policy and the thread count."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import soundfile as sf

from cosyvoice_lite.cli import main


def say(model_dir: Path, text: str, *options: str) -> list[str]:
    """`say` arguments for ``text`` in the tiny v1-SFT's preset voice 中文女."""
    return ["say", text, "--model", str(model_dir), "--voice", "中文女", *options]


def test_normalize_prints_segments_without_weights(capsys) -> None:
    assert main(["normalize", "价格是12.5元，2024年3月1日出发。然后我们再见。"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out and "十二点五" in out[0] and "二零二四年" in "".join(out)


def test_normalize_prints_one_line_per_segment(capsys) -> None:
    """A segment holding line breaks printed as several lines (5 for what say speaks as 1)."""
    assert main(["normalize", "Hi.\n\n\n-- --\nBye."]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "\\n" in out[0], out


def test_normalize_reads_stdin() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cosyvoice_lite.cli", "normalize", "-"],
        input="I have 3 apples.",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "three" in done.stdout
    latin1 = subprocess.run(  # not UTF-8: a clear error, not kaldifst's TypeError
        [sys.executable, "-m", "cosyvoice_lite.cli", "normalize", "-"],
        input="café 3 au lait.".encode("latin-1"),
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:surrogateescape"},
    )
    assert latin1.returncode == 2, latin1.stderr
    assert b"not valid Unicode" in latin1.stderr and b"Traceback" not in latin1.stderr


def test_say_shows_progress_for_long_text(
    v1_variants: dict[str, Path], tmp_path: Path, capsys
) -> None:
    text = "第一句话在这里。" * 12 + "最后一句。"
    out = tmp_path / "long.wav"
    assert main(say(v1_variants["sft"], text, "--seed", "3", "-o", str(out))) == 0
    err = capsys.readouterr().err
    assert "segments" in err and out.stat().st_size > 44


def test_errors_exit_with_status_2(tmp_path: Path, capsys) -> None:
    assert main(["voices", "--model", str(tmp_path)]) == 2
    assert "not a CosyVoice model directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- issue 10 / 9.6

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cosyvoice_lite.cli"]
LONG = "".join(
    f"这是用来测试流式写入的第{i}句话，它会被切分成若干段落，然后一段一段地合成并写进文件。"
    for i in range(1, 7)
)


def test_help_and_version_are_fast_and_import_no_torch() -> None:
    for flag in ("--help", "--version"):
        start = time.perf_counter()
        done = subprocess.run([*CLI, flag], capture_output=True, text=True, timeout=60)
        took = time.perf_counter() - start
        assert done.returncode == 0 and "cosyvoice-lite" in done.stdout
        assert took < 1.5, f"{flag} took {took:.2f} s"  # ~0.1 s; margin for a busy machine
    probe = (
        "import sys; from cosyvoice_lite.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'fastapi', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    serve_help = subprocess.run(
        [*CLI, "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "--threads" in serve_help.stdout and "--voice-alias" in serve_help.stdout


def test_wait_policy_is_passive_unless_the_user_chose_one() -> None:
    probe = (
        "import os; from cosyvoice_lite.cli import main; main(['normalize', 'a']); "
        "import torch; print(os.environ['OMP_WAIT_POLICY'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.stdout.strip().endswith("PASSIVE"), done.stderr
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
    )
    assert done.stdout.strip().endswith("ACTIVE"), done.stderr
    spin = probe.replace("os.environ['OMP_WAIT_POLICY']", "os.environ.get('OMP_WAIT_POLICY')")
    done = subprocess.run(  # a chosen spin count is a choice too
        [sys.executable, "-c", spin],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "GOMP_SPINCOUNT": "10000"},
    )
    assert done.stdout.strip().endswith("None"), done.stderr


@pytest.mark.parametrize(
    ("name", "extra", "container", "subtype"),
    [
        ("out.mp3", [], "MP3", "MPEG_LAYER_III"),
        ("out.flac", [], "FLAC", "PCM_16"),
        ("out.ogg", [], "OGG", "VORBIS"),
        ("out.opus", [], "OGG", "OPUS"),
        ("out.bin", ["--format", "wav"], "WAV", "PCM_16"),
    ],
)
def test_output_format_from_extension(v1_dir, tmp_path, capsys, name, extra, container, subtype):
    out = tmp_path / name
    assert main(say(v1_dir, "你好。", "--seed", "1", "-o", str(out), *extra)) == 0
    info = sf.info(str(out))
    assert (info.format, info.subtype) == (container, subtype) and info.frames > 0
    assert not list(tmp_path.glob(".*partial"))


def test_bad_output_is_an_error_before_loading(v1_dir, tmp_path, capsys):
    for output, words in (
        (str(tmp_path / "no" / "such" / "a.wav"), "does not exist"),
        (str(tmp_path), "is a directory"),
        (str(tmp_path / "a.xyz"), "cannot tell the audio format"),
    ):
        start = time.perf_counter()
        assert main(say(v1_dir, "你好。", "-o", output)) == 2
        err = capsys.readouterr().err
        assert words in err and "loading" not in err, err  # nothing was loaded
        assert time.perf_counter() - start < 1.0
    assert (
        main(
            [
                "say",
                "你好。",
                "--model",
                str(v1_dir),
                "--prompt-wav",
                "/no/such.wav",
                "-o",
                str(tmp_path / "a.wav"),
            ]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err


def test_loading_feedback_and_threads(v1_dir, tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(say(v1_dir, "你好。", "--threads", "1", "-o", str(tmp_path / "a.wav"))) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert "loading " in err and "with 1 thread in" in err
    assert main(say(v1_dir, "你好。", "--threads", "0", "-o", str(tmp_path / "a.wav"))) == 2
    huge = say(v1_dir, "你好。", "--threads", "100000")
    assert main([*huge, "-o", str(tmp_path / "a.wav")]) == 2  # torch crashed on this many
    assert "per core" in capsys.readouterr().err


def test_say_stream_writes_the_file_progressively(v1_dir, tmp_path, capsys):
    out = tmp_path / "stream.wav"
    args = say(v1_dir, LONG, "--seed", "2", "--stream", "-o", str(out))
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(main(args)))
    worker.start()
    sizes = set()
    while worker.is_alive():
        if out.exists():
            sizes.add(out.stat().st_size)
        time.sleep(0.005)
    worker.join()
    assert result == [0]
    final = out.stat().st_size
    growing = sorted(s for s in sizes if 44 < s < final)
    assert len(growing) >= 2, (sizes, final)  # audio was on disk before the synthesis ended
    audio, rate = sf.read(str(out))
    assert rate == 22050 and len(audio) * 2 + 44 == final
    assert "first audio after" in capsys.readouterr().err  # the report is on stderr


def test_play_without_a_sound_device_is_a_clear_error(v1_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError):
        pass
    else:
        pytest.skip("sounddevice is installed here")
    assert main(say(v1_dir, "你好。", "--play", "-o", str(tmp_path / "a.wav"))) == 2
    assert "sounddevice" in capsys.readouterr().err
    assert not (tmp_path / "a.wav").exists()


def test_v1_vocabulary_step_says_what_it_fetches(tmp_path):
    env = {
        **os.environ,
        "COSYVOICE_LITE_CACHE": str(tmp_path),
        "PIP_NO_INDEX": "1",
        "http_proxy": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [*CLI, "voices", "--model", str(ROOT / "tests/data/models/v1-tiny")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2
    assert "whisper's text vocabulary" in done.stderr
    assert "raw.githubusercontent.com/openai/whisper" in done.stderr  # from where
    assert "pip download openai-whisper" in done.stderr  # and the fallback


@pytest.mark.parametrize("flag", [[], ["--exact-float32"]])
def test_exact_float32_is_a_load_option(v1_dir, flag):
    """``--exact-float32`` keeps torch's default float32 kernels (the official's floats); without
    it a CPU packs the float32 linear layers for oneDNN (precision.PackedLinear)."""
    from cosyvoice_lite.cli import build_parser, load_engine
    from cosyvoice_lite.device import resolve_placement
    from cosyvoice_lite.precision import PackedLinear, packs_linear

    if not packs_linear(resolve_placement("cpu")):
        pytest.skip("no oneDNN packing on this build")
    args = build_parser().parse_args(["say", "x", "--model", str(v1_dir), "-o", "a.wav", *flag])
    engine = load_engine(args, quiet=True)
    try:
        packed = any(isinstance(m, PackedLinear) for m in engine.pipeline.flow.modules())
        assert engine.placement.exact_float32 == bool(flag) and packed != bool(flag)
    finally:
        engine.close()


def test_say_writes_through_symlinks_and_fifos(v1_dir, tmp_path, capsys):
    """The whole file is renamed into place, but over the file a symlink points to (the link
    stays), and a FIFO (or a device, /dev/stdout) is written in place, never replaced by a
    regular file."""
    target = tmp_path / "target.wav"
    target.write_bytes(b"old")
    link = tmp_path / "link.wav"
    link.symlink_to(target)
    args = say(v1_dir, "你好。", "--seed", "1")
    assert main([*args, "-o", str(link)]) == 0
    assert link.is_symlink() and sf.info(str(target)).frames > 0
    assert not list(tmp_path.glob(".*.partial"))

    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    assert main([*args, "-o", str(fifo)]) == 0
    reader.join(timeout=60)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert received and received[0][:4] == b"RIFF" and len(received[0]) > 1000


def test_serve_refuses_a_port_out_of_range(capsys):
    """uvicorn bound port 99999 modulo 65536 (34463) while saying 99999."""
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "tests/data/models/v1-tiny", "--port", "99999"])
    assert exit_info.value.code == 2 and "0 to 65535" in capsys.readouterr().err


def test_serve_refuses_bad_load_options_before_starting(capsys):
    """The model loads in the background once the server listens: a bad load option was a
    server that started and answered 503 'failed to load' forever."""
    for option, value, words in (
        ("--audio-workers", "0", "--audio-workers"),
        ("--stream-cache-mb", "-5", "--stream-cache-mb"),
        ("--flow-steps", "0", "flow steps"),
        # not numbers a server can hold to: --timeout inf gave /info a 500 (inf is not JSON),
        # --max-upload-mb inf a raw OverflowError
        ("--timeout", "inf", "--timeout must be a finite number"),
        ("--timeout", "nan", "--timeout must be a finite number"),
        ("--max-upload-mb", "inf", "bad server option"),
        ("--max-json-mb", "inf", "bad server option"),
    ):
        assert main(["serve", "--model", "tests/data/models/v1-tiny", option, value]) == 2
        assert words in capsys.readouterr().err


def test_serve_refuses_backend_and_model_path_errors_before_starting(tmp_path, capsys):
    """These too started a server that reported not-ready forever; an official name not yet
    downloaded is still taken (it downloads in the background)."""
    from cosyvoice_lite.errors import InvalidRequestError
    from cosyvoice_lite.serving.cli import check_model_path, check_replica_load_options

    model = ["--model", "tests/data/models/v2-tiny"]
    for options, words in (
        (["--model", str(tmp_path / "absent")], "neither an existing directory nor a known"),
        (["--backend", "onnxruntime"], "needs --onnx-dir"),
        (["--backend", "onnxruntime", "--onnx-dir", str(tmp_path / "absent")], "manifest"),
        (["--onnx-dir", str(tmp_path)], "only used with --backend onnxruntime"),
        (["--backend", "onnxruntime", "--onnx-dir", str(tmp_path), "--dtype", "bfloat16"],
         "runs float32 graphs on the CPU"),
    ):  # fmt: skip
        assert main(["serve", *model, *options]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, (options, err)
    for name in ("CosyVoice2-0.5B", "FunAudioLLM/CosyVoice2-0.5B", "tests/data/models/v1-tiny"):
        check_model_path(name)
    with pytest.raises(InvalidRequestError, match="needs --onnx-dir"):  # Ray's check too
        check_replica_load_options({"backend": "onnxruntime"})


def test_serve_bounds_each_streams_flow_history_unless_told_not_to():
    """A stream's flow history is bounded by default (a float32 CosyVoice2 stream holds ~225 MB
    per second of audio unbounded); ``none`` lifts the bound."""
    from cosyvoice_lite.cli import build_parser
    from cosyvoice_lite.serving.cli import load_options

    parser = build_parser()
    serve = ["serve", "--model", "tests/data/models/v2-tiny"]
    assert load_options(parser.parse_args(serve))["stream_cache_mb"] == 256
    for value, expected in (("none", None), ("NONE", None), ("0", 0), ("2048", 2048)):
        args = parser.parse_args([*serve, "--stream-cache-mb", value])
        assert load_options(args)["stream_cache_mb"] == expected


def test_say_keeps_existing_files_and_inputs_when_a_request_is_refused(v1_dir, tmp_path):
    """--stream wrote in place from the start, so a request refused before any audio (a typo in
    the voice) deleted the file already at -o; and -o could name the prompt recording itself."""
    keep = tmp_path / "keep.wav"
    keep.write_bytes(b"precious")
    say = ["say", "你好。", "--model", str(v1_dir), "-o", str(keep)]
    for extra in ([], ["--stream"]):
        assert main([*say, "--voice", "no_such_voice", *extra]) == 2
        assert keep.read_bytes() == b"precious"
    prompt = tmp_path / "prompt.wav"
    prompt.write_bytes(Path("tests/data/audio/zh_16k.wav").read_bytes())
    before = prompt.read_bytes()
    clone = ["say", "你好。", "--model", str(v1_dir), "--prompt-wav", str(prompt)]
    assert main([*clone, "--prompt-text", "你好", "-o", str(prompt)]) == 2
    assert prompt.read_bytes() == before


def test_say_reads_stdin_writes_stdout_and_speaks_a_cloned_voice_alone(tmp_path):
    """Text '-' from stdin, audio to '-' (the report on stderr, not inside the audio), a reader
    that goes away is not a traceback, and CosyVoice2's cloned voice of the model needs no mode."""
    model = "tests/data/models/v2-tiny"
    cli = [sys.executable, "-m", "cosyvoice_lite", "say", "-", "--model", model]
    done = subprocess.run(
        [*cli, "--voice", "zero_shot_zh", "-o", "-", "--seed", "1"],
        input="你好。".encode(),
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout[:4] == b"RIFF" and b"wrote" not in done.stdout
    assert b"wrote" in done.stderr
    audio, _ = sf.read(io.BytesIO(done.stdout))
    assert len(audio) > 0
    head = subprocess.run(
        f"echo 你好。 | {' '.join(cli)} --voice 中文女 -o - | head -c 10 > /dev/null",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        timeout=300,
    )
    assert b"Traceback" not in head.stderr, head.stderr.decode()


def test_voice_conversion_as_the_readme_writes_it(tmp_path, capsys):
    """`say "" --source-wav ... --prompt-wav ...`: voice conversion speaks its source, so no text
    is needed (it stopped at "there is no text to speak")."""
    out = tmp_path / "vc.wav"
    argv = ["say", "", "--model", "tests/data/models/v2-tiny", "--source-wav",
            "tests/data/audio/en_22k.wav", "--prompt-wav", "tests/data/audio/zh_16k.wav",
            "--seed", "1", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert len(sf.read(out)[0]) > 0


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--voice", "中文女", "--prompt-wav", "tests/data/audio/zh_16k.wav"], "not both"),
        (["--voice", "中文女", "--prompt-text", "你好"], "give both"),
        (["--voice", "中文女", "--instruct", " "], "--instruct is empty"),
        (["--voice", "中文女", "--format", "mp3"], "make them agree"),
        (["--voice", "中文女", "--speed", "3"], "--speed must be between"),
        (["--voice", "中文女", "--speed", "1.5", "--stream"], "without --stream"),
    ],
)
def test_say_refuses_options_that_contradict_each_other(options, words, tmp_path, capsys):
    """Each was silently dropped: the voice for the prompt, the transcript, an empty
    instruction (cross-lingual then), mp3 bytes written into a .wav."""
    out = str(tmp_path / "a.wav")
    assert main(["say", "你好。", "--model", "tests/data/models/v1-tiny", *options, "-o", out]) == 2
    assert words in capsys.readouterr().err and not Path(out).exists()


def test_say_streams_into_a_pipe_as_audio_is_made():
    """--stream -o - wrote nothing into a pipe until the end (a temporary file, copied at the
    end): a player reading the pipe waited for the whole text."""
    text = "今天天气真好，我们一起去公园散步吧。" * 12
    say = [sys.executable, "-m", "cosyvoice_lite", "say", text, "--model",
           "tests/data/models/v1-tiny", "--voice", "中文女", "--stream", "--seed", "3",
           "-o", "-"]  # fmt: skip
    with subprocess.Popen(say, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        head = proc.stdout.read(4096)
        still_running = proc.poll() is None
        rest = proc.stdout.read()
        proc.wait(timeout=300)
    assert proc.returncode == 0 and head[:4] == b"RIFF"
    assert still_running  # the first audio came out while the rest was being made
    audio, rate = sf.read(io.BytesIO(head + rest))
    # (random weights: the length varies with the sampling; seeded, 10.9 s here, and at least
    # the official minimum of 2 speech tokens per text token, ~6 s, anywhere)
    assert rate == 22050 and len(audio) > 5 * rate


def test_output_names_at_the_file_systems_limit_and_dangling_links(v1_dir, tmp_path, capsys):
    """A name of 250 bytes is written (its temporary file's name would pass the 255-byte limit:
    a short one is used), a longer one and a symlink into a missing directory are clear errors
    (status 2) before anything loads."""
    long_ok = tmp_path / ("b" * 246 + ".wav")
    assert main(say(v1_dir, "你好。", "-o", str(long_ok))) == 0
    assert sf.info(str(long_ok)).frames > 0 and not list(tmp_path.glob(".*.partial"))
    too_long = tmp_path / ("b" * 260 + ".wav")
    assert main(say(v1_dir, "你好。", "-o", str(too_long))) == 2
    dangling = tmp_path / "link.wav"
    dangling.symlink_to(tmp_path / "missing" / "x.wav")
    capsys.readouterr()
    assert main(say(v1_dir, "你好。", "-o", str(dangling))) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "loading" not in err


def _say_process(out: str, *options: str, **popen) -> subprocess.Popen:
    text = "今天天气真好，我们一起去公园散步吧。" * 12
    command = [sys.executable, "-m", "cosyvoice_lite", "say", text, "--model",
               "tests/data/models/v1-tiny", "--voice", "中文女", "--seed", "3", "-o", out,
               *options]  # fmt: skip
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, **popen)


def test_say_stopped_or_refused_by_the_system_leaves_no_file(tmp_path):
    """A full disk (here a file-size limit) ended in a raw libsndfile "System error." traceback;
    SIGTERM (a service manager, `timeout`) left the hidden partial file behind; a closed
    standard output failed after the whole synthesis."""
    import resource
    import signal

    out = tmp_path / "out.wav"

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    with _say_process(str(out), preexec_fn=small_files) as proc:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "File too large" in err and "Traceback" not in err, err
    assert sorted(tmp_path.iterdir()) == []
    with _say_process(str(out), "--stream") as proc:
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline:  # writing has begun
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert sorted(tmp_path.iterdir()) == []
    with _say_process("-", preexec_fn=lambda: os.close(1)) as proc:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "standard output is closed" in err and "loading" not in err


def test_say_keeps_the_permissions_of_a_file_it_replaces(v1_dir, tmp_path):
    """The new file took the default mode: a private recording (0600) became world-readable."""
    out = tmp_path / "private.wav"
    out.write_bytes(b"old")
    out.chmod(0o600)
    assert main(say(v1_dir, "你好。", "-o", str(out))) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and sf.info(str(out)).frames > 0


def test_an_output_directory_that_takes_no_files_is_an_error_before_loading(
    v1_dir, tmp_path, capsys
):
    """os.access lets root "write" where no file can be made (/sys): found after the whole
    synthesis, as a raw libsndfile error."""
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys here")
    assert main(say(v1_dir, "你好。", "-o", "/sys/kernel/x.wav")) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "loading" not in err, err


def test_a_resampled_file_ends_with_its_own_samples(tmp_path):
    """Written to .opus from a 22.05 kHz model (resampled to 48 kHz), the resampler's tail was
    resampled a second time: the last samples lost, 156-376 stretched ones in their place."""
    import numpy as np

    from cosyvoice_lite.audio.resample import output_length
    from cosyvoice_lite.cli import AudioFileWriter

    rate = 22050
    samples = (0.3 * np.sin(2 * np.pi * 220 * np.arange(rate * 2) / rate)).astype(np.float32)
    for size in (4000, 7001):
        path = tmp_path / f"x{size}.opus"
        writer = AudioFileWriter(path, "opus", rate)
        for start in range(0, samples.size, size):
            writer.write(samples[start : start + size])
        writer.close()
        written, written_rate = sf.read(str(path), dtype="float32")
        assert written_rate == 48000 == writer.rate
        assert written.size == output_length(rate, 48000, samples.size), written.size


def test_a_partial_file_left_by_a_killed_run_does_not_block_the_next(v1_dir, tmp_path):
    """A run killed hard (SIGKILL, the OOM killer) leaves .out.wav.partial; the output check
    then refused every later `say -o out.wav` ("File exists")."""
    (tmp_path / ".out.wav.partial").write_bytes(b"left by a killed run")
    assert main(say(v1_dir, "你好。", "-o", str(tmp_path / "out.wav"))) == 0
    assert sf.info(str(tmp_path / "out.wav")).frames > 0


# ---------------------------------------------------------------------------------- review 2

V1 = "tests/data/models/v1-tiny"


@pytest.fixture
def no_server(monkeypatch, tmp_path):
    """`serve` must refuse before it listens: a server that starts fails the test (it would
    serve until stopped) instead of hanging it. Its voice library is the test's own."""
    import uvicorn

    def started(self) -> None:  # noqa: ANN001
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn.Server, "run", started)
    monkeypatch.setenv("COSYVOICE_LITE_VOICES", str(tmp_path / "voices"))
    monkeypatch.delenv("COSYVOICE_LITE_API_KEY", raising=False)


def _usage_error(argv: list[str], capsys) -> str:
    """argparse's refusal of ``argv`` (exit status 2): its message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_an_empty_api_key_is_an_error_not_an_open_server(no_server, monkeypatch, capsys):
    """`--api-key "$KEY"` with KEY empty (DEPLOYMENT.md's own line), or the variable set
    empty, served with no authentication and no warning."""
    from cosyvoice_lite.serving.settings import Settings

    for key in ("", "  "):
        err = _usage_error(["serve", "--model", V1, "--api-key", key], capsys)
        assert "empty API key" in err and "leave the option and variable out" in err
    monkeypatch.setenv("COSYVOICE_LITE_API_KEY", "")
    err = _usage_error(["serve", "--model", V1], capsys)
    assert "empty API key" in err and "COSYVOICE_LITE_API_KEY" in err
    with pytest.raises(ValueError, match="API key is empty"):  # a Python caller's too
        Settings(api_key="")


def test_an_empty_host_is_an_error_not_every_interface(no_server, capsys):
    for host in ("", " "):
        err = _usage_error(["serve", "--model", V1, "--host", host], capsys)
        assert "--host" in err and "every interface" in err


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--model", V1, "--stream-cache-dtype", "float16"], "--stream-cache-dtype applies to"),
        (["--model", "tests/data/models/v2-tiny", "--variant", "sft"], "variant 'sft'"),
        (["--model", "tests/data/models/v2-tiny", "--llm", "llm.rl.pt"], "--llm llm.rl.pt"),
        (["--model", V1, "--llm", "nosuch.pt"], "missing"),
    ],
)
def test_serve_refuses_what_the_model_directory_rules_out_before_listening(
    no_server, options, words, capsys
):
    """Errors the background load found after the server listened: it stayed up, not ready,
    for good."""
    assert main(["serve", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err, err


def test_serve_refuses_an_incomplete_model_directory_before_listening(no_server, tmp_path, capsys):
    model = shutil.copytree(V1, tmp_path / "v1")
    (model / "flow.pt").unlink()
    assert main(["serve", "--model", str(model)]) == 2
    assert "flow.pt: missing" in capsys.readouterr().err


def test_ray_only_options_without_ray_are_an_error(no_server, capsys):
    """`--replicas 4 --replica-gpus 1 --ray-address auto` without --ray: one plain process
    served, the options dropped without a word."""
    for options, flag in (
        (["--replicas", "4", "--replica-gpus", "1", "--ray-address", "auto"], "--replicas"),
        (["--autoscale", "1:4"], "--autoscale"),
        (["--replica-cpus", "2"], "--replica-cpus"),
        (["--ray-address", "auto"], "--ray-address"),
    ):
        assert main(["serve", "--model", V1, *options]) == 2
        assert f"{flag} applies with --ray" in capsys.readouterr().err


def test_s3_options_without_their_bucket_are_an_error(no_server, tmp_path, capsys):
    """`--s3-prefix runs/ --s3-region eu-west-1` without --s3-bucket (a bucket option left out
    by mistake): the server ran, keeping nothing in S3, the options dropped without a word."""
    for options, words in (
        (["--s3-prefix", "runs/"], "--s3-prefix applies with --s3-bucket"),
        (["--spool-dir", str(tmp_path)], "--spool-dir applies with --s3-bucket"),
        (
            ["--s3-endpoint-url", "http://127.0.0.1:9000"],
            "--s3-endpoint-url applies with --s3-bucket or --voices-s3-bucket",
        ),
        (["--s3-region", "eu-west-1"], "--s3-region applies with --s3-bucket or"),
        (
            ["--s3-bucket", "b", "--voices-s3-prefix", "v/"],
            "--voices-s3-prefix applies with --voices-s3-bucket",
        ),
    ):
        assert main(["serve", "--model", V1, *options]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and err.startswith("error: "), err
    # with the bucket they shape: taken (the endpoint and region serve either bucket's client)
    import argparse

    from cosyvoice_lite.serving.cli import add_serve_command, settings_from_args

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    s3 = ["--s3-endpoint-url", "http://127.0.0.1:9000", "--s3-region", "eu-west-1"]
    for options in (
        ["--s3-bucket", "b", "--s3-prefix", "runs/", "--spool-dir", str(tmp_path), *s3],
        ["--voices-s3-bucket", "v", "--voices-s3-prefix", "v/", *s3],
    ):
        settings = settings_from_args(parser.parse_args(["serve", "--model", V1, *options]))
        bucket = settings.s3 or settings.voices_s3
        assert (bucket.endpoint_url, bucket.region) == ("http://127.0.0.1:9000", "eu-west-1")


def test_serve_names_the_options_the_user_typed(no_server, tmp_path, capsys):
    """The settings' checks named their fields: `workers must be at least 1` for --max-batch;
    a file as --outputs-dir or --spool-dir was a bare "[Errno 17] File exists", exit 1."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for options, words in (
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--max-prompt-seconds", "31"], "--max-prompt-seconds must be in (0, 30]"),
        (["--keep-alive", "0"], "--keep-alive must be positive"),
        (["--max-json-mb", "0"], "--max-json-mb must be a positive number"),  # (was the default)
        (["--outputs-keep-days", "2"], "--outputs-keep-days applies with --outputs-dir"),
        (["--outputs-dir", str(a_file)], "--outputs-dir"),
        (["--outputs-dir", str(a_file / "sub")], "is a file, not a directory"),
        (["--s3-bucket", "b", "--spool-dir", str(a_file)], "--spool-dir"),
        (["--voices-dir", str(a_file)], "--voices-dir"),
    ):
        assert main(["serve", "--model", V1, *options]) == 2
        err = capsys.readouterr().err
        assert words in err and "Errno" not in err, (options, err)


def test_flag_names_replace_field_names_but_not_parts_of_paths(
    no_server, tmp_path, capsys, monkeypatch
):
    """A model directory ".../workers/m" was reported as ".../--max-batch/m"; a bad
    $COSYVOICE_LITE_HUB_TIMEOUT was found only in the background load, the server up and failed."""
    from cosyvoice_lite.serving.cli import as_flags

    assert as_flags("workers must be at least 1") == "--max-batch must be at least 1"
    assert as_flags("/srv/workers/m and max_queue/x") == "/srv/workers/m and max_queue/x"
    incomplete = tmp_path / "workers" / "m"
    incomplete.mkdir(parents=True)
    assert main(["serve", "--model", str(incomplete)]) == 2
    assert str(incomplete) in capsys.readouterr().err
    monkeypatch.setenv("COSYVOICE_LITE_HUB_TIMEOUT", "60s")
    assert main(["serve", "--model", V1]) == 2
    assert "COSYVOICE_LITE_HUB_TIMEOUT" in capsys.readouterr().err


def test_serve_option_errors_come_before_heavy_imports():
    """A usage error took 2-3 s: uvicorn and torch were imported first."""
    probe = (
        "import sys; from cosyvoice_lite.cli import main; "
        f"code = main(['serve', '--model', '{V1}', '--max-text-chars', '0']); "
        "print(code, sorted(m for m in ('torch', 'uvicorn') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    assert "--max-text-chars must be at least 1" in done.stderr


def test_empty_values_are_errors_not_defaults(tmp_path, capsys):
    """`--device ""` and `--dtype ""` meant the defaults, `--model ""` and `check ""` the
    current directory."""
    base = ["say", "你好。", "--voice", "中文女", "-o", str(tmp_path / "a.wav")]
    for argv, option in (
        ([*base, "--model", V1, "--device", ""], "--device"),
        ([*base, "--model", V1, "--dtype", " "], "--dtype"),
        ([*base, "--model", ""], "--model"),
        (["voices", "--model", ""], "--model"),
        (["check", ""], "model"),
        (["serve", "--model", V1, "--voices-dir", ""], "--voices-dir"),
    ):
        err = _usage_error(argv, capsys)
        assert f"argument {option}: an empty" in err, err


def test_say_checks_the_request_before_loading(v1_dir, tmp_path, capsys):
    """--seed -1, a --prompt-wav that is no audio, empty, too long or a directory, and text
    that is not Unicode were found after the model had loaded (or downloaded)."""
    import numpy as np

    err = _usage_error(say(v1_dir, "你好。", "--seed", "-1", "-o", str(tmp_path / "a.wav")), capsys)
    assert "--seed" in err and "2**64 - 1" in err
    not_audio = tmp_path / "notaudio.wav"
    not_audio.write_text("not audio")
    empty = tmp_path / "empty.wav"
    empty.touch()
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(16000 * 31, dtype=np.float32), 16000)
    short = tmp_path / "short.flac"
    sf.write(short, np.zeros(1600, dtype=np.float32), 16000)
    clone = ["say", "你好。", "--model", str(v1_dir), "-o", str(tmp_path / "a.wav")]
    for options, words in (
        (["--prompt-wav", str(not_audio)], "is not audio that can be decoded"),
        (["--prompt-wav", str(empty)], "is empty"),
        (["--prompt-wav", str(long)], "at most 30 s"),
        (["--prompt-wav", str(short)], "at least 0.5 s"),
        (["--prompt-wav", str(tmp_path)], "is a directory"),
        (["--voice", "中文女", "--source-wav", str(not_audio)], "--source-wav"),
    ):
        start = time.perf_counter()
        assert main([*clone, *options]) == 2
        err = capsys.readouterr().err
        assert words in err and "loading" not in err, (options, err)
        assert time.perf_counter() - start < 2.0
    assert main(say(v1_dir, "\udcff你好", "-o", str(tmp_path / "a.wav"))) == 2
    err = capsys.readouterr().err
    assert "not valid Unicode" in err and "loading" not in err
    done = subprocess.run(  # standard input that is not UTF-8: no traceback
        [*CLI, *say(v1_dir, "-", "-o", str(tmp_path / "a.wav"))],
        input="café".encode("latin-1"),
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 2 and b"not valid" in done.stderr, done.stderr
    assert b"Traceback" not in done.stderr and b"loading" not in done.stderr


def test_non_utf8_file_names(v1_dir, tmp_path, capsys):
    """-o with a non-UTF-8 name was a traceback (str.encode), a model directory so named was
    reported with a "corrupt or truncated" llm.pt (torch encodes paths as UTF-8), and a prompt
    so named "could not be decoded" once the model had loaded."""
    out = tmp_path / os.fsdecode(b"o\xff.wav")
    for extra in ([], ["--stream"]):
        assert main(say(v1_dir, "你好。", "--seed", "1", "-o", str(out), *extra)) == 0
        assert sf.info(os.fsencode(out)).frames > 0
    model = shutil.copytree(v1_dir, tmp_path / os.fsdecode(b"model\xff"))
    assert main(["voices", "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert "model\\xff is not valid UTF-8" in err and "rename it" in err and "corrupt" not in err
    prompt = tmp_path / os.fsdecode(b"p\xff.wav")
    shutil.copy("tests/data/audio/zh_16k.wav", prompt)
    argv = ["say", "你好。", "--model", str(v1_dir), "--prompt-wav", str(prompt), "-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and "loading" not in err


def _without_file_access() -> list[str]:
    """A command prefix under which file modes apply (root bypasses them), or a skip."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: file modes do not apply")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def test_unreadable_model_directories_and_prompts_are_named_as_such(v1_dir, tmp_path):
    """An unreadable model directory was exit 1 with a raw "[Errno 13]" (say, voices, check),
    an unreadable prompt "could not be decoded" after the model had loaded."""
    prefix = _without_file_access()
    model = shutil.copytree(v1_dir, tmp_path / "v1")
    prompt = tmp_path / "prompt.wav"
    shutil.copy("tests/data/audio/zh_16k.wav", prompt)
    prompt.chmod(0)
    try:
        done = subprocess.run(
            [*prefix, *CLI, "say", "你好。", "--model", str(v1_dir), "--prompt-wav", str(prompt),
             "-o", str(tmp_path / "a.wav")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2 and "Permission denied" in done.stderr, done.stderr
        assert "loading" not in done.stderr
        model.chmod(0)
        for argv in (["check", str(model)], ["voices", "--model", str(model)]):
            done = subprocess.run(
                [*prefix, *CLI, *argv], capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 2, done.stderr
            assert "cannot read model directory" in done.stderr and "Errno" not in done.stderr
    finally:
        model.chmod(0o755)


# ---------------------------------------------------------------------------------- review 3


def _without(module: str, argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``main(argv)`` in a process where importing ``module`` fails, as where its extra is not
    installed; it prints the exit status and which of torch and uvicorn it imported."""
    probe = (
        f"import sys; sys.modules[{module!r}] = None; from cosyvoice_lite.cli import main; "
        f"code = main({argv!r}); "
        "print(code, sorted(m for m in ('torch', 'uvicorn') if m in sys.modules))"
    )
    env = {**os.environ, "COSYVOICE_LITE_VOICES": str(tmp_path / "voices")}
    env.pop("COSYVOICE_LITE_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env
    )


def _extra(name: str) -> list[str]:
    """pyproject.toml's optional dependencies ``name``."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"][name]


@pytest.mark.parametrize("option", ["--s3-bucket", "--voices-s3-bucket"])
def test_an_s3_option_without_boto3_is_one_error_line(tmp_path, option):
    """Without boto3 the app's S3 client failed in create_app: two chained tracebacks, exit
    status 1, after torch loaded. Now one line naming the option and what to install (a
    package pip takes anywhere, not `-e '.[s3]'`, which works in a checkout only)."""
    for ray in ([], ["--ray"]):  # (the replicas need boto3 as much)
        argv = ["serve", "--model", V1, *ray, option, "b"]
        done = _without("boto3", argv, tmp_path)
        assert done.stdout.strip() == "2 []", done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {option} needs boto3"), lines
        assert lines[0].endswith("pip install 'boto3>=1.34'"), lines
    assert "boto3>=1.34" in _extra("s3")


def test_the_missing_extra_hints_name_packages_pip_installs_anywhere(tmp_path):
    """--ray's and export's hints said `pip install -e '.[ray]'` (or '.[export]'): outside a
    checkout, pip's error. They name the packages of pyproject's extras, as the S3 one does."""
    for module, argv, requirement, extra in (
        ("ray", ["serve", "--model", V1, "--ray"], "ray[serve]>=2.60", "ray"),
        (
            "onnx",
            ["export", "onnx", "--model", V1, "-o", str(tmp_path / "o")],
            "onnx>=1.16",
            "export",
        ),
    ):
        done = _without(module, argv, tmp_path)
        assert done.stdout.strip().startswith("2 "), done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert lines[0].endswith(f"pip install '{requirement}'") and "-e" not in lines[0], lines
        assert requirement in _extra(extra)
