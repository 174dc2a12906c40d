"""Build our networks from the typed yaml configuration and load the official checkpoints.

The yaml names official classes (``cosyvoice.flow.flow.MaskedDiffWithXvec``); this table maps each
class *name* to our own implementation. Nothing from the yaml is imported: an unknown name is an error.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import Component, Tagged
from .errors import ModelDirError

# official class name -> (our module, our class)
NETWORKS: dict[str, tuple[str, str]] = {
    "TransformerLM": ("transformer_lm", "TransformerLM"),
    "ConformerEncoder": ("conformer", "ConformerEncoder"),
    "TransformerEncoder": ("conformer", "TransformerEncoder"),
    "MaskedDiffWithXvec": ("flow_v1", "MaskedDiffWithXvec"),
    "InterpolateRegulator": ("flow_v1", "InterpolateRegulator"),
    "ConditionalCFM": ("flow_matching", "ConditionalCFM"),
    "CausalConditionalCFM": ("flow_matching", "CausalConditionalCFM"),
    "ConditionalDecoder": ("unet", "ConditionalDecoder"),
    "CausalConditionalDecoder": ("unet", "CausalConditionalDecoder"),
    "HiFTGenerator": ("hift", "HiFTGenerator"),
    "ConvRNNF0Predictor": ("hift", "ConvRNNF0Predictor"),
    "CausalHiFTGenerator": ("hift_causal", "CausalHiFTGenerator"),
    "CausalConvRNNF0Predictor": ("hift_causal", "CausalConvRNNF0Predictor"),
    "Qwen2LM": ("qwen2_lm", "Qwen2LM"),
    "CosyVoice3LM": ("qwen2_lm", "CosyVoice3LM"),
    "Qwen2Encoder": ("qwen2", "Qwen2Encoder"),
    "CausalMaskedDiffWithXvec": ("flow_v2", "CausalMaskedDiffWithXvec"),
    "UpsampleConformerEncoder": ("flow_v2", "UpsampleConformerEncoder"),
    "CausalMaskedDiffWithDiT": ("flow_v3", "CausalMaskedDiffWithDiT"),
    "PreLookaheadLayer": ("flow_v3", "PreLookaheadLayer"),
    "DiT": ("dit", "DiT"),
}


def _network_class(name: str) -> type[torch.nn.Module]:
    if name not in NETWORKS:
        raise ModelDirError(f"the yaml names a network cosyvoice-lite does not implement: {name}")
    module, cls = NETWORKS[name]
    return getattr(importlib.import_module(f"cosyvoice_lite.networks.{module}"), cls)


def build_network(spec: Component, model_dir: Path | None = None) -> torch.nn.Module:
    """Instantiate ``spec`` (children first, as HyperPyYAML does) in eval mode on the CPU."""
    kwargs: dict[str, Any] = {}
    for key, value in spec.kwargs.items():
        if isinstance(value, Component):
            kwargs[key] = build_network(value, model_dir)
        elif isinstance(value, Tagged):
            continue  # !name: callables such as the sampling function: injected per request instead
        else:
            kwargs[key] = value
    if spec.class_name == "Qwen2Encoder":
        kwargs = {"config": read_qwen_config(model_dir)}
    try:
        return _network_class(spec.class_name)(**kwargs).eval()
    except TypeError as exc:
        raise ModelDirError(f"yaml arguments for {spec.class_name} do not fit: {exc}") from exc


def read_qwen_config(model_dir: Path | None) -> Mapping[str, Any]:
    """The Qwen2 body's hyper-parameters from CosyVoice-BlankEN/config.json (weights come from llm.pt)."""
    if model_dir is None:
        raise ModelDirError("a Qwen2-based model needs its directory for CosyVoice-BlankEN/config.json")
    path = model_dir / "CosyVoice-BlankEN" / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"cannot read {path}: {exc}") from exc
