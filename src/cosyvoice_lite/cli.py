"""The ``cosyvoice-lite`` command line.

Nothing heavy is imported at module level: ``--help`` and ``--version`` answer at once, and the
OpenMP wait policy is set (passive, unless the user chose one) before torch is first imported.
Sub-commands are ``add_*_command(subparsers)`` functions: a new one is one function and one line
in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import __version__
from .errors import CosyVoiceError, InvalidRequestError
from .files import (
    EXTENSIONS,
    check_output_path,
    create_temporary,
    is_special,
    keep_mode,
    not_utf8,
)

# output file extension -> format name of audio.io.AUDIO_FORMATS
FORMATS = ("wav", "mp3", "flac", "ogg", "opus")


def set_wait_policy() -> None:
    """OpenMP's default spin-waiting makes torch's many small per-token operations several times
    slower on a machine with more busy threads than cores, so the CLI waits passively unless the
    user chose a policy. Passive waiting costs each parallel region a thread wake-up (~20% of a
    decoding step run alone), but a spin does not get that back in the engine: its audio
    workers' OpenMP teams make libgomp throttle every spin (README, deployment notes), and under
    oversubscription spinning measured 1.6-3x slower than passive (bench_wait_policy.py)."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


# ---------------------------------------------------------------------------------- feedback


class Spinner:
    """A stderr spinner while something slow runs (a static line when stderr is not a terminal)."""

    FRAMES = "|/-\\"

    def __init__(self, label: str) -> None:
        self.label = label
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.tty = sys.stderr.isatty()

    def _spin(self) -> None:
        start, i = time.perf_counter(), 0
        while not self.done.wait(0.1):
            frame = self.FRAMES[i % len(self.FRAMES)]
            sys.stderr.write(f"\r{frame} {self.label} {time.perf_counter() - start:.1f} s")
            sys.stderr.flush()
            i += 1

    def __enter__(self) -> Spinner:
        if self.tty:
            self.thread.start()
        else:
            print(f"{self.label} ...", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        if self.tty:
            self.thread.join()
            sys.stderr.write("\r" + " " * (len(self.label) + 16) + "\r")
            sys.stderr.flush()


def _progress_bar(label: str):
    """A small stderr progress bar for long texts (segments done / total)."""
    start = time.perf_counter()

    def update(done: int, total: int) -> None:
        if not sys.stderr.isatty() and done != total:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - start
        sys.stderr.write(
            f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
            f"segments, {elapsed:.1f} s"
        )
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return update


# ---------------------------------------------------------------------------------- loading


def not_empty(value: str) -> str:
    """An argparse type: a value that says something (an empty --model was the current
    directory, an empty --device or --dtype the default)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty value: give one")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        type=not_empty,
        help="model directory or official name (e.g. CosyVoice-300M-SFT)",
    )
    parser.add_argument(
        "--device",
        type=not_empty,
        default="cpu",
        help="cpu, cuda, cuda:1, xpu, npu ... (not mps: no float64)",
    )
    parser.add_argument(
        "--dtype", type=not_empty, default="float32", help="float32, float16 or bfloat16"
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8 LLM linear layers and CosyVoice3 flow products (cpu)",
    )
    parser.add_argument("--flow-steps", type=int, default=10, help="flow steps (official 10)")
    parser.add_argument(
        "--exact-float32",
        action="store_true",
        help="float32 by the official's kernels and operations, its exact floats on this CPU "
        "(default on a CPU: oneDNN's packed products and channels-last vocoder convolutions, "
        "~1e-6 different and up to 2x faster)",
    )
    parser.add_argument(
        "--variant",
        choices=["base", "sft", "instruct"],
        help="v1 release, if the directory name does not tell",
    )
    parser.add_argument(
        "--llm",
        default="llm.pt",
        dest="llm_checkpoint",
        help="LLM checkpoint in the model directory (llm.rl.pt: CosyVoice3's RL-tuned one)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: torch's choice, one per core)",
    )
    parser.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "onnxruntime", "onnxruntime-int8"],
        help="run whole utterances' flow estimator (and CosyVoice3's vocoder) through "
        "onnxruntime (needs --onnx-dir); streams and the v1/v2 vocoders stay in torch",
    )
    parser.add_argument(
        "--onnx-dir", type=not_empty, help="graphs written by 'cosyvoice-lite export onnx'"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def set_threads(threads: int | None) -> None:
    """torch's CPU thread count, set once before the model loads (None: torch's default)."""
    if threads is None:
        return
    # far more threads than cores only slows torch down, and ~100,000 crashed it (segfault)
    most = 4 * (os.cpu_count() or 1)
    if not 1 <= threads <= most:
        raise InvalidRequestError(
            f"--threads must be from 1 to {most} (4 per core of this machine), got {threads}"
        )
    import torch

    torch.set_num_threads(threads)


def load_engine(args: argparse.Namespace, quiet: bool = False, one_off: bool = False):
    """Set the thread count (once, before loading) and load the model with a spinner;
    ``one_off``: for one request, which would not repay tracing the flow's graphs."""
    set_threads(args.threads)
    import torch

    from .engine import Engine

    with Spinner(f"loading {args.model}") if not quiet else _Nothing():
        engine = Engine.load(
            args.model,
            device=args.device,
            dtype=args.dtype,
            quantize=args.quantize,
            flow_steps=args.flow_steps,
            variant=args.variant,
            llm_checkpoint=args.llm_checkpoint,
            backend=args.backend,
            onnx_dir=args.onnx_dir,
            exact_float32=args.exact_float32,
            capture_graphs=False if one_off else None,
            share_onnx_threads=True,  # the CLI owns its process
        )
    if not quiet:
        placement = engine.placement
        precision = str(placement.dtype).removeprefix("torch.")
        precision += f", {placement.quantize}" if placement.quantize else ""
        precision += f", {args.backend}" if args.backend != "torch" else ""
        print(
            f"loaded {engine.model.name} (CosyVoice v{engine.version}, {engine.model.variant}) on "
            f"{placement.device} ({precision}) with {_count(torch.get_num_threads(), 'thread')} "
            f"in {engine.load_seconds:.1f} s",
            file=sys.stderr,
        )
    return engine


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


