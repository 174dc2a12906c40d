"""Generate random-weight CosyVoice model directories in the exact official layout.

    python tools/make_models.py --version 1 --size full --variant sft --out benchmarks/out/CosyVoice-300M-SFT
    python tools/make_models.py --version 1 --size tiny --out /tmp/v1-tiny

``full`` uses the official hyper-parameters: the checkpoints cost exactly the compute of the real
ones, so they serve the speed benchmarks. ``tiny`` shrinks every width for tests. The networks are
our own classes, built from the yaml exactly as the engine builds them; weight-normed vocoder convs
are written in the legacy ``weight_g``/``weight_v`` spelling of the released files. The committed
test directory ``tests/data/models/v1-tiny`` was instead written by the official classes (see
tools/golden/), which proves our loader against the real layout and not only against this writer.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tools"))

# yaml template per version (official structure) and the key-path overrides per size
TEMPLATES = {1: ROOT / "tools" / "golden" / "tiny_v1.yaml"}

FULL_V1 = {
    "text_encoder_input_size": 512,
    "llm_input_size": 1024,
    "llm_output_size": 1024,
    "llm.text_encoder.output_size": 1024,
    "llm.text_encoder.attention_heads": 16,
    "llm.text_encoder.linear_units": 4096,
    "llm.text_encoder.num_blocks": 6,
    "llm.llm.attention_heads": 16,
    "llm.llm.linear_units": 4096,
    "llm.llm.num_blocks": 14,
    "flow.input_size": 512,
    "flow.encoder.output_size": 512,
    "flow.encoder.attention_heads": 8,
    "flow.encoder.linear_units": 2048,
    "flow.encoder.num_blocks": 6,
    "flow.encoder.input_size": 512,
    "flow.decoder.estimator.channels": "[256, 256]",
    "flow.decoder.estimator.attention_head_dim": 64,
    "flow.decoder.estimator.n_blocks": 4,
    "flow.decoder.estimator.num_mid_blocks": 12,
    "flow.decoder.estimator.num_heads": 8,
    "hift.base_channels": 512,
    "hift.f0_predictor.cond_channels": 512,
}
SIZES = {(1, "full"): FULL_V1, (1, "tiny"): {}}
VOICES = ["中文女", "中文男", "日语男", "粤语女", "英文女", "英文男", "韩语女"]

_LINE = re.compile(r"^(\s*)([A-Za-z_][\w]*):(.*)$")


def render_yaml(template: str, overrides: dict[str, object]) -> str:
    """Replace the values of the given dotted key paths in an official-format yaml, line by line
    (tags, comments and layout are kept; only scalar/flow values are rewritten)."""
    stack: list[tuple[int, str]] = []
    out, used = [], set()
    for line in template.splitlines():
        match = _LINE.match(line)
        if match:
            indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = ".".join([k for _, k in stack] + [key])
            stack.append((indent, key))
            if path in overrides and not rest.strip().startswith("!"):
                comment = rest[rest.index("#"):] if "#" in rest else ""
                line = f"{match.group(1)}{key}: {overrides[path]}" + (f" {comment}" if comment else "")
                used.add(path)
        out.append(line)
    missing = set(overrides) - used
    if missing:
        raise SystemExit(f"template lacks keys: {sorted(missing)}")
    return "\n".join(out) + "\n"


def _legacy_weight_norm(state: dict[str, torch.Tensor], hift: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Write weight-normed convs as the released hift.pt does: weight_g (norm) + weight_v."""
    from cosyvoice_lite.networks.hift import FoldedWeightNorm

    out = dict(state)
    for name, module in hift.named_modules():
        if isinstance(module, FoldedWeightNorm):
            w = out.pop(f"{name}.weight")
            out[f"{name}.weight_v"] = w
            out[f"{name}.weight_g"] = torch.linalg.vector_norm(
                w.reshape(w.shape[0], -1), dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    return out


def make_model(out: Path, version: int = 1, size: str = "tiny", variant: str = "sft",
               seed: int = 0) -> Path:
    from make_onnx_standins import write_standins

    from cosyvoice_lite.build import build_network
    from cosyvoice_lite.config import YAML_NAMES, load_model_config

    out.mkdir(parents=True, exist_ok=True)
    yaml_text = render_yaml(TEMPLATES[version].read_text(encoding="utf-8"), SIZES[(version, size)])
    (out / YAML_NAMES[version]).write_text(yaml_text, encoding="utf-8")
    config = load_model_config(out, version)
    torch.manual_seed(seed)
    for part in ("llm", "flow", "hift"):
        network = build_network(getattr(config, part))
        state = network.state_dict()
        if part == "hift":
            state = _legacy_weight_norm(state, network)
        torch.save({k: v.contiguous() for k, v in state.items()}, out / f"{part}.pt")
        del network, state
    write_standins(out, version)
    if variant in ("sft", "instruct"):
        generator = torch.Generator().manual_seed(seed + 1)
        speakers = {name: {"embedding": torch.randn(1, 192, generator=generator)} for name in VOICES}
        torch.save(speakers, out / "spk2info.pt")
    name = {"base": "CosyVoice-300M", "sft": "CosyVoice-300M-SFT",
            "instruct": "CosyVoice-300M-Instruct"}[variant]
    (out / "configuration.json").write_text(
        json.dumps({"framework": "pytorch", "task": "text-to-speech", "model": name,
                    "note": "random weights generated by cosyvoice-lite tools/make_models.py"},
                   ensure_ascii=False, indent=2), encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", type=int, default=1, choices=sorted({v for v, _ in SIZES}))
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--variant", choices=["base", "sft", "instruct"], default="sft")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(make_model(args.out, args.version, args.size, args.variant, args.seed))


if __name__ == "__main__":
    main()
