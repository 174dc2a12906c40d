"""int8 linear layers: onnxruntime MatMulNBits (the block quantisation, the one-layer graph, the
products against the dequantised weights) and the W8A8 layer of the flows (its products against
float32, and a row's result independent of the others)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from cosyvoice_lite.quantized_linear import (
    BLOCK,
    CODES,
    Int8Linear,
    Int8MatmulLinear,
    _graph,
    quantize_blocks,
)


def test_block_codes_round_trip_within_half_a_step() -> None:
    weight = torch.randn(24, 300, generator=torch.Generator().manual_seed(0))
    weight[3] = 0  # an all-zero row stays zero
    codes, scales = quantize_blocks(weight)
    blocks = -(-300 // BLOCK)
    assert codes.shape == (24, blocks, BLOCK) and codes.dtype == np.uint8
    assert scales.shape == (24 * blocks,) and scales.dtype == np.float32
    values = (codes.astype(np.float32) - 128) * scales.reshape(24, blocks, 1)
    restored = torch.from_numpy(values.reshape(24, -1)[:, :300])
    step = torch.from_numpy(np.repeat(scales.reshape(24, blocks), BLOCK, axis=1)[:, :300])
    assert ((restored - weight).abs() <= step / 2 + 1e-7).all()
    assert (codes.reshape(24, -1)[:, 300:] == 128).all()  # the padding codes zero
    assert (restored[3] == 0).all()


def test_graph_is_valid_onnx_with_the_codes_outside() -> None:
    model, codes = _graph(nn.Linear(200, 96), BLOCK)
    proto = onnx.load_from_string(model)
    matmul, add = proto.graph.node
    assert (matmul.op_type, matmul.domain, add.op_type) == ("MatMulNBits", "com.microsoft", "Add")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in matmul.attribute}
    assert attributes == {"K": 200, "N": 96, "bits": 8, "block_size": BLOCK, "accuracy_level": 4}
    weight = proto.graph.initializer[0]
    assert weight.data_location == onnx.TensorProto.EXTERNAL and not weight.raw_data
    assert {e.key: e.value for e in weight.external_data}["location"] == CODES
    assert list(weight.dims) == list(codes.shape) and len(model) < codes.nbytes


@pytest.mark.parametrize("bias", [True, False])
def test_products_match_the_dequantised_weights(bias: bool) -> None:
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(200, 96, bias=bias)
    layer = Int8Linear(linear, threads=2)
    codes, scales = quantize_blocks(linear.weight)
    values = (codes.astype(np.float32) - 128) * scales.reshape(96, -1, 1)
    dequantised = torch.from_numpy(values.reshape(96, -1)[:, :200])
    x = torch.randn(3, 5, 200, generator=g)
    expected = nn.functional.linear(x, dequantised, linear.bias)
    out = layer(x)
    assert out.shape == (3, 5, 96) and out.dtype == torch.float32
    # activations are quantised per block of each row: an error well under 1% of the outputs
    assert (out - expected).abs().max() < 0.01 * expected.abs().max()
    # a row's activation scales are its own: alone (a vector) it gives the batch's result
    assert torch.equal(layer(x[1, 2]), out[1, 2])
    assert layer.nbytes == codes.nbytes + scales.nbytes + (4 * 96 if bias else 0)


@pytest.mark.parametrize("shape", [(64, 32), (200, 96), (896, 896)])
def test_a_row_is_bit_identical_alone_and_in_any_batch(shape: tuple[int, int]) -> None:
    """``MatMulNBits`` computes rows two at a time, and a row left over (a lone row, the last of
    an odd count) on another path: up to ~5e-7 apart here, enough to flip the next layer's
    activation codes and an LLM's tokens. The layer pairs a leftover row with its copy, so a
    row's output is the same bits alone, as a vector, and anywhere in a batch of any size."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    layer = Int8Linear(nn.Linear(*shape), threads=2)
    scales = torch.tensor([1.0, 0.01, 100.0, 3.0, 0.5]).unsqueeze(-1)
    rows = torch.randn(5, shape[0], generator=g) * scales
    alone = torch.cat([layer(rows[i : i + 1]) for i in range(5)])
    assert alone.shape == (5, shape[1])
    assert torch.equal(layer(rows[4]), alone[4])
    for order in ([0, 1], [3, 0], [2, 4, 1], [4, 3, 2, 1], [0, 1, 2, 3, 4], [1, 0, 4, 2, 3]):
        assert torch.equal(layer(rows[order]), alone[order]), order