# ---------------------------------------------------------------------------------- say


def output_format(path: str, forced: str | None) -> str:
    """The format for ``path``: --format, else its extension. Checked before any work."""
    if forced:
        return forced
    ext = Path(path).suffix.lower()
    if ext not in EXTENSIONS:
        raise InvalidRequestError(
            f"cannot tell the audio format of {path!r} from its extension; use one of "
            f"{', '.join(EXTENSIONS)} or give --format ({', '.join(FORMATS)})"
        )
    return EXTENSIONS[ext]


class AudioOutput:
    """Where ``say`` puts its audio, opened with the first chunk (a refused request touches
    nothing). A regular file is written beside its place, in a file of this run's own, and
    renamed there at the end, so that it appears at once or not at all (runs into one output
    each replace it whole: the last wins), or in place with ``--stream``; through a symlink, the
    file it points to. Standard output (``-``), a pipe, a FIFO or a device is never replaced or
    removed: with ``--stream`` it gets each chunk's bytes as they come (not flac, whose header
    would then say 0 samples), else a temporary file's bytes at the end (audio files need a
    seekable file for their header)."""

    def __init__(self, output: str, format: str, stream: bool, sample_rate: int) -> None:
        self.path = None if output == "-" else Path(output).expanduser()
        self.special = self.path is None or is_special(self.path)
        # a regular file's place (through a symlink, the file it points to)
        self.final = None if self.special else Path(os.path.realpath(self.path))
        self.piped = stream and self.special and format != "flac"
        self.format, self.stream, self.sample_rate = format, stream, sample_rate
        self.writer: AudioFileWriter | PipeWriter | None = None
        self.partial: Path | None = None  # the file written, where it is not the target

    @property
    def rate(self) -> int:
        return self.writer.rate if self.writer is not None else self.sample_rate

    def write(self, samples) -> None:
        if self.writer is None:
            self._open()
        self.writer.write(samples)

    def _target(self):  # noqa: ANN202 - a binary file object
        if self.path is None:
            return os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
        return open(self.path, "wb", buffering=0)  # noqa: SIM115 - the writer closes it

    def _open(self) -> None:
        if self.piped:
            self.writer = PipeWriter(self._target(), self.format, self.sample_rate)
            return
        fd = None  # a new file of this run's own, opened here (no other run's, no symlink)
        if self.special:
            fd, temporary = tempfile.mkstemp(suffix=f".{self.format}", prefix=".cosyvoice-lite-")
            self.partial = Path(temporary)
        elif self.stream:
            self.partial = self.final  # written in place
        else:
            self.partial, fd = create_temporary(self.final)
        try:
            self.writer = AudioFileWriter(self.partial, self.format, self.sample_rate, fd)
        except BaseException:
            if fd is not None:  # (the writer owns it once made)
                os.close(fd)
            raise

    def finish(self) -> None:
        if self.writer is None:  # nothing spoken: still a valid (empty) file
            self._open()
        self.writer.close()
        if self.piped:
            return
        if self.special:
            with open(self.partial, "rb") as source, self._target() as sink:
                shutil.copyfileobj(source, sink)
            self.partial.unlink()
        elif not self.stream:
            keep_mode(self.final, self.partial)
            os.replace(self.partial, self.final)  # a whole file appears at once, or not at all

    def abort(self) -> None:
        """After a failure: never a cut-off file left (nor a FIFO or device removed); only this
        run's own file goes, not one another run writes."""
        if self.writer is not None:
            self.writer.discard()
        if self.partial is not None and self.partial.is_file():
            self.partial.unlink(missing_ok=True)


