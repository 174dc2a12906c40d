"""Precision chosen once at load: weights stored in the chosen dtype, or int8 linear layers.

Lower precision is applied to the weights themselves (not autocast over float32 weights), so a
bfloat16 model holds half the bytes and every matmul reads half the memory. The few parts that
must stay in higher precision say so themselves: a network module class may carry

    precision_exempt = {"attribute": "why it stays in its own dtype", ...}

naming child modules or buffers that keep their dtype (and are never quantised). The modules
compute in the dtype of their weights: each network casts its float inputs at its entry points.

int8 (``quantize="int8"``, CPU) replaces ``nn.Linear`` modules with the two kernels of
``quantized_linear``. The LLM's linear layers, read once per decoded token, run onnxruntime's
``MatMulNBits`` (8-bit weights with a scale per block of 128, activations quantised per block on
the fly, VNNI where the CPU has it) on float32 activations, so the LLM keeps float32 everywhere
else. In the flow, the products that multiply every frame run W8A8 (``Int8MatmulLinear``: int8
weights and per-row int8 activations, int32 sums) where a network module declares that it pays:

    int8_products = "why"

on its class quantises the linear layers inside that module; the rest of the flow stays in
``dtype``. The DiT (CosyVoice3) declares its attention and feed-forward; the U-Nets do not (their
products are 4x narrower: 3-4% faster for 1.5x the mel error of bfloat16, benchmarks/README.md;
on an AVX2 CPU no faster than float32). The products' kernel follows the CPU
(``int8_product_kernel``: ``torch._int_mm`` with VNNI/AMX, onnxruntime's ``MatMulInteger``
without), the same integers either way; a bfloat16 flow on AMX tiles keeps its bfloat16 products,
which are faster there.

The LLMs also get load-time kernels (``kernels=True``, what the engine uses; export keeps the
loaded modules): their declared linear groups (q/k/v, gate/up) are fused into one product each
(``networks.linear``), and on a CPU with oneDNN their float32 (unless ``exact_float32``) and
bfloat16 linear layers are ``PackedLinear``: the weight reordered once into the layout oneDNN
picks for one row (on an AVX2 CPU a float32 weight stays plain, which is that layout there, and a
batched step's few rows run as the transposed product: ``float32_layouts``). A decoding
step is a
matrix-vector product per layer, bound by reading the weights; torch's default path for one input
row streams them at less than half this machine's memory bandwidth (fp32 on one core; bf16 pays a
per-call reorder), the packed one reaches 25-37 GB/s of ~34 (benchmarks/README.md).

The vocoders' convolution weights are stored channels-last on a CPU (``channels_last_convolutions``,
``networks/conv_layout.py``): their activations then stay channels-last from layer to layer, where
torch's default layout reordered every convolution's input and output (the vocoders 1.48-1.84x
faster in bfloat16, the same floats on an AMX CPU; 1.10-1.25x in float32, within 3.5e-7 of a
waveform, so not with ``exact_float32``).

The flows' linear layers are packed too, in bfloat16 (the same floats, ~5-7% faster) and in float32
(2.1-2.7x faster products on an AVX-512 AMD CPU, whose MKL path is AVX2 code; a full-size
estimator call 1.45x (v2) and 1.8x (v3) faster; on an AVX2 CPU laid out for many rows:
``float32_layouts``). oneDNN's float32 products sum in another order
than torch's default ones, so the mel moves by ~1e-6; ``Placement.exact_float32`` keeps the
default kernels, and the official's floats, everywhere (the parity tests load that way).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .device import Placement, cpu_features, dtype_named
from .heap import release_freed_memory
from .networks.conv_layout import Conv1d, ConvTranspose1d, to_channels_last
from .networks.linear import fuse_groups, fuse_linear_groups
from .quantized_linear import Int8Linear, Int8MatmulLinear
from .row_parallel import call_on_threads

EXEMPT_ATTRIBUTE = "precision_exempt"
CONV_LAYOUT_CLASSES = (Conv1d, ConvTranspose1d)
INT8_PRODUCTS_ATTRIBUTE = "int8_products"


def exempt_names(network: nn.Module) -> dict[str, str]:
    """Dotted names of the children/buffers that keep their own dtype -> the reason."""
    names: dict[str, str] = {}
    for prefix, module in network.named_modules():
        for attribute, why in getattr(type(module), EXEMPT_ATTRIBUTE, {}).items():
            names[f"{prefix}.{attribute}" if prefix else attribute] = why
    return names


def _is_exempt(name: str, exempt: dict[str, str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exempt)


def cast_weights(network: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store every floating-point parameter and buffer in ``dtype``, except the exempt ones."""
    exempt = exempt_names(network)
    for prefix, module in network.named_modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                name = f"{prefix}.{key}" if prefix else key
                if tensor is None or not tensor.is_floating_point() or _is_exempt(name, exempt):
                    continue
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.to(dtype)
                else:
                    store[key] = tensor.to(dtype)
    return network


