"""Linear layers that read the same input, optionally fused into one product after loading.

A network class names such groups in a class attribute, e.g. Qwen2's attention

    linear_groups = {"qkv": ("q_proj", "k_proj", "v_proj")}

and computes them with ``grouped(self, "qkv", x)``. As loaded (official parameter names, strict
state dicts, ONNX export) the members are separate ``nn.Linear`` layers. ``fuse_linear_groups``,
called at load for every network, replaces each group by one ``FusedLinear`` holding the
concatenated weights: a decoding step multiplies one vector by every weight once, and one call
instead of three saves the per-call cost of a small product (~0.1 ms each on a CPU, several ms per
token; a streamed flow chunk makes 560 such calls). Each output column is the same dot product as
before, so the floats do not change (full-size v2 mel, fp32: max difference 0.0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

GROUPS_ATTRIBUTE = "linear_groups"


class FusedLinear(nn.Module):
    """Several ``nn.Linear`` of one input as a single ``nn.Linear`` whose output is split back.

    The inner ``linear`` is a plain ``nn.Linear``, so the load-time precision steps (casting,
    int8 quantisation, weight packing) apply to it like to any other layer.
    """

    def __init__(self, members: Sequence[nn.Linear]) -> None:
        super().__init__()
        in_features = {m.in_features for m in members}
        if len(in_features) != 1:
            raise ValueError(f"fused layers must share their input size, got {in_features}")
        weight = torch.cat([m.weight.detach() for m in members])
        has_bias = any(m.bias is not None for m in members)
        self.sizes = tuple(m.out_features for m in members)
        # built on the meta device (no random initialisation), then given the joined weights
        self.linear = nn.Linear(
            in_features.pop(), weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype
        )
        self.linear.weight = nn.Parameter(weight)
        if has_bias:  # a member without bias (e.g. v1's linear_k) adds zeros
            bias = [
                m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                for m in members
            ]
            self.linear.bias = nn.Parameter(torch.cat(bias))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)


def grouped(module: nn.Module, group: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The outputs of ``module``'s linear group ``group`` on ``x``, in the order the group names
    them: one product when the group was fused, one per layer otherwise."""
    fused = getattr(module, group, None)
    if fused is not None:
        return fused(x)
    return tuple(
        getattr(module, name)(x) for name in getattr(type(module), GROUPS_ATTRIBUTE)[group]
    )


def fuse_linear_groups(network: nn.Module) -> nn.Module:
    """Fuse every declared linear group of ``network`` in place (after its weights are loaded).

    The members are dropped (set to None), so the fused network holds each weight once; its state
    dict no longer has the official names, which only loading and export need.
    """
    for module in list(network.modules()):
        fuse_groups(module)
    return network


def fuse_groups(module: nn.Module) -> None:
    """Fuse the linear groups ``module`` itself declares (not its children's), in place; a group
    already fused, quantised or replaced stays as it is."""
    for group, names in getattr(type(module), GROUPS_ATTRIBUTE, {}).items():
        members = [getattr(module, name) for name in names]
        if not all(type(m) is nn.Linear for m in members):
            continue
        setattr(module, group, FusedLinear(members))
        for name in names:
            setattr(module, name, None)