class AudioFileWriter:
    """Writes chunks to an audio file as they come (libsndfile completes the header at close).
    Opus and MP3 take only some rates: other rates are resampled on the fly."""

    def __init__(self, path: Path, format: str, sample_rate: int, fd: int | None = None) -> None:
        """``fd``: ``path`` already open (a file made for this writer alone), written through
        it, not opened again by name, and closed with the writer."""
        import soundfile as sf

        from .audio.io import AUDIO_FORMATS, MP3_RATES, OPUS_RATES

        container, subtype, _ = AUDIO_FORMATS[format]
        allowed = {"opus": OPUS_RATES, "mp3": MP3_RATES}.get(format)
        self.rate = 48000 if allowed is not None and sample_rate not in allowed else sample_rate
        self.resampler = None
        if self.rate != sample_rate:
            from .serving.streaming import StreamResampler

            self.resampler = StreamResampler(sample_rate, self.rate)
        self.path, self.fd = path, fd
        with self._os_errors():  # (a descriptor keeps libsndfile's own I/O and its errno)
            self.file = sf.SoundFile(
                os.fsencode(path) if fd is None else fd,  # (bytes: a non-UTF-8 name too)
                "w",
                samplerate=self.rate,
                channels=1,
                format=container,
                subtype=subtype,
                closefd=False,
            )
        self.samples = 0

    @contextlib.contextmanager
    def _os_errors(self):  # noqa: ANN202
        """libsndfile's failures (a disk that fills: "System error.") as the OSError they are,
        naming the file and the system's reason."""
        import soundfile as sf

        try:
            yield
        except sf.LibsndfileError as exc:
            number = sf._ffi.errno  # (the C library's, as libsndfile left it)
            if number:
                raise OSError(number, os.strerror(number), str(self.path)) from None
            raise OSError(f"cannot write {self.path}: {exc}") from None

    def write(self, samples) -> None:
        import numpy as np

        from .audio.io import write_frames

        if self.resampler is not None:
            samples = self.resampler.feed(samples)
        samples = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
        with self._os_errors():
            write_frames(self.file, samples)  # (one long Vorbis write overflowed libsndfile)
            self.file.flush()  # readable while synthesis goes on
        self.samples += len(samples)

    def close(self) -> None:
        if self.resampler is not None:  # its tail, written as it is (not resampled again)
            tail, self.resampler = self.resampler.finish(), None
            self.write(tail)
        try:
            with self._os_errors():
                self.file.close()
        finally:
            self._close_fd()

    def discard(self) -> None:
        """Closed after a failure, whatever it had written (its file is removed after)."""
        try:
            self.file.close()
        finally:
            self._close_fd()

    def _close_fd(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class PipeWriter:
    """``--stream`` into a pipe, FIFO or device (``-o -``): the encoded bytes of each chunk as
    it comes (a WAV header of unknown length, as streaming servers send), where a file's header
    would be completed at the end."""

    def __init__(self, file, format: str, sample_rate: int) -> None:  # noqa: ANN001
        from .serving.streaming import Encoder

        self.encoder = Encoder(format, sample_rate)
        self.rate = self.encoder.sample_rate
        self.file = file

    def write(self, samples) -> None:
        self.file.write(self.encoder.feed(samples))

    def close(self) -> None:
        self.file.write(self.encoder.finish())
        self.file.close()

    def discard(self) -> None:
        self.file.close()


class Player:
    """Plays chunks on the default sound device (needs the optional sounddevice package)."""

    def __init__(self, sample_rate: int) -> None:
        try:
            import sounddevice
        except (ImportError, OSError) as exc:
            raise InvalidRequestError(
                "--play needs the sounddevice package and a sound device "
                f"(pip install sounddevice): {exc}"
            ) from None
        try:
            self.stream = sounddevice.OutputStream(
                samplerate=sample_rate, channels=1, dtype="float32"
            )
            self.stream.start()
        except Exception as exc:  # noqa: BLE001 - no device, busy device, ...
            raise InvalidRequestError(f"--play: no usable sound device ({exc})") from None

    def write(self, samples) -> None:
        self.stream.write(samples.reshape(-1, 1))

    def close(self) -> None:
        self.stream.stop()
        self.stream.close()


def _mode(args: argparse.Namespace):
    from .request import Mode

    if args.mode:
        return Mode(args.mode)
    if args.source_wav:
        return Mode.VOICE_CONVERSION
    if args.instruct:
        return Mode.INSTRUCT
    if args.voice and not args.prompt_wav:
        return None  # preset, or zero-shot for a cloned voice: the model says (_voice_mode)
    if args.prompt_wav:
        return Mode.ZERO_SHOT if args.prompt_text else Mode.CROSS_LINGUAL
    raise CosyVoiceError(
        "say needs a voice: --voice ID, or --prompt-wav FILE [--prompt-text T], "
        "or --source-wav with --prompt-wav (run 'cosyvoice-lite voices' to list)"
    )


def _voice_mode(engine, voice: str):
    """The mode of ``--voice`` alone: its own (preset), or zero-shot for a cloned voice stored
    with the model; an unknown voice is named as such, whatever the model's modes."""
    from .errors import UnknownVoiceError
    from .request import Mode

    if voice not in engine.presets:
        raise UnknownVoiceError(
            f"unknown voice '{voice}'; available: {', '.join(engine.voices()) or 'none'} "
            "(or clone one with --prompt-wav)"
        )
    return Mode.ZERO_SHOT if engine.is_cloned_voice(voice) else Mode.PRESET


def _check_options(args: argparse.Namespace) -> None:
    """Options that contradict each other are an error, not one of them silently dropped."""
    if args.voice and args.prompt_wav:
        raise InvalidRequestError(
            "give --voice or --prompt-wav, not both (with --source-wav, either is the voice to "
            "convert into)"
        )
    if args.prompt_text and not args.prompt_wav:
        raise InvalidRequestError("--prompt-text is the transcript of --prompt-wav: give both")
    from .request import MAX_SPEED, MIN_SPEED  # light: no torch

    if not MIN_SPEED <= args.speed <= MAX_SPEED:  # before loading, not after
        raise InvalidRequestError(f"--speed must be between {MIN_SPEED} and {MAX_SPEED}")
    if args.speed != 1.0 and args.stream:
        raise InvalidRequestError("--speed can only be changed without --stream (as the official)")
    if args.instruct is not None and not args.instruct.strip():
        raise InvalidRequestError("--instruct is empty: write the instruction, or leave it out")
    ext = EXTENSIONS.get(Path(args.output).suffix.lower())
    if args.format and ext and ext != args.format and {ext, args.format} != {"ogg", "opus"}:
        raise InvalidRequestError(
            f"-o {args.output!r} says {ext} but --format says {args.format}: make them agree"
        )


def _check_mode_options(args: argparse.Namespace, mode, text: str) -> None:
    """Options the mode does not read are an error before loading (they were dropped without a
    word: --instruct with --source-wav, --prompt-text in a cross-lingual clone). A --voice alone
    is checked by the engine, which knows its voices."""
    from .request import Mode

    if mode is None:
        return
    for option, value, modes in (
        ("--prompt-text", args.prompt_text, {Mode.ZERO_SHOT}),
        ("--instruct", args.instruct, {Mode.INSTRUCT}),
        ("--source-wav", args.source_wav, {Mode.VOICE_CONVERSION}),
        ("--prompt-wav", args.prompt_wav, set(Mode) - {Mode.PRESET}),
    ):
        if value and mode not in modes:
            raise InvalidRequestError(
                f"{option} is not used in mode {mode.value}: leave it out, or choose the mode "
                "that reads it"
            )
    if mode == Mode.VOICE_CONVERSION and text.strip():
        raise InvalidRequestError(
            'voice conversion speaks --source-wav, not text: give "" as the text'
        )


def _check_inputs(args: argparse.Namespace, out: Path | None) -> None:
    """The input files are audio this user may read, of a length the engine takes, and -o is
    none of them (it would be emptied before being read): before the model loads (and
    perhaps downloads), not after."""
    for option, value in (("--prompt-wav", args.prompt_wav), ("--source-wav", args.source_wav)):
        if not value:
            continue
        _check_audio_file(option, value)
        if out is not None and out.exists() and os.path.samefile(value, out):
            raise InvalidRequestError(
                f"-o {str(out)!r} is the {option} recording: it would be overwritten"
            )


def _check_audio_file(option: str, value: str) -> None:
    """``value`` opens, and its header says audio that ``PromptEncoder.load`` takes (the rate,
    the channels, 0.5-30 s): the same limits, read from the header alone."""
    if (shown := not_utf8(value)) is not None:  # (libsndfile opens UTF-8 names only)
        raise InvalidRequestError(f"{option}: path {shown} is not valid UTF-8: rename it")
    path = Path(value)  # (as the loader reads it: a quoted "~" is not expanded there)
    if not path.exists():
        raise InvalidRequestError(f"{option}: no such file {value!r}")
    if path.is_dir():
        raise InvalidRequestError(f"{option}: {value!r} is a directory, not an audio file")
    try:
        with path.open("rb") as handle:  # (a reason as the system gives it: permission denied)
            empty = not handle.read(1)
    except OSError as exc:
        raise InvalidRequestError(
            f"{option}: cannot read {value!r}: {exc.strerror or exc}"
        ) from None
    if empty:
        raise InvalidRequestError(f"{option}: {value!r} is empty (0 bytes)")
    import soundfile as sf

    from .audio.io import (
        MAX_CHANNELS,
        MAX_PROMPT_SECONDS,
        MAX_SAMPLE_RATE,
        MIN_PROMPT_SECONDS,
        MIN_SAMPLE_RATE,
        UNKNOWN_FRAMES,
    )

    try:
        info = sf.info(str(path))
    except Exception as exc:  # noqa: BLE001 - libsndfile's refusals come in several types
        raise InvalidRequestError(
            f"{option}: {value!r} is not audio that can be decoded ({exc}); supported formats "
            "are wav, flac, mp3, ogg/vorbis and ogg/opus"
        ) from None
    rate, frames = int(info.samplerate), int(info.frames)
    problem = None
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        problem = f"its sample rate is {rate} Hz; {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz is taken"
    elif info.channels > MAX_CHANNELS:
        problem = f"it has {info.channels} channels; at most {MAX_CHANNELS} are taken"
    elif frames == 0:
        problem = "it holds no audio samples"
    elif frames < UNKNOWN_FRAMES and frames / rate > MAX_PROMPT_SECONDS:
        problem = f"it is {frames / rate:.2f} s long; at most {MAX_PROMPT_SECONDS:g} s is taken"
    # (an mp3's header may count the encoder's padding: only the other formats' are exact)
    elif info.format != "MP3" and frames / rate < MIN_PROMPT_SECONDS:
        problem = f"it is {frames / rate:.2f} s long; at least {MIN_PROMPT_SECONDS:g} s is needed"
    if problem is not None:
        raise InvalidRequestError(f"{option}: {value!r}: {problem}")


def _check_text(args: argparse.Namespace, text: str) -> None:
    """The texts are Unicode (a non-UTF-8 argument holds lone surrogates): refused now, not by
    the engine once loaded."""
    for name, value in (("the text", text), ("--prompt-text", args.prompt_text),
                        ("--instruct", args.instruct)):  # fmt: skip
        try:
            (value or "").encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"{name} is not valid Unicode: a lone surrogate at character {exc.start} (from "
                "a non-UTF-8 argument or file)"
            ) from None