def tied_to_embeddings(network: nn.Module) -> set[nn.Module]:
    """Linear layers whose weight is an embedding table's (e.g. Qwen2's ``lm_head``, which
    CosyVoice never runs): quantising one would add an int8 copy of the table and untie it."""
    tables = {id(m.weight) for m in network.modules() if isinstance(m, nn.Embedding)}
    return {m for m in network.modules() if type(m) is nn.Linear and id(m.weight) in tables}


RELEASE_EVERY = 64 << 20  # bytes of layers replaced between two hand-backs of freed heap


def replace_linears(
    network: nn.Module,
    make: Callable[[nn.Linear], nn.Module],
    fuse: bool = False,
    within: Callable[[nn.Module], bool] | None = None,
) -> nn.Module:
    """Replace the (non-exempt, untied) ``nn.Linear`` layers of ``network`` (only those inside a
    module for which ``within`` is true, if given) by ``make(layer)``, in place, one at a time.
    With ``fuse`` each module's linear groups are fused just before its layers are replaced
    (export keeps the official layers), so one fused float copy exists at a time (a full-size
    Qwen2's are 0.9 GB in float32). Each old layer is freed before the next is made, and the
    freed heap goes back to the OS every ``RELEASE_EVERY`` bytes (a kernel's transient copies of
    layer after layer left 0.6 GB free in the heap of a CosyVoice3 flow's int8 load)."""
    exempt = exempt_names(network)
    tables = tied_to_embeddings(network)
    within = within or (lambda module: True)
    replaced = 0

    def visit(module: nn.Module, prefix: str, inside: bool) -> None:
        nonlocal replaced
        inside = inside or within(module)
        if fuse and inside:
            fuse_groups(module)
        for name, child in list(module.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            if type(child) is not nn.Linear:
                visit(child, path, inside)
            elif inside and child not in tables and not _is_exempt(path, exempt):
                setattr(module, name, make(child))
                replaced += child.weight.numel() * child.weight.element_size()
                if replaced >= RELEASE_EVERY:
                    release_freed_memory()
                    replaced = 0

    visit(network, "", False)
    return network


def quantize_products_int8(
    network: nn.Module, kernel: str = "torch", fuse: bool = False
) -> nn.Module:
    """Replace the linear layers inside the modules whose class declares ``int8_products`` by
    ``Int8MatmulLinear`` (W8A8, products by ``kernel``), in place, their linear groups fused
    first (``fuse``)."""
    return replace_linears(
        network,
        lambda linear: Int8MatmulLinear(linear, kernel),
        fuse,
        within=lambda module: bool(getattr(type(module), INT8_PRODUCTS_ATTRIBUTE, None)),
    )


def declares_int8_products(network: nn.Module) -> bool:
    """Whether ``quantize_products_int8`` would give ``network`` W8A8 products: a module of it
    declares ``int8_products`` (its structure alone: a network on the meta device will do)."""
    return any(hasattr(type(module), INT8_PRODUCTS_ATTRIBUTE) for module in network.modules())


def has_int8_products(network: nn.Module) -> bool:
    """Whether ``network`` computes some products in W8A8 (``quantize_products_int8``)."""
    return any(isinstance(module, Int8MatmulLinear) for module in network.modules())


def quantize_linear_int8(
    network: nn.Module, threads: int | None = None, fuse: bool = False
) -> nn.Module:
    """Replace the (non-exempt, untied) ``nn.Linear`` layers by ``Int8Linear``, in place, the
    linear groups fused first (``fuse``); ``threads``: onnxruntime's threads per layer (default:
    torch's thread count; the process's shared pool instead where there is one,
    onnx_threads.py)."""
    threads = threads or torch.get_num_threads()
    return replace_linears(network, lambda linear: Int8Linear(linear, threads), fuse)


EXACT_ROWS = 16  # row counts up to this are computed as they come (decoding steps)
# The CosyVoice2/3 flows stream in chunks of 50 mel frames (25 tokens x 2), so a streamed chunk
# call's rows are a multiple of 50 (a CFG row of one stream per share): computed as they come,
# up to 32 such shapes. Padded to 52 / 104 rows, a v2 bfloat16 chunk took 0.698 s against 0.648 s
# (the same floats; benchmarks/README.md).
CHUNK_ROWS, MAX_CHUNK_ROWS = 50, 1600


def padded_rows(
    rows: int, exact: int = EXACT_ROWS, chunk: int = CHUNK_ROWS, most: int = MAX_CHUNK_ROWS
) -> int:
    """The row count ``PackedLinear`` computes ``rows`` input rows at. oneDNN builds a kernel for
    every input shape it meets and keeps it (~0.6 MB each on an AVX-512 CPU; a smaller
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` did not stop the growth): the flow's rows follow each
    utterance's length, so a server meeting every length grew by gigabytes. Past ``EXACT_ROWS``
    the count is rounded up to one of 8 sizes per power of two (at most 12.5% more rows, ~6% on
    average), but for the multiples of ``CHUNK_ROWS`` that streamed chunks make. The padding rows change nothing in the
    others: oneDNN's product of a row does not depend on how many rows share the call (beyond
    one), which the tests check."""
    if rows <= exact or (rows % chunk == 0 and rows <= most):  # (TorchScript: no globals)
        return rows
    step = 1  # 2 ** (bit_length - 4), written so that TorchScript compiles it (_packed_product)
    while step * 16 <= rows:
        step *= 2
    return -(-rows // step) * step


def _packed_product(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    transposed_rows: int,
) -> torch.Tensor:
    """``PackedLinear``'s product, its input rows padded to ``padded_rows``; 2 to
    ``transposed_rows`` rows as the transposed product (``PackedLinear``'s plain weights). Also
    compiled by TorchScript (``_compiled_packed_product``) for traced graphs
    (``networks.graph_capture``): traced Python would keep the row count it met as a constant,
    and the tracer cannot record the oneDNN op's list argument."""
    rows = x.numel() // in_features
    padded = padded_rows(rows)
    if padded == rows and not 2 <= rows <= transposed_rows:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if padded == rows:  # W x^T: the plain weight as oneDNN's many-row operand, x as its weight
        flat = x.reshape(rows, in_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(weight, flat, None, "none", [], "")
        out = out.t().contiguous()
        if bias is not None:
            out.add_(bias)
    else:
        flat = torch.cat([x.reshape(rows, in_features), x.new_zeros([padded - rows, in_features])])
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")[:rows]
    shape = list(x.shape[:-1])
    shape.append(out.size(-1))
    return out.reshape(shape)


@functools.cache
def _compiled_packed_product() -> Callable[..., torch.Tensor]:
    return torch.jit.script(_packed_product)  # at the first trace (its warning filtered there)


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight packed once for oneDNN (CPU, float32 or bfloat16).

    ``_reorder_linear_weight`` / ``_linear_pointwise`` are the oneDNN ops torch's own compiler
    (inductor, with weight freezing) emits for CPU linear layers; calling them directly gives the
    packed layout without compiling. The packed weight is an opaque oneDNN tensor of the same size,
    kept as a buffer, so no float copy remains. Inputs are computed at ``padded_rows`` rows, which
    bounds the kernels oneDNN keeps.

    ``threads`` (chosen at load; None: the caller's): the torch threads of the product, set for
    its call only. A decoding LLM's thread runs everything else on one thread (``engine.
    decode_threads``): its other operations are small, and on two threads each paid OpenMP's
    wake-up of the second (a v1 step's attention of one position 44 us on one thread against
    ~100 us on two, a layer norm of 4 rows 6 against 67 us), while a product reading megabytes
    of weights needs every core's share of the memory bandwidth.

    ``layout_rows``: the row count oneDNN lays the weight out for (``float32_layouts``).
    None (a decoding LLM's float32 layers): the weight stays in its plain layout, which oneDNN's
    product of one row reads as it is (a weight laid out for one row computed the same floats at
    the same speed on a 2-core AVX2 EPYC), and 2 to ``EXACT_ROWS`` rows (a batched decoding step)
    are the transposed product W x^T: there oneDNN read a one-row layout at 12-17 GB/s, a plain
    weight as the many-row operand at up to twice that, and both give the same floats
    (benchmarks/bench_llm_rows.py).
    """

    def __init__(
        self, linear: nn.Linear, threads: int | None = None, layout_rows: int | None = 1
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.threads = threads
        self.register_buffer("weight", linear.weight.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.relayout(layout_rows)

    def relayout(self, layout_rows: int | None) -> None:
        """The weight laid out for ``layout_rows`` rows (None: plain), the same numbers; a
        traced graph holding the old weight keeps it (benchmarks switch layouts in place)."""
        weight = self.weight.to_dense() if self.weight.is_mkldnn else self.weight
        if layout_rows is None:
            self.weight = weight.contiguous()
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, layout_rows)
        self.transposed_rows = EXACT_ROWS if layout_rows is None else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.weight, self.bias, self.in_features, self.transposed_rows)
        if torch.jit.is_tracing():
            return _compiled_packed_product()(*args)
        return call_on_threads(self.threads, _packed_product, *args)


MANY_ROWS = 64  # the flows' calls: 50 (a streamed chunk's row) to ~1,000 rows


def float32_layouts(placement: Placement, decoding: bool) -> int | None:
    """``PackedLinear``'s ``layout_rows`` for a decoding LLM's layers or a flow's. On a CPU
    whose vector instructions stop at AVX2, float32 weights as measured there (a 2-core AMD
    EPYC; benchmarks/bench_llm_rows.py, bench_flow_layout.py): an LLM's plain (None: a batched
    CosyVoice2 step of 2 / 4 / 8 rows 1.11x / 1.22x / 1.23x faster, one row unchanged, the same
    floats), a flow's laid out for ``MANY_ROWS`` (oneDNN's blocked layout, where the one-row
    layout is the plain one: a streamed CosyVoice2 / CosyVoice3 chunk 1.30x / 1.09x faster,
    whole utterances unchanged; products of many rows give the same floats, the one-row
    speaker projection differs by float32 rounding, the mel within 2e-6). Elsewhere, and in
    bfloat16, the one-row layout, as before (unmeasured there)."""
    if placement.dtype != torch.float32 or cpu_features().capability != "AVX2":
        return 1
    return None if decoding else MANY_ROWS


def packs_linear(placement: Placement) -> bool:
    """Whether ``PackedLinear`` serves ``placement``: a CPU with oneDNN, float32 (unless
    ``exact_float32`` keeps the official's kernels) or bfloat16 weights (for the layers int8
    leaves in that dtype)."""
    if placement.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if placement.dtype == torch.float32:
        return not placement.exact_float32
    # elsewhere (an AVX2-only AMD EPYC, say) the bf16 layers stay plain nn.Linear
    return placement.dtype == torch.bfloat16 and cpu_features().packs_bfloat16


def stores_channels_last(placement: Placement) -> bool:
    """Whether the vocoder's convolution weights are stored channels-last
    (``channels_last_convolutions``): where the linear layers are oneDNN's packed ones
    (``packs_linear``: a CPU, bfloat16 where it has the instructions, where measured the same
    floats; float32 unless ``exact_float32`` keeps torch's default kernels, as oneDNN's differ by
    up to 3.5e-7 of a waveform)."""
    return packs_linear(placement)


def channels_last_convolutions(network: nn.Module) -> nn.Module:
    """Store the weights of ``network``'s ``conv_layout`` convolutions (the non-exempt ones)
    channels-last, in place, so that they compute over channels-last activations
    (``networks.conv_layout``: the reorders of torch's default layout cost a vocoder as much as
    its products)."""
    exempt = exempt_names(network)
    for name, module in network.named_modules():
        if isinstance(module, CONV_LAYOUT_CLASSES) and not _is_exempt(name, exempt):
            module.weight.data = to_channels_last(module.weight.data)
    return network


def pack_linears(
    network: nn.Module,
    fuse: bool = False,
    threads: int | None = None,
    layout_rows: int | None = 1,
) -> nn.Module:
    """Replace the (non-exempt, untied) ``nn.Linear`` layers of ``network`` by ``PackedLinear``,
    their linear groups fused first (``fuse``); ``threads``: each product's torch threads (None:
    the caller's); ``layout_rows``: the rows their weights are laid out for (``PackedLinear``)."""
    return replace_linears(network, lambda linear: PackedLinear(linear, threads, layout_rows), fuse)


def apply_precision(
    network: nn.Module, part: str, placement: Placement, kernels: bool = True
) -> nn.Module:
    """Put ``network`` (``part``: "llm", "flow" or "hift", already on its device) in the precision
    chosen at load. int8 applies to the LLM, whose decoding reads every weight once per token, and
    (with ``kernels``) to the flow's declared ``int8_products``; the rest of the flow and the
    vocoder follow ``placement.dtype``. ``kernels`` fuses the linear groups of every network (one
    product for q/k/v: the same floats, fewer and larger calls; a streamed flow chunk ~15% less
    CPU) and adds the LLM's decoding kernels and the flow's (packed weights, ``packs_linear``);
    export loads without them, keeping the official module tree."""
    # Each kernel replaces layer after layer, fusing a module's groups just before (so the load
    # peaks near the loaded size); the groups no kernel replaces are fused last. Casting comes
    # first: joined after the cast, the fused weights are the same numbers, made in the dtype.
    decoding = part == "llm" and kernels
    if decoding and not keeps_official_floats(placement):
        fuse_cached_attention(network)
    if part == "llm" and placement.quantize == "int8":
        # int8 kernels take float32 activations; export (no kernels) keeps the official tree
        return quantize_linear_int8(network, fuse=kernels)
    if placement.dtype != torch.float32:
        cast_weights(network, placement.dtype)
    product_kernel = int8_product_kernel(placement)
    if part == "flow" and kernels and placement.quantize == "int8" and product_kernel:
        quantize_products_int8(network, product_kernel, fuse=True)
    if kernels and packs_linear(placement) and (decoding or part == "flow"):
        # only with kernels, which fuse; a decoding LLM's products on every thread of the
        # process, the rest of its step on one (PackedLinear); the flow's rows have their own
        threads = torch.get_num_threads() if decoding else None
        layout = float32_layouts(placement, decoding)
        pack_linears(network, fuse=True, threads=threads, layout_rows=layout)
    if kernels and part == "hift" and stores_channels_last(placement):
        channels_last_convolutions(network)
    if kernels:
        fuse_linear_groups(network)
    if decoding and placement.device.type == "cpu" and placement.dtype != torch.float32:
        attend_in_float32(network)
    return network


STREAM_CACHE_DTYPES = ("float16", "float32")


def stream_cache_dtype(placement: Placement, requested: str | None = None) -> torch.dtype | None:
    """The dtype the streaming flows keep their keys and values in (None: as computed).

    By default float16 with ``--quantize int8`` over a float32 flow: the int8 LLM's tokens already
    depart from the official's float32 ones (and CosyVoice3's DiT products are int8 on a CPU),
    while the caches are most of a stream's memory (CosyVoice2 4.5 MB per mel frame in float32):
    half of it, for a rounding of the keys and values (relative 2**-11; streamed mel 1e-5
    relative, benchmarks/precision_accuracy.py). Plain float32 keeps them exact (the official
    streams' floats); bfloat16/float16 weights compute them in their own dtype already.

    ``requested`` (``--stream-cache-dtype``, float32 weights only) overrides the default: "float16"
    halves a float32 stream's memory at that rounding, "float32" keeps int8's caches exact. Raises
    ValueError for another name or other weights."""
    if requested is None:
        if placement.quantize == "int8" and placement.dtype == torch.float32:
            return torch.float16
        return None
    named = dtype_named(requested)
    if named not in (torch.float16, torch.float32):
        raise ValueError(
            f"stream cache dtype must be one of {', '.join(STREAM_CACHE_DTYPES)}, got {requested!r}"
        )
    requested = str(named).removeprefix("torch.")
    if placement.dtype != torch.float32:
        raise ValueError(
            f"a stream cache dtype applies to float32 weights; with {placement.dtype} weights the "
            "flow's keys and values are kept in that dtype"
        )
    return torch.float16 if requested == "float16" else None


def int8_product_kernel(placement: Placement) -> str | None:
    """The kernel of the flow's W8A8 products on a CPU (None: they stay in ``placement.dtype``,
    as on accelerators and in bfloat16 on AMX tiles). ``torch._int_mm`` where the CPU has VNNI or
    AMX (device.CpuFeatures);
    elsewhere it crawls, and onnxruntime's ``MatMulInteger`` gives the same integers: a
    full-size DiT product (900 x 1024 x 1024-3072) 1.2-1.4x faster than float32 on 2 AVX2
    cores, a U-Net one (900 x 256 x 1536, which the U-Nets do not declare) no faster."""
    if placement.device.type != "cpu":
        return None
    features = cpu_features()
    if features.amx and placement.dtype == torch.bfloat16:
        # bfloat16 products on AMX tiles outrun torch's int8 ones (an Intel Xeon, 2 threads:
        # 1,980 against 698 GFLOP/s; the full-size CosyVoice3 flow 4.29 s against 6.71 s)
        return None
    return "torch" if features.int8_products else "onnxruntime"


def keeps_official_floats(placement: Placement) -> bool:
    """Whether the LLM computes the official's floats: float32 by torch's default kernels
    (``exact_float32``, or a device whose float32 products are not oneDNN's packed ones), no
    int8 products."""
    return (
        placement.quantize != "int8"
        and placement.dtype == torch.float32
        and not packs_linear(placement)
    )


def fuse_cached_attention(network: nn.Module) -> nn.Module:
    """Let the LLM's cached attention run as one fused call where it declares one
    (``fused_cached``): where the network has no official floats to keep
    (``keeps_official_floats``: weights below float32, int8 products, float32 by oneDNN's packed
    products). It differs from the official's separate operations by float32 rounding (v1
    log-probabilities: 1e-6) and saves OpenMP regions (CosyVoice-300M: ~0.47 against ~0.26 ms a
    layer; a float32 step 60.6 -> 56.2 ms, benchmarks/README.md)."""
    return _set_declared(network, "fused_cached", True)


def attend_in_float32(network: nn.Module) -> nn.Module:
    """Keep the LLM's key/value caches and its attention in float32 (modules that declare an
    ``attention_dtype``). On a CPU, torch's bfloat16/float16 batched products of one query row
    cost 50-90 us a call against ~20 us in float32 (they are tiny; the per-call path dominates),
    and an LLM step makes three per layer; the caches are small (v2: 25 KB per token in float32)."""
    return _set_declared(network, "attention_dtype", torch.float32)


def _set_declared(network: nn.Module, attribute: str, value: object) -> nn.Module:
    """Set ``attribute`` on every module of ``network`` whose class declares it (a load-time
    choice the module reads, with its class default elsewhere)."""
    for module in network.modules():
        if hasattr(type(module), attribute):
            setattr(module, attribute, value)
    return network
