"""Generate random-weight CosyVoice model directories in the exact official layout.

    python tools/make_models.py --version 1 --size full --variant sft --out benchmarks/out/CosyVoice-300M-SFT
    python tools/make_models.py --version 1 --size tiny --out /tmp/v1-tiny
    python tools/make_models.py --version 2 --size full --out benchmarks/out/CosyVoice2-0.5B
    python tools/make_models.py --version 3 --size full --out benchmarks/out/Fun-CosyVoice3-0.5B-2512

``full`` uses the official hyper-parameters: the checkpoints cost exactly the compute of the real
ones, so they serve the speed benchmarks. ``tiny`` shrinks every width for tests. The networks are
our own classes, built from the yaml exactly as the engine builds them; weight-normed vocoder convs
are written as the released files spell them: the legacy ``weight_g``/``weight_v`` (v1, v2) or
``parametrizations.weight.original0/1`` (v3). The committed test directories
``tests/data/models/v*-tiny`` were instead written by the official classes (see tools/golden/),
which proves our loader against the real layout and not only against this writer.

v2/v3 directories also get ``CosyVoice-BlankEN/`` with ``config.json`` (full: the Qwen2.5-0.5B
body; tiny: the 16-wide test body) and the toy tokenizer files of the tests (the official special
tokens at their official ids: enough for speed, not for real speech). There is no
``model.safetensors``: our engine takes every Qwen weight from ``llm.pt``, as the official does after
loading it (benchmarks/official_v2v3.py adds a throw-away one where the official code needs it).
v2 gets ``spk2info.pt`` (preset voices), v3 ``llm.rl.pt`` (a second, differently seeded LLM) unless
``--no-rl``. ``--out`` must be new or empty: a directory with files (a downloaded model, say) is
refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tools"))

# yaml template per version (official structure) and the key-path overrides per size
TEMPLATES = {v: ROOT / "tools" / "golden" / f"tiny_v{v}.yaml" for v in (1, 2, 3)}
BLANK_EN_TINY = ROOT / "tests" / "data" / "CosyVoice-BlankEN-tiny"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")

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
# CosyVoice2-0.5B (examples/libritts/cosyvoice2/conf/cosyvoice2.yaml; the released yaml has the same
# model parameters). The flow encoder's input/output 512 are already full size in the template.
FULL_V2 = {
    "llm_input_size": 896,
    "llm_output_size": 896,
    "flow.encoder.linear_units": 2048,
    "flow.encoder.num_blocks": 6,
    "flow.decoder.estimator.channels": "[256]",
    "flow.decoder.estimator.attention_head_dim": 64,
    "flow.decoder.estimator.n_blocks": 4,
    "flow.decoder.estimator.num_mid_blocks": 12,
    "flow.decoder.estimator.num_heads": 8,
    "hift.base_channels": 512,
    "hift.f0_predictor.cond_channels": 512,
}
# Fun-CosyVoice3-0.5B-2512 (examples/libritts/cosyvoice3/conf/cosyvoice3.yaml)
FULL_V3 = {
    "llm_input_size": 896,
    "llm_output_size": 896,
    "flow.pre_lookahead_layer.channels": 1024,
    "flow.decoder.estimator.dim": 1024,
    "flow.decoder.estimator.depth": 22,
    "flow.decoder.estimator.heads": 16,
    "flow.decoder.estimator.dim_head": 64,
    "hift.base_channels": 512,
    "hift.f0_predictor.cond_channels": 512,
}
SIZES = {
    (1, "full"): FULL_V1,
    (1, "tiny"): {},
    (2, "full"): FULL_V2,
    (2, "tiny"): {},
    (3, "full"): FULL_V3,
    (3, "tiny"): {},
}
# CosyVoice-BlankEN/config.json: the Qwen2.5-0.5B body (full); tiny copies the test body's file
QWEN_FULL = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_window_layers": 24,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "sliding_window": 32768,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
MODEL_NAMES = {
    (1, "base"): "CosyVoice-300M",
    (1, "sft"): "CosyVoice-300M-SFT",
    (1, "instruct"): "CosyVoice-300M-Instruct",
    2: "CosyVoice2-0.5B",
    3: "Fun-CosyVoice3-0.5B-2512",
}
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
                comment = rest[rest.index("#") :] if "#" in rest else ""
                line = f"{match.group(1)}{key}: {overrides[path]}" + (
                    f" {comment}" if comment else ""
                )
                used.add(path)
        out.append(line)
    missing = set(overrides) - used
    if missing:
        raise SystemExit(f"template lacks keys: {sorted(missing)}")
    return "\n".join(out) + "\n"


def _legacy_weight_norm(
    state: dict[str, torch.Tensor], hift: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Write weight-normed convs as the released hift.pt does: weight_g (norm) + weight_v."""
    from cosyvoice_lite.networks.hift import FoldedWeightNorm

    out = dict(state)
    for name, module in hift.named_modules():
        if isinstance(module, FoldedWeightNorm):
            w = out.pop(f"{name}.weight")
            out[f"{name}.weight_v"] = w
            out[f"{name}.weight_g"] = torch.linalg.vector_norm(
                w.reshape(w.shape[0], -1), dim=1
            ).reshape(-1, *([1] * (w.dim() - 1)))
    return out