def _read_text(text: str) -> str:
    """The text argument, or standard input for ``-`` (an encoding error named, not raised)."""
    if text != "-":
        return text
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"standard input is not valid {exc.encoding.upper()} text (byte {exc.start} of the "
            "part read): save it as UTF-8"
        ) from None


def _seed(value: str) -> int:
    """A seed as the engine takes it (torch generators' 64 bits), refused at once: a negative one
    was refused after the model had loaded."""
    from .request import MAX_SEED

    try:
        seed = int(value)
    except ValueError:
        seed = -1
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a whole number from 0 to 2**64 - 1, got {value!r}")
    return seed


def cmd_say(args: argparse.Namespace) -> int:
    to_stdout = args.output == "-"  # the audio to standard output, the report to stderr
    if to_stdout and sys.stdout is None:  # (closed: `>&-`)
        raise InvalidRequestError("-o -: standard output is closed")
    out = None if to_stdout else check_output_path(args.output)
    fmt = args.format or "wav" if to_stdout else output_format(args.output, args.format)
    _check_options(args)
    _check_inputs(args, out)
    text = _read_text(args.text)
    _check_text(args, text)
    if not text.strip() and args.source_wav is None:  # (voice conversion speaks the source)
        raise InvalidRequestError(
            "there is no text to speak" + (" on standard input" if args.text == "-" else "")
        )
    mode = _mode(args)
    _check_mode_options(args, mode, text)
    # closed before exit: threads of a torch engine still ending as the interpreter exits
    # aborted the process now and then (exit 134) after the file was written
    with load_engine(args, one_off=True) as engine:
        return _say_with(engine, args, text, mode, fmt)


