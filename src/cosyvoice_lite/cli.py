"""The ``cosyvoice-lite`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import CosyVoiceError


def _progress_bar(label: str):
    """A small stderr progress bar for long texts (segments done / total)."""
    start = time.perf_counter()

    def update(done: int, total: int) -> None:
        if not sys.stderr.isatty() and done != total:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - start
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                         f"segments, {elapsed:.1f} s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return update


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model directory or official name (e.g. CosyVoice-300M-SFT)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, xpu, npu ...")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    parser.add_argument("--variant", choices=["base", "sft", "instruct"],
                        help="v1 release, if the directory name does not tell")
    parser.add_argument("--llm", default="llm.pt", dest="llm_checkpoint",
                        help="LLM checkpoint in the model directory (llm.rl.pt: CosyVoice3's RL-tuned one)")


def _mode(args: argparse.Namespace):
    from .request import Mode

    if args.mode:
        return Mode(args.mode)
    if args.source_wav:
        return Mode.VOICE_CONVERSION
    if args.instruct:
        return Mode.INSTRUCT
    if args.voice and not args.prompt_wav:
        return Mode.PRESET
    if args.prompt_wav:
        return Mode.ZERO_SHOT if args.prompt_text else Mode.CROSS_LINGUAL
    raise CosyVoiceError("say needs a voice: --voice ID, or --prompt-wav FILE [--prompt-text T], "
                         "or --source-wav with --prompt-wav (run 'cosyvoice-lite voices' to list)")


def cmd_say(args: argparse.Namespace) -> int:
    from .engine import Engine, synthesize_to_file
    from .request import SynthesisRequest

    mode = _mode(args)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, variant=args.variant,
                         llm_checkpoint=args.llm_checkpoint)
    request = SynthesisRequest(
        mode=mode, text=args.text, voice=args.voice,
        prompt_audio=Path(args.prompt_wav) if args.prompt_wav else None,
        prompt_text=args.prompt_text, instruct=args.instruct,
        source_audio=Path(args.source_wav) if args.source_wav else None,
        speed=args.speed, seed=args.seed, text_frontend=not args.no_normalize,
    )
    start = time.perf_counter()
    seconds = synthesize_to_file(engine, request, args.output, _progress_bar("synthesizing"))
    took = time.perf_counter() - start
    print(f"wrote {args.output}: {seconds:.2f} s of audio at {engine.sample_rate} Hz "
          f"in {took:.2f} s (RTF {took / max(seconds, 1e-9):.2f})")
    return 0


def cmd_voices(args: argparse.Namespace) -> int:
    from .engine import Engine

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, variant=args.variant,
                         llm_checkpoint=args.llm_checkpoint)
    print(f"# {engine.model.name}: CosyVoice v{engine.version} ({engine.model.variant}); "
          f"modes: {', '.join(m.value for m in engine.modes)}")
    for name in engine.voices():
        print(name)
    if not engine.voices():
        print("(no preset voices: clone one with --prompt-wav)")
    return 0


def cmd_normalize(args: argparse.Namespace) -> int:
    from .frontend.text import TextFrontend

    encode = None
    if args.model:
        from .hub import resolve_model
        from .modeldir import open_model_dir
        from .pipelines.factory import text_tokenizer

        encode = text_tokenizer(open_model_dir(resolve_model(args.model))).encode
    text = args.text if args.text != "-" else sys.stdin.read()
    for segment in TextFrontend().normalize(text, split=True, enabled=True, encode=encode):
        print(segment)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .hub import resolve_model

    print(resolve_model(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosyvoice-lite",
                                     description="Slim CosyVoice text-to-speech engine and server.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    say = sub.add_parser("say", help="synthesize TEXT into a wav file")
    say.add_argument("text")
    _add_model_args(say)
    say.add_argument("--voice", help="preset voice id (see 'voices')")
    say.add_argument("--prompt-wav", help="prompt recording to clone (wav/flac/mp3/ogg, >= 16 kHz)")
    say.add_argument("--prompt-text", help="transcript of the prompt recording (zero-shot)")
    say.add_argument("--instruct", help="instruction, e.g. 'speak happily' or a persona (v1)")
    say.add_argument("--source-wav", help="voice conversion: speech to re-speak in the prompt's voice")
    say.add_argument("--mode", choices=["preset", "zero_shot", "cross_lingual", "instruct", "vc"])
    say.add_argument("--speed", type=float, default=1.0)
    say.add_argument("--seed", type=int, help="make the run reproducible")
    say.add_argument("--no-normalize", action="store_true", help="skip text normalisation")
    say.add_argument("-o", "--output", required=True, help="output wav file")
    say.set_defaults(func=cmd_say)

    voices = sub.add_parser("voices", help="list a model's preset voices and modes")
    _add_model_args(voices)
    voices.set_defaults(func=cmd_voices)

    norm = sub.add_parser("normalize", help="print the text segments that would be spoken")
    norm.add_argument("text", help="text, or - to read standard input")
    norm.add_argument("--model", help="use this model's tokenizer for English length limits")
    norm.set_defaults(func=cmd_normalize)

    download = sub.add_parser("download", help="fetch an official model into the cache")
    download.add_argument("name")
    download.set_defaults(func=cmd_download)

    try:
        from .serving.cli import add_serve_command
    except ImportError:
        pass
    else:
        add_serve_command(sub)
    from .export.cli import add_export_command  # argparse only: torch loads when it runs

    add_export_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CosyVoiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
