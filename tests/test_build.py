"""Networks built for a strict checkpoint load (build.build_for_checkpoint) and loaded from the
checkpoint's pages (modeldir.assign_state, copy_out_of_file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosyvoice_lite.build import SkipInit, build_for_checkpoint, build_network
from cosyvoice_lite.device import resolve_placement
from cosyvoice_lite.modeldir import copy_out_of_file, load_checkpoint, load_strict, open_model_dir
from cosyvoice_lite.pipelines.factory import fix_schedule, load_network

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


def test_constructor_made_tensors_keep_their_values() -> None:
    """The flow's fixed noise is a non-persistent buffer that only its constructor makes (from
    its own generator, no initialiser): built uninitialised, it is the usual build's."""
    model = open_model_dir(MODELS / "v2-tiny")
    flow = build_for_checkpoint(model.config.flow)
    expected = build_network(model.config.flow)
    assert torch.equal(flow.decoder.rand_noise, expected.decoder.rand_noise)


class _InitialisedBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 4)
        self.register_buffer("noise", torch.nn.init.normal_(torch.zeros(5)), persistent=False)


def test_a_buffer_made_by_a_skipped_initialiser_is_detected() -> None:
    """A non-persistent buffer filled by a skipped initialiser would keep its allocation's
    values: ``build_for_checkpoint`` builds such a network again, with its initialisers."""
    from cosyvoice_lite.build import uses_skipped

    skip = SkipInit()
    with skip:
        module = _InitialisedBuffer()
    assert torch.equal(module.noise, torch.zeros(5))
    assert uses_skipped(module, skip.skipped)
    skip = SkipInit()
    with skip:
        plain = torch.nn.Linear(3, 4)
    assert not uses_skipped(plain, skip.skipped)  # all its tensors are in its state dict


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


def _in_mapping(tensor: torch.Tensor, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``tensor`` lies in the pages of ``state``'s memory-mapped checkpoint."""
    storages = [t.untyped_storage() for t in state.values()]
    low = min(s.data_ptr() for s in storages)
    high = max(s.data_ptr() + s.nbytes() for s in storages)
    return low <= tensor.untyped_storage().data_ptr() < high


def test_an_assigned_load_takes_the_files_pages_then_copies_what_is_left() -> None:
    """``assign=True``: the network's tensors are the checkpoint's own pages (the load-time
    kernels copy from there), with the usual load's values and ties; ``copy_out_of_file`` then
    gives every tensor still there its own memory, the values and ties unchanged."""
    model = open_model_dir(MODELS / "v2-tiny")
    path = model.path / "llm.pt"
    state = load_checkpoint(path)
    usual = build_network(model.config.llm)
    load_strict(usual, state, path)
    network = build_for_checkpoint(model.config.llm)
    load_strict(network, state, path, assign=True)
    assert all(_in_mapping(t, state) for t in network.state_dict().values())
    table = network.llm.model.model.embed_tokens.weight
    assert network.llm.model.lm_head.weight is table
    copied = copy_out_of_file(network, state)
    assert copied == sum(t.numel() * t.element_size() for t in network.parameters())
    assert not any(_in_mapping(t, state) for t in network.state_dict().values())
    assert network.llm.model.lm_head.weight is network.llm.model.model.embed_tokens.weight
    for (name, a), (_, b) in zip(
        usual.state_dict().items(), network.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert copy_out_of_file(network, state) == 0


def test_an_assigned_load_keeps_the_networks_dtype(tmp_path: Path) -> None:
    """A checkpoint saved in another dtype is cast on the way in, as a copying load does."""
    saved = torch.nn.Linear(3, 4).to(torch.bfloat16)
    torch.save(saved.state_dict(), tmp_path / "layer.pt")
    state = load_checkpoint(tmp_path / "layer.pt")
    layer = torch.nn.Linear(3, 4)
    load_strict(layer, state, tmp_path / "layer.pt", assign=True)
    assert layer.weight.dtype == torch.float32 and layer.weight.requires_grad
    assert torch.equal(layer.weight, saved.weight.float())


def test_the_engines_flow_releases_its_time_weights_before_they_leave_the_file() -> None:
    """``fix_schedule`` runs as the flow's ``finish`` step: the time table computed, the
    weights only it reads released (never copied out of the checkpoint's pages)."""
    model = open_model_dir(MODELS / "v3-tiny")
    placement = resolve_placement("cpu", "float32")
    flow = load_network(
        model, "flow", "flow.pt", placement, finish=lambda flow: fix_schedule(flow, 4)
    )
    estimator = flow.decoder.estimator
    assert flow.decoder.steps == 4
    assert all(p.numel() == 0 for m in estimator.time_modules() for p in m.parameters())


def test_an_assigned_load_keeps_the_networks_layout(tmp_path: Path) -> None:
    """A checkpoint holding a strided view (a transposed tensor's storage) gives a contiguous
    weight, as a copying load does."""
    weight = torch.randn(3, 4).t()  # [4, 3], not contiguous
    torch.save({"weight": weight, "bias": torch.zeros(4)}, tmp_path / "layer.pt")
    state = load_checkpoint(tmp_path / "layer.pt")
    assert not state["weight"].is_contiguous()
    layer = torch.nn.Linear(3, 4)
    load_strict(layer, state, tmp_path / "layer.pt", assign=True)
    assert layer.weight.is_contiguous() and torch.equal(layer.weight, weight)


@pytest.mark.parametrize("units", [-128, 10**13])
def test_sizes_torch_cannot_build_are_a_model_dir_error(units: int) -> None:
    """A negative or absurd size in the yaml was torch's raw RuntimeError (a negative
    dimension; an allocation of petabytes) out of the load."""
    from cosyvoice_lite.config import Component
    from cosyvoice_lite.errors import ModelDirError

    encoder = open_model_dir(MODELS / "v1-tiny").config.llm.child("text_encoder")
    damaged = Component(encoder.class_name, {**encoder.kwargs, "linear_units": units})
    with pytest.raises(ModelDirError, match=f"yaml arguments for {encoder.class_name}"):
        build_for_checkpoint(damaged)