def _say_with(engine, args: argparse.Namespace, text: str, mode, fmt: str) -> int:  # noqa: ANN001
    from .request import SynthesisRequest

    request = SynthesisRequest(
        mode=mode or _voice_mode(engine, args.voice),
        text=text,
        voice=args.voice,
        prompt_audio=Path(args.prompt_wav) if args.prompt_wav else None,
        prompt_text=args.prompt_text,
        instruct=args.instruct,
        source_audio=Path(args.source_wav) if args.source_wav else None,
        speed=args.speed,
        seed=args.seed,
        text_frontend=not args.no_normalize,
        stream=args.stream,
    )
    player = Player(engine.sample_rate) if args.play else None
    start = time.perf_counter()
    output = AudioOutput(args.output, fmt, args.stream, engine.sample_rate)
    first, seconds = _say(engine, request, output, player)
    took = time.perf_counter() - start
    streamed = f", first audio after {first:.2f} s" if args.stream and first is not None else ""
    print(  # on stderr, as all progress: stdout may be the audio itself (-o -)
        f"wrote {not_utf8(args.output) or args.output} ({fmt}): {seconds:.2f} s of audio at {output.rate} Hz in "
        f"{took:.2f} s (RTF {took / max(seconds, 1e-9):.2f}{streamed})",
        file=sys.stderr,
    )
    return 0


