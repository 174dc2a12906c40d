"""Networks built for a strict checkpoint load (build.build_for_checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosyvoice_lite.build import SkipInit, build_for_checkpoint, build_network
from cosyvoice_lite.modeldir import load_checkpoint, load_strict, open_model_dir

MODELS = Path(__file__).resolve().parent / "data" / "models"


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_llm_built_uninitialised_loads_the_same_weights(version: int) -> None:
    """The LLMs hold nothing outside their state dict: built without initialising, loaded
    strictly, every tensor equals the usual build's, and tied weights stay tied."""
    model = open_model_dir(MODELS / f"v{version}-tiny")
    state = load_checkpoint(model.path / "llm.pt")
    usual, fast = build_network(model.config.llm), build_for_checkpoint(model.config.llm)
    for network in (usual, fast):
        load_strict(network, state, model.path / "llm.pt")
    assert all(t.device.type == "cpu" for t in fast.state_dict().values())
    for (name, a), (_, b) in zip(
        usual.state_dict().items(), fast.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    if version > 1:  # Qwen2's lm_head shares the text table
        assert fast.llm.model.lm_head.weight is fast.llm.model.model.embed_tokens.weight


def test_a_network_with_constructor_made_tensors_is_built_as_usual() -> None:
    """The flow's fixed noise is a non-persistent buffer: only its constructor makes it."""
    model = open_model_dir(MODELS / "v2-tiny")
    flow = build_for_checkpoint(model.config.flow)
    expected = build_network(model.config.flow)
    assert torch.equal(flow.decoder.rand_noise, expected.decoder.rand_noise)


def test_skip_init_leaves_tensors_as_allocated() -> None:
    weight = torch.zeros(4, 3)
    with SkipInit():
        torch.nn.init.kaiming_uniform_(weight)
        torch.nn.init.normal_(weight)
        weight.uniform_()
        layer = torch.nn.Linear(3, 4)  # its reset_parameters skipped too
    assert torch.equal(weight, torch.zeros(4, 3))
    assert layer.weight.shape == (4, 3)
    torch.nn.init.normal_(weight)  # outside the mode, initialisers work again
    assert weight.abs().sum() > 0
