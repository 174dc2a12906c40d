"""Build our networks from the typed yaml configuration and load the official checkpoints.

The yaml names official classes (``cosyvoice.flow.flow.MaskedDiffWithXvec``); this table maps each
class *name* to our own implementation. Nothing from the yaml is imported: an unknown name is an error.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

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


def build_network(spec: Component) -> torch.nn.Module:
    """Instantiate ``spec`` (children first, as HyperPyYAML does) in eval mode on the CPU.

    (Qwen2Encoder receives ``pretrain_path`` = <model>/CosyVoice-BlankEN from the yaml override and
    reads only its config.json: every Qwen weight comes from llm.pt.)"""
    kwargs: dict[str, Any] = {}
    for key, value in spec.kwargs.items():
        if isinstance(value, Component):
            kwargs[key] = build_network(value)
        elif isinstance(value, Tagged):
            continue  # !name: callables such as the sampling function: injected per request instead
        else:
            kwargs[key] = value
    try:
        return _network_class(spec.class_name)(**kwargs).eval()
    except TypeError as exc:
        raise ModelDirError(f"yaml arguments for {spec.class_name} do not fit: {exc}") from exc
    except (ValueError, RuntimeError) as exc:  # negative or absurd sizes: torch's own errors
        raise ModelDirError(f"yaml arguments for {spec.class_name} cannot build it: {exc}") from exc


def build_for_checkpoint(spec: Component) -> torch.nn.Module:
    """``build_network(spec)`` for a strict checkpoint load, without the random initialisation
    the load overwrites (``SkipInit``: 3-6 s of a full-size Qwen2 LLM's load, and the pages of a
    full-size CosyVoice3 flow, 1.3 GB, filled only to be replaced). The strict load sets every
    parameter and persistent buffer; the tensors only a constructor computes (non-persistent
    buffers such as the flow's fixed noise, plain tensor attributes) must not be ones whose
    initialisation was skipped, or the network is built again as usual."""
    skip = SkipInit()
    with skip:
        network = build_network(spec)
    rebuild = uses_skipped(network, skip.skipped)
    skip.skipped.clear()
    return build_network(spec) if rebuild else network


class SkipInit(TorchFunctionMode):
    """Tensor initialisers (what ``torch.nn.init`` calls in a module's constructor) leave the
    tensor as allocated; ``skipped`` collects the tensors left so. A mode
    rather than patched functions: it applies to this thread only."""

    # torch.nn.init's functions (a mode sees them whole) and the tensor methods they end in
    SKIPPED = frozenset(
        {
            "uniform_",
            "normal_",
            "trunc_normal_",
            "kaiming_uniform_",
            "kaiming_normal_",
            "xavier_uniform_",
            "xavier_normal_",
            "orthogonal_",
        }
    )

    def __init__(self) -> None:
        super().__init__()
        # held, not just their addresses: a freed one's address could be reused by a tensor
        # made later in the build (seen with the vocoder's window)
        self.skipped: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if getattr(func, "__name__", None) in self.SKIPPED:
            tensor = args[0] if args else (kwargs or {}).get("tensor")
            self.skipped.append(tensor)
            return tensor
        return func(*args, **(kwargs or {}))


def uses_skipped(network: torch.nn.Module, skipped: list[torch.Tensor]) -> bool:
    """Whether a tensor outside ``network``'s state dict shares memory with one whose
    initialiser was skipped (empty tensors, which have no memory, never do)."""
    addresses = {t.untyped_storage().data_ptr() for t in skipped if t.numel()}
    for module in network.modules():
        made = [module._buffers[name] for name in module._non_persistent_buffers_set]
        made += [value for value in vars(module).values() if isinstance(value, torch.Tensor)]
        if any(
            t is not None and t.numel() and t.untyped_storage().data_ptr() in addresses
            for t in made
        ):
            return True
    return False