def _say(engine, request, output: AudioOutput, player) -> tuple[float | None, float]:  # noqa: ANN001
    """Synthesize into ``output`` (and ``player``); (first audio's seconds, audio seconds)."""
    start, first, seconds = time.perf_counter(), None, 0.0
    try:
        for chunk in engine.synthesize(request, _progress_bar("synthesizing")):
            if first is None:
                first = time.perf_counter() - start
            output.write(chunk.samples)
            if player is not None:
                player.write(chunk.samples)
            seconds += chunk.duration
        output.finish()
    except BaseException:
        output.abort()
        raise
    finally:
        if player is not None:
            player.close()
    return first, seconds


@contextlib.contextmanager
def _terminated_as_interrupted():  # noqa: ANN202
    """SIGTERM (a service manager, ``timeout``) unwinds as Ctrl-C does, so that no half-written
    file is left; exits with 128 + 15."""

    def terminate(signum: int, frame) -> None:  # noqa: ANN001
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():  # (signals reach it alone)
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_say_command(sub) -> None:
    say = sub.add_parser(
        "say",
        help="synthesize TEXT into an audio file",
        description="Synthesize TEXT into an audio file (wav, mp3, flac, ogg, "
        "opus: from the extension of -o, or --format).",
    )
    say.add_argument(
        "text",
        help='the text to speak; - reads it from standard input; "" with --source-wav (voice '
        "conversion speaks the source)",
    )
    add_model_args(say)
    say.add_argument("--voice", help="preset voice id (see 'voices')")
    say.add_argument("--prompt-wav", help="prompt recording to clone (wav/flac/mp3/ogg, >= 16 kHz)")
    say.add_argument("--prompt-text", help="transcript of the prompt recording (zero-shot)")
    say.add_argument("--instruct", help="instruction, e.g. 'speak happily' or a persona (v1)")
    say.add_argument(
        "--source-wav", help="voice conversion: speech to re-speak in the prompt's voice"
    )
    say.add_argument("--mode", choices=["preset", "zero_shot", "cross_lingual", "instruct", "vc"])
    say.add_argument("--speed", type=float, default=1.0)
    say.add_argument("--seed", type=_seed, help="make the run reproducible (0 to 2**64 - 1)")
    say.add_argument("--no-normalize", action="store_true", help="skip text normalisation")
    say.add_argument(
        "-o",
        "--output",
        required=True,
        help="output file; its extension picks the format (.wav .mp3 .flac .ogg .opus); "
        "- writes to standard output (wav unless --format)",
    )
    say.add_argument("--format", choices=FORMATS, help="output format, whatever the extension")
    say.add_argument(
        "--stream",
        action="store_true",
        help="synthesize chunk by chunk and write each chunk as soon as it is made",
    )
    say.add_argument(
        "--play",
        action="store_true",
        help="also play on the sound device as it is made (needs sounddevice)",
    )
    say.set_defaults(func=cmd_say)


