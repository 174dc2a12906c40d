"""int8 linear layers: two kernels, for the two ways a layer is used.

``Int8Linear``, for decoding (the LLM): onnxruntime's ``MatMulNBits`` (8-bit, block-wise weights).
An LLM decoding step multiplies one activation row by every weight once, so int8 weights halve the
bytes it reads against bfloat16. torch's own int8 path (``quantize_dynamic``: per-channel weights,
one activation scale per call, fbgemm) streams them slowly at one row and loses accuracy over a
prefill of rows of very different scales. onnxruntime's contrib ``MatMulNBits`` (maintained for
LLM inference on CPUs, VNNI/AVX-512 kernels) keeps a scale per block of ``BLOCK`` input weights
and, at ``accuracy_level=4``, quantises each activation block on the fly and multiplies in int8.
Measured against torch's int8 layers (full-size CosyVoice2 LLM, 2 threads, benchmarks/README.md):
a decoding step 11-35% faster (runs alternated; before the row pairing below, which takes 10-15%
back), teacher-forced log-probability error 2-4x smaller (full size: 0.006 nats mean, as close to
float32 as bfloat16). Each layer is one small onnxruntime session: ``MatMulNBits`` (+ ``Add`` for
a bias) over float32 rows ``[M, in_features]``, any M, so prefill, single steps and batched steps
all run through it.

A row's result is the same bits whatever rows share its call (tests/test_quantized_linear.py),
so these layers do not make a request's tokens depend on its batch. ``MatMulNBits`` computes rows
two at a time and a row left over (a lone row, the last of an odd count) on another path, up to
7.2e-7 apart, which the next layer's block-wise activation codes can turn into a whole
quantisation step (0.28 nats; tokens diverged). So ``Int8Linear`` pairs a leftover row with a
copy of itself and keeps the first result: every row takes the two-row path. Measured, full size,
2 threads, on a loaded machine (benchmarks/README.md): a one-row decoding step costs 11-15% more
(CosyVoice2; 9-10% CosyVoice-300M) than on the one-row path.

``Int8MatmulLinear``, for many rows at once (the flow estimators: hundreds of frames per call,
bound by arithmetic, not by reading weights): int8 weights with a scale per output channel,
each activation row quantised on the fly with its own scale, and the product in int8 with int32
sums. Two kernels give the same integers, hence the same floats: ``torch._int_mm`` (oneDNN's
VNNI/AMX kernels: ~410 GOP/s on one core of an AVX-512 VNNI CPU against ~195 GFLOP/s for
bfloat16, 445 x 1024 x 2048) and, on a CPU without VNNI or AMX (where ``torch._int_mm`` crawls at
~0.7 GOP/s), onnxruntime's ``MatMulInteger`` over codes shifted by 128 to uint8 with zero points
128 (its AVX2 u8u8 kernel: exact int32 sums, ~170-200 GOP/s on 2 AVX2 cores against ~100-120
GFLOP/s float32; the signed u8s8 kernel saturates its 16-bit pair sums there). A row's scale is
its own, and integer sums are exact, so a row's result never depends on the other rows, on
padding or on the batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import DeviceError
from .onnx_threads import session_options

BLOCK = 128  # input weights per scale; onnxruntime's fast CPU path wants a power of two >= 16
ACCURACY_LEVEL = 4  # int8 activations and int8 dot products (VNNI where the CPU has it)
MIN_ONNXRUNTIME = "1.22"  # the first with 8-bit MatMulNBits kernels on the CPU
CODES = "codes.bin"  # the name the graph gives its int8 weights, passed from memory
_TINY = torch.finfo(torch.float32).tiny  # W8A8: a row of zeros gets scale tiny, codes 0


def quantize_blocks(weight: torch.Tensor, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit block quantisation of a [N, K] weight as ``MatMulNBits`` stores it: uint8
    codes [N, ceil(K / block), block] (zero point 128; K padded with zeros) and float32 scales
    [N * ceil(K / block)], so that weight ~= (code - 128) * scale within each block."""
    n, k = weight.shape
    blocks = -(-k // block)
    padded = F.pad(weight.detach().to("cpu", torch.float32), (0, blocks * block - k))
    codes, scale = symmetric_codes(padded.view(n, blocks, block))
    codes = codes.add_(128).to(torch.uint8)  # the float copy made by F.pad goes with the return
    return codes.numpy(), scale.reshape(-1).numpy()


def symmetric_codes(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit quantisation along the last dim of float32 ``values`` (overwritten): the
    codes, rounded floats in [-127, 127], and the scales [...], so that values ~= codes * scale."""
    scale = torch.maximum(values.amax(-1), -values.amin(-1)) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all zeros stay zero
    return values.div_(scale.unsqueeze(-1)).round_().clamp_(-127, 127), scale


# The one-layer graph, written as ONNX protobuf bytes directly: the ``onnx`` package is not a
# dependency of the engine (only of export). Field numbers are onnx.proto's.
_FLOAT, _UINT8, _INT32, _INT_ATTRIBUTE, _EXTERNAL = 1, 2, 6, 2, 1
IR_VERSION = 8


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    value = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _tensor(name: str, array: np.ndarray, data_type: int, external: str | None = None) -> bytes:
    """TensorProto: inline raw data, or a reference to external data ``external``."""
    proto = b"".join(_int(1, d) for d in array.shape) + _int(2, data_type) + _bytes(8, name)
    if external is None:
        return proto + _bytes(9, array.tobytes())
    entries = (("location", external), ("offset", "0"), ("length", str(array.nbytes)))
    proto += b"".join(_bytes(13, _bytes(1, k) + _bytes(2, v)) for k, v in entries)
    return proto + _int(14, _EXTERNAL)


def _value_info(name: str, rows: str, width: int, data_type: int = _FLOAT) -> bytes:
    """ValueInfoProto of a [rows, width] tensor (``rows`` symbolic), float32 by default."""
    shape = _bytes(1, _bytes(2, rows)) + _bytes(1, _int(1, width))
    return _bytes(1, name) + _bytes(2, _bytes(1, _int(1, data_type) + _bytes(2, shape)))


def _node(op: str, inputs: list[str], output: str, domain: str = "", **ints: int) -> bytes:
    attributes = b"".join(
        _bytes(5, _bytes(1, key) + _int(3, value) + _int(20, _INT_ATTRIBUTE))
        for key, value in ints.items()
    )
    proto = b"".join(_bytes(1, name) for name in inputs) + _bytes(2, output)
    return proto + _bytes(4, op) + attributes + (_bytes(7, domain) if domain else b"")


def _graph(linear: nn.Linear, block: int) -> tuple[bytes, np.ndarray]:
    """The serialised one-layer ONNX model and its int8 codes, which the model names as external
    data (``CODES``): given from memory at session creation, onnxruntime keeps only its packed
    copy, where a tensor inside the model would stay in memory twice (measured: 10 vs 19 MiB for
    an 8.3 MiB layer)."""
    k, n = linear.in_features, linear.out_features
    codes, scales = quantize_blocks(linear.weight, block)
    product = "y" if linear.bias is None else "product"
    attributes = {"K": k, "N": n, "bits": 8, "block_size": block, "accuracy_level": ACCURACY_LEVEL}
    nodes = [_node("MatMulNBits", ["x", "B", "scales"], product, "com.microsoft", **attributes)]
    initializers = [_tensor("B", codes, _UINT8, CODES), _tensor("scales", scales, _FLOAT)]
    if linear.bias is not None:
        bias = linear.bias.detach().to("cpu", torch.float32).numpy()
        initializers.append(_tensor("bias", bias, _FLOAT))
        nodes.append(_node("Add", [product, "bias"], "y"))
    inputs, outputs = _value_info("x", "rows", k), _value_info("y", "rows", n)
    return _model(nodes, initializers, inputs, outputs), codes


def _model(nodes: list[bytes], initializers: list[bytes], x: bytes, y: bytes) -> bytes:
    """A serialised one-graph ModelProto: ``nodes`` from input ``x`` to output ``y``."""
    graph = (
        b"".join(_bytes(1, node) for node in nodes)
        + _bytes(2, "int8_linear")
        + b"".join(_bytes(5, tensor) for tensor in initializers)
        + _bytes(11, x)
        + _bytes(12, y)
    )
    opsets = _bytes(8, _bytes(1, "") + _int(2, 17)) + _bytes(
        8, _bytes(1, "com.microsoft") + _int(2, 1)
    )
    return _int(1, IR_VERSION) + opsets + _bytes(7, graph)


def _session(model: bytes, threads: int, codes: np.ndarray):  # noqa: ANN202 - onnxruntime's type
    """An onnxruntime CPU session of a one-layer ``model`` whose int8 weights (``CODES``) are
    given from memory: onnxruntime keeps only its packed copy, where a tensor inside the model
    would stay in memory twice (measured: 10 vs 19 MiB for an 8.3 MiB layer)."""
    import onnxruntime as ort

    options = session_options(threads)
    # no memory arena: one per layer would keep its peak (prefill) rows for good
    options.enable_cpu_mem_arena = False
    # never spin in a pool of its own: each layer would have one, and spinning pools per layer
    # (~100 for an LLM) fight over the cores. Measured, full-size v2, 2 threads: 2.1 s per
    # decoding step with spinning pools (torch's default wait policy, or GOMP_SPINCOUNT set)
    # against 28 ms without. The process's shared pool (onnx_threads.py) spins, the one pool.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        options.add_external_initializers_from_files_in_memory(
            [CODES], [codes.reshape(-1)], [codes.nbytes]
        )
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own pybind exception types
        raise DeviceError(
            f"int8 needs onnxruntime >= {MIN_ONNXRUNTIME} with its 8-bit CPU kernels "
            f"(installed: {ort.__version__}): {err}"
        ) from err


class Int8Linear(nn.Module):
    """An ``nn.Linear`` with 8-bit block-quantised weights, computed by onnxruntime on the CPU.

    Takes and returns float32 ``[..., in_features]`` / ``[..., out_features]`` (also a single
    vector). ``threads``: onnxruntime's intra-op threads for this layer, the process's torch
    thread count (chosen once at load).
    """

    computes_outside_torch = True  # onnxruntime, from numpy: no torch trace can record it

    def __init__(self, linear: nn.Linear, threads: int, block: int = BLOCK) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        model, codes = _graph(linear, block)
        bias = 0 if linear.bias is None else 4 * linear.bias.numel()
        self.nbytes = codes.nbytes + 4 * codes.shape[0] * codes.shape[1] + bias  # what a call reads
        self._session = _session(model, threads, codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # shapes changed on the numpy side: an LLM step makes ~100 of these calls, and each torch
        # view or cast costs a dispatch (15 -> 10-12 us a call around onnxruntime's own ~9 us)
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        rows = x.detach().numpy().reshape(-1, self.in_features)
        count = len(rows)
        if count % 2:  # rows go in pairs, a leftover one with its copy (the module's docstring)
            (y,) = self._session.run(None, {"x": np.concatenate((rows, rows[-1:]))})
            y = y[:count]
        else:
            (y,) = self._session.run(None, {"x": rows})
        return torch.from_numpy(y.reshape(*x.shape[:-1], self.out_features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8MatmulLinear(nn.Module):
    """An ``nn.Linear`` computed in int8 for inputs of many rows (W8A8, dynamic per row).

    The weight is stored as int8 codes with a float32 scale per output channel (symmetric, 127
    steps); each call quantises every input row with its own scale (its largest magnitude / 127),
    multiplies codes by codes with int32 sums (``torch._int_mm``) and rescales by both scales.
    Takes and returns ``[..., in_features]`` / ``[..., out_features]`` in the input's dtype.
    """

    def __init__(self, linear: nn.Linear, kernel: str = "torch") -> None:
        """``kernel``: "torch" (``torch._int_mm``) or "onnxruntime" (``MatMulInteger``, one
        thread: the flows' rows already run on a thread per core, row_parallel.py)."""
        super().__init__()
        if kernel not in INT8_PRODUCT_KERNELS:
            raise ValueError(f"kernel must be one of {INT8_PRODUCT_KERNELS}, got {kernel!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = kernel
        codes, scale = symmetric_codes(linear.weight.detach().to(torch.float32, copy=True))
        self.register_buffer("scale", scale)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))
        if kernel == "torch":
            # [in, out] as the transpose of the [out, in] codes: oneDNN reads it without a copy
            self.register_buffer("codes", codes.to(torch.int8).t())
            return
        shifted = codes.t().add_(128).to(torch.uint8).contiguous().numpy()  # [in, out]
        self._session = _session(_integer_graph(self.in_features, self.out_features), 1, shifted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.float32)
        row_scale = rows.abs().amax(dim=1, keepdim=True).div_(127).clamp_min_(_TINY)
        codes = torch.round(rows / row_scale)  # |x / scale| <= 127 by construction
        if self.kernel == "torch":
            sums = torch._int_mm(codes.to(torch.int8), self.codes)
        else:
            shifted = codes.add_(128).to(torch.uint8).contiguous().detach().numpy()
            sums = torch.from_numpy(self._session.run(None, {"x": shifted})[0])
        out = sums.to(torch.float32).mul_(row_scale)
        out = (
            out.mul_(self.scale) if self.bias is None else torch.addcmul(self.bias, out, self.scale)
        )
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def computes_outside_torch(self) -> bool:
        """onnxruntime's kernel runs from numpy: no torch trace can record it."""
        return self.kernel != "torch"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int8 w8a8 "
            f"({self.kernel})"
        )


INT8_PRODUCT_KERNELS = ("torch", "onnxruntime")


def _integer_graph(k: int, n: int) -> bytes:
    """One ``MatMulInteger``: uint8 rows [M, k] times the uint8 weight codes [k, n] (``CODES``,
    given from memory), both with zero point 128, into exact int32 sums [M, n]."""
    point = np.array(128, dtype=np.uint8)
    initializers = [
        _tensor("B", np.empty((k, n), np.uint8), _UINT8, CODES),
        _tensor("x_zero", point, _UINT8),
        _tensor("B_zero", point, _UINT8),
    ]
    nodes = [_node("MatMulInteger", ["x", "B", "x_zero", "B_zero"], "y")]
    x, y = _value_info("x", "rows", k, _UINT8), _value_info("y", "rows", n, _INT32)
    return _model(nodes, initializers, x, y)
