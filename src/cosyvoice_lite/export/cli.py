"""`cosyvoice-lite export onnx ...` (argparse only here: torch is imported when the command runs)."""

from __future__ import annotations

import argparse
import sys


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .onnx_export import check_options, export_onnx

    out = Path(args.output)
    check_options(out, args.dtype, args.static_frames, args.force)  # before loading anything
    manifest = export_onnx(
        args.model,
        out,
        dtype=args.dtype,
        static_frames=args.static_frames,
        force=args.force,
        llm_checkpoint=args.llm_checkpoint,
        variant=args.variant,
        progress=lambda line: print(line, file=sys.stderr),
    )
    print(manifest)
    return 0


def add_export_command(sub) -> None:  # noqa: ANN001 (argparse's private subparsers type)
    export = sub.add_parser("export", help="export the networks for other runtimes")
    formats = export.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser(
        "onnx",
        help="ONNX graphs (opset 17) + manifest.json (see docs/EXPORT.md)",
        description="Export the LLM (prefill + one-step decode, explicit KV cache), the flow "
        "encoder and estimator, and the vocoder of a model as ONNX graphs with a manifest.",
    )
    onnx.add_argument("--model", required=True, help="model directory or official name")
    onnx.add_argument(
        "-o",
        "--output",
        required=True,
        help="directory to write (must not exist or be empty, unless --force)",
    )
    onnx.add_argument(
        "--dtype",
        default="float32",
        help="float32 or float16 (weights and compute; inputs and outputs stay float32)",
    )
    onnx.add_argument(
        "--static-frames",
        type=int,
        metavar="N",
        help="also export the flow estimator with every shape fixed at N mel frames",
    )
    onnx.add_argument("--force", action="store_true", help="replace an existing output directory")
    onnx.add_argument(
        "--variant",
        choices=["base", "sft", "instruct"],
        help="v1 release, if the directory name does not tell",
    )
    onnx.add_argument(
        "--llm",
        default="llm.pt",
        dest="llm_checkpoint",
        help="LLM checkpoint in the model directory (e.g. llm.rl.pt)",
    )
    onnx.set_defaults(func=cmd_export_onnx)