# ---------------------------------------------------------------------------------- others


def cmd_voices(args: argparse.Namespace) -> int:
    with load_engine(args, quiet=True, one_off=True) as engine:  # (no graphs traced for a list)
        _list_voices(engine)
    return 0


def _list_voices(engine) -> None:  # noqa: ANN001
    print(
        f"# {engine.model.name}: CosyVoice v{engine.version} ({engine.model.variant}); "
        f"modes: {', '.join(m.value for m in engine.modes)}"
    )
    for name in engine.voices():
        print(name)
    if not engine.voices():
        print("(no preset voices: clone one with --prompt-wav)")


def cmd_normalize(args: argparse.Namespace) -> int:
    from .frontend.text import TextFrontend

    encode = None
    if args.model:
        from .hub import resolve_model
        from .modeldir import open_model_dir
        from .pipelines.factory import text_tokenizer

        encode = text_tokenizer(open_model_dir(resolve_model(args.model))).encode
    text = _read_text(args.text)
    for segment in TextFrontend().normalize(text, split=True, enabled=True, encode=encode):
        # one line per segment: a line break inside one is shown as \n (it read as several)
        print(segment.replace("\r", "\\r").replace("\n", "\\n"))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .hub import resolve_model, whisper_vocab_path
    from .modeldir import detect_version
    from .versions import spec

    path = resolve_model(args.name)
    if spec(detect_version(path)).text_tokenizer == "whisper":
        whisper_vocab_path()  # v1's text vocabulary too: everything to run offline later
    print(path)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .errors import ModelDirError, ModelDownloadError
    from .hub import resolve_model
    from .integrity import check_model_files
    from .modeldir import open_model_dir

    try:
        path = resolve_model(args.model, download=False)
    except ModelDownloadError as exc:
        if "downloading is disabled" not in str(exc):
            raise
        raise ModelDownloadError(
            f"{args.model} is not downloaded: run cosyvoice-lite download {args.model} first"
        ) from None
    open_model_dir(path)  # the layout and the yaml, as a load checks them
    results = check_model_files(path)
    for result in results:
        how = ", ".join(result.checked) or "present; no checksum to compare with"
        print(f"{'ok' if result.problem is None else 'DAMAGED':8}{result.name} ({how})")
    damaged = [result for result in results if result.problem is not None]
    if damaged:
        listed = "; ".join(f"{result.name}: {result.problem}" for result in damaged)
        raise ModelDirError(
            f"{len(damaged)} of {len(results)} files of {path} are damaged: {listed}. "
            "Delete them and fetch them again (cosyvoice-lite download NAME resumes a download)"
        )
    print(f"{path}: {len(results)} files intact")
    return 0