def _parametrized_weight_norm(
    state: dict[str, torch.Tensor], hift: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Write weight-normed convs as the released CosyVoice3 hift.pt does (torch parametrizations):
    ``parametrizations.weight.original0`` (norm g) and ``original1`` (direction v)."""
    out = _legacy_weight_norm(state, hift)
    for key in [k for k in out if k.endswith(".weight_g")]:
        name = key[: -len(".weight_g")]
        out[f"{name}.parametrizations.weight.original0"] = out.pop(f"{name}.weight_g")
        out[f"{name}.parametrizations.weight.original1"] = out.pop(f"{name}.weight_v")
    return out


def _write_blank_en(out: Path, size: str) -> None:
    """CosyVoice-BlankEN/: the Qwen2 body's config.json and the (toy) tokenizer files."""
    blank = out / "CosyVoice-BlankEN"
    blank.mkdir(exist_ok=True)
    config = json.loads((BLANK_EN_TINY / "config.json").read_text(encoding="utf-8"))
    if size == "full":
        config.update(QWEN_FULL)
    (blank / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in TOKENIZER_FILES:
        shutil.copyfile(BLANK_EN_TINY / name, blank / name)


def _save_network(network: torch.nn.Module, path: Path, hift_spelling: str | None = None) -> None:
    # state_dict keeps tied tensors (Qwen2 embed_tokens / lm_head) as one storage, as the release
    state = network.state_dict()
    if hift_spelling == "legacy":
        state = _legacy_weight_norm(state, network)
    elif hift_spelling == "parametrizations":
        state = _parametrized_weight_norm(state, network)
    torch.save({k: v.contiguous() for k, v in state.items()}, path)


def make_model(
    out: Path,
    version: int = 1,
    size: str = "tiny",
    variant: str = "sft",
    seed: int = 0,
    rl: bool = True,
    force: bool = False,
) -> Path:
    """Write a random-weight model directory; ``variant`` applies to v1, ``rl`` (llm.rl.pt) to v3.
    A directory that has files is refused (FileExistsError) unless ``force``: it may be a real
    model, whose weights this would replace with random ones."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not force and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} already exists and is not empty: name a new directory, or pass --force "
            "to write random weights over what it holds"
        )
    from make_onnx_standins import write_standins

    from cosyvoice_lite.build import build_network
    from cosyvoice_lite.config import YAML_NAMES, load_model_config

    out.mkdir(parents=True, exist_ok=True)
    yaml_text = render_yaml(TEMPLATES[version].read_text(encoding="utf-8"), SIZES[(version, size)])
    (out / YAML_NAMES[version]).write_text(yaml_text, encoding="utf-8")
    if version > 1:
        _write_blank_en(out, size)  # the Qwen2 body is built from its config.json
    config = load_model_config(out, version)
    torch.manual_seed(seed)
    spelling = "parametrizations" if version == 3 else "legacy"
    for part in ("llm", "flow", "hift"):
        network = build_network(getattr(config, part))
        _save_network(network, out / f"{part}.pt", spelling if part == "hift" else None)
        del network
    if version == 3 and rl:
        torch.manual_seed(seed + 2)
        _save_network(build_network(config.llm), out / "llm.rl.pt")
    write_standins(out, version)
    if version == 2 or (version == 1 and variant in ("sft", "instruct")):
        generator = torch.Generator().manual_seed(seed + 1)
        speakers = {
            name: {"embedding": torch.randn(1, 192, generator=generator)} for name in VOICES
        }
        torch.save(speakers, out / "spk2info.pt")
    name = MODEL_NAMES[(version, variant)] if version == 1 else MODEL_NAMES[version]
    (out / "configuration.json").write_text(
        json.dumps(
            {
                "framework": "pytorch",
                "task": "text-to-speech",
                "model": name,
                "note": "random weights generated by cosyvoice-lite tools/make_models.py",
            },
            ensure_ascii=False,
            indent=2,
        ),
        encoding="utf-8",
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", type=int, default=1, choices=sorted({v for v, _ in SIZES}))
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument(
        "--variant",
        choices=["base", "sft", "instruct"],
        default="sft",
        help="v1 release variant (v2/v3 have one)",
    )
    parser.add_argument("--no-rl", action="store_true", help="v3: do not write llm.rl.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    parser.add_argument(
        "--force", action="store_true", help="write into --out even if it has files"
    )
    args = parser.parse_args()
    try:
        out = make_model(
            args.out, args.version, args.size, args.variant, args.seed, not args.no_rl, args.force
        )
    except FileExistsError as exc:
        raise SystemExit(f"make_models.py: {exc}") from None
    print(out)


if __name__ == "__main__":
    main()