def test_many_layers_do_not_spin_whatever_the_wait_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer is a session with its own thread pool: with torch's default OpenMP wait policy
    (no ``OMP_WAIT_POLICY=PASSIVE``) the pools once spun, and an LLM's ~100 spinning pools took
    a full-size decoding step from 28 ms to 2.1 s. A pass through these 48 layers took ~4 ms, and
    ~92 ms with spinning pools."""
    import time

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    torch.manual_seed(0)
    layers = [Int8Linear(nn.Linear(896, 896), threads=2) for _ in range(48)]
    x = torch.randn(1, 896)

    def one_pass() -> float:
        start = time.perf_counter()
        for layer in layers:
            layer(x)
        return time.perf_counter() - start

    one_pass()
    times = sorted(one_pass() for _ in range(5))
    assert times[2] < 0.04, times  # the median


@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_products_close_to_float32(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(300, 70, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(70, 300, generator=g) * 0.05)
        linear.weight[5] = 0  # an all-zero output channel stays zero
    layer = Int8MatmulLinear(linear)
    assert layer.codes.dtype == torch.int8 and layer.codes.shape == (300, 70)
    x = torch.randn(2, 9, 300, generator=g) * torch.linspace(0.01, 10, 9).unsqueeze(-1)
    with torch.inference_mode():
        want, got = linear(x), layer(x)
        assert got.shape == (2, 9, 70) and got.dtype == torch.float32
        # 8 bits for the weights and for each row: ~1% of each row's output
        error = (got - want).norm(dim=-1) / want.norm(dim=-1)
        assert float(error.max()) < 0.02
        assert torch.equal(got[..., 5], want[..., 5])  # the bias (or 0) alone
        low = layer(x.bfloat16())  # the dtype of the input comes back
        assert low.dtype == torch.bfloat16
        assert float((low.float() - want).norm() / want.norm()) < 0.03


def test_w8a8_row_results_do_not_depend_on_the_batch() -> None:
    """Each row has its own activation scale and the sums are integers: a row's output is the
    same alone, in any batch, next to padding of any size or value, and a zero row gives the bias."""
    g = torch.Generator().manual_seed(1)
    layer = Int8MatmulLinear(nn.Linear(64, 32))
    rows = torch.randn(5, 64, generator=g) * torch.tensor([[0.1], [1.0], [100.0], [0.0], [3.0]])
    with torch.inference_mode():
        batch = layer(rows)
        for index in range(5):
            assert torch.equal(layer(rows[index : index + 1]), batch[index : index + 1])
        padded = torch.cat([rows[1:2], torch.full((7, 64), 1e4)])
        assert torch.equal(layer(padded)[:1], batch[1:2])
        assert torch.equal(batch[3], layer.bias)


@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_kernels_give_the_same_floats(bias: bool) -> None:
    """onnxruntime's ``MatMulInteger`` (the kernel on CPUs without VNNI/AMX) sums the same codes
    as ``torch._int_mm`` exactly: full-range codes (-127..127 on both sides, where a u8s8 kernel
    would saturate), rows of any scale, a zero row, any batch, float32 or bfloat16 in."""
    g = torch.Generator().manual_seed(2)
    linear = nn.Linear(256, 48, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 256, generator=g).sign() * 0.05)  # all codes +-127
    rows = (
        torch.randn(7, 256, generator=g).sign() * torch.tensor([0.1, 1, 100, 0, 3, 5, 7])[:, None]
    )
    torch_kernel = Int8MatmulLinear(linear, "torch")
    ort_kernel = Int8MatmulLinear(linear, "onnxruntime")
    assert not hasattr(ort_kernel, "codes")  # the codes live in onnxruntime only
    with torch.inference_mode():
        for x in (rows, rows.reshape(7, 1, 256), rows[2:3], rows.bfloat16()):
            assert torch.equal(ort_kernel(x), torch_kernel(x))
    with pytest.raises(ValueError, match="kernel"):
        Int8MatmulLinear(linear, "numpy")