def add_other_commands(sub) -> None:
    voices = sub.add_parser(
        "voices",
        help="list a model's preset voices and modes",
        description="List a model's preset (and cloned) voices and the modes it supports.",
    )
    add_model_args(voices)
    voices.set_defaults(func=cmd_voices)

    norm_help = (
        "print the text segments that would be spoken, one per line (a line break inside one "
        "as \\n)"
    )
    norm = sub.add_parser(
        "normalize", help=norm_help, description=norm_help[0].upper() + norm_help[1:] + "."
    )
    norm.add_argument("text", help="text, or - to read standard input")
    norm.add_argument(
        "--model", type=not_empty, help="use this model's tokenizer for English length limits"
    )
    norm.set_defaults(func=cmd_normalize)

    download = sub.add_parser(
        "download",
        help="fetch an official model into the cache",
        description="Fetch an official model's files (those the engine reads) into the cache.",
    )
    download.add_argument("name", help="an official model name, e.g. CosyVoice2-0.5B")
    download.set_defaults(func=cmd_download)

    check_help = (
        "read a model's files whole and check them against their checksums (a load does not)"
    )
    check = sub.add_parser(
        "check", help=check_help, description=check_help[0].upper() + check_help[1:] + "."
    )
    check.add_argument(
        "model", type=not_empty, help="model directory or official name (not downloaded)"
    )
    check.set_defaults(func=cmd_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosyvoice-lite", description="Slim CosyVoice text-to-speech engine and server."
    )
    parser.add_argument("--version", action="version", version=f"cosyvoice-lite {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    add_say_command(sub)
    add_other_commands(sub)
    from .serving.cli import add_serve_command  # argparse only: no server imports yet

    add_serve_command(sub)
    from .export.cli import add_export_command  # argparse only: torch loads when it runs

    add_export_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_wait_policy()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # SIGTERM unwinds every command but serve (which stops its own way) as Ctrl-C: no half-made
    # file or export staging is left behind (an export stopped by `timeout` left gigabytes)
    terminated = (
        contextlib.nullcontext() if args.command == "serve" else _terminated_as_interrupted()
    )
    try:
        with terminated:
            return args.func(args)
    except CosyVoiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)  # (after a progress line left open)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (| head): nothing more to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a disk that fills, a device that refuses writes
        if args.verbose:
            raise
        print(f"error: {exc} (-v shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
