"""A network's forward as a captured graph: a TorchScript trace that runs without Python.

Eager torch runs each of a flow estimator's thousands of small operations from Python, holding
the interpreter lock around every call. On a CPU that costs twice: the Python work itself, and
the lock's hand-overs whenever another thread (the LLM's decoding loop, another audio worker) runs
Python at the same time. A traced graph runs every operation from C++ and releases the lock for
the whole call. Measured on a 2-core Intel Xeon (full-size CosyVoice2 U-Net, bfloat16, one row,
one thread; benchmarks/README.md): 100 frames 0.074 -> 0.060 s, 450 frames 0.233 -> 0.223 s, and
beside a thread of small torch operations 0.28 -> 0.22 s while that thread got 1.4x as much done;
in the engine, four concurrent whole requests 1.07x (CosyVoice2) and 1.21-1.26x
(CosyVoice-300M) the throughput, CosyVoice2 streams 1.17x (one) and 1.31x (four), the same
floats.

A graph is traced on first use for each ``key`` (what the trace bakes in: flags, the row count,
dtype and device), under a lock, and kept for the process's life (TorchScript's compilation
unit keeps every traced function): ~1 s to trace and ~40 MB held for a full-size v2 U-Net's
stream call of one row (~9,000 operations, 2-core AVX2 CPU), so the callers keep their keys
few. The module's weights are the graph's first inputs, passed at every call: the tracer
records a tensor it was given as that input wherever the module reads it, so the graph holds
no weights and no module hierarchy (a trace of the module kept a method graph per submodule and
a chain of attribute reads per weight: 84-119 MB held for that call, 2.3-2.5 s to trace; the
same floats and call times). The trace replays the same operations with any input sizes: the
networks' shape logic that tracing would freeze is written as tensor operations or skipped
while tracing (``attention.sees_everything`` keeps the attention mask in the trace, which adds 0
to every score of an unpadded input: the same floats, but ~8% more attention time on a CPU, so
the estimators key a bias-free graph of their own on it; ``precision.PackedLinear`` pads its rows
in a compiled function). Graph optimisation is off
(``torch.jit``'s executor would profile each graph and re-specialise it on new shapes; measured
no faster here), so a graph computes exactly the traced operations.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cosyvoice_lite.networks.abort import check
from cosyvoice_lite.row_parallel import call_on_threads

# One trace at a time in the process: tracing may compile TorchScript from Python source, and
# CPython 3.11's parser raises "AST constructor recursion depth mismatch" (a SystemError) when
# two threads parse at once (the loop's LLM graph and a worker's flow graph, first use of each)
_TRACING = threading.Lock()

# Decoding steps of up to this many rows run as captured graphs (the LLMs' ``capture_graphs``),
# larger ones eagerly: a graph holds ~30-60 MB at full size (the tracer's record of each
# operation), and a step of more rows spends a smaller share outside its products.
CAPTURED_STEP_ROWS = 2

StepSlots = list[list[tuple[torch.Tensor, torch.Tensor]]]
"""A decoding step's cache slots: per layer, per row, the (keys, values) with room for the new
positions last (``KVCache.reserve``), which the layers fill in place."""


def flat_slots(slots: StepSlots) -> list[torch.Tensor]:
    """A step's slots as one list of graph inputs (layer by layer, row by row, keys first)."""
    return [t for layer_slots in slots for pair in layer_slots for t in pair]


def nested_slots(flat: Sequence[torch.Tensor], layers: int, rows: int) -> StepSlots:
    """``flat_slots`` undone inside a traced step."""
    pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    return [pairs[layer * rows : (layer + 1) * rows] for layer in range(layers)]


def trace_step_graphs(
    step: Callable[[torch.Tensor, Any], object],
    new_cache: Callable[[], Any],
    inputs: torch.Tensor,
) -> None:
    """Trace an LLM's captured step graphs now, rather than in the first requests' steps: for
    each captured row count, one-position caches (an eager prefill each), then two steps.
    ``step(x, caches)`` is the LLM's forward; ``inputs``: zeros [CAPTURED_STEP_ROWS, 1, width]
    in its dtype. Stops between row counts once the engine closes (``abort.check``)."""
    for rows in range(1, CAPTURED_STEP_ROWS + 1):
        check(f"tracing the LLM's step graph of {rows} rows")
        caches = [new_cache() for _ in range(rows)]
        for cache in caches:
            step(inputs[:1], cache)
        for _ in range(2):
            step(inputs[:rows], caches)


def traceable(module: nn.Module) -> bool:
    """Whether a trace records all of ``module``'s work: not where a submodule computes outside
    torch (``computes_outside_torch``: onnxruntime's products), whose results a trace would keep
    as constants."""
    return not any(getattr(m, "computes_outside_torch", False) for m in module.modules())


class CapturedGraphs:
    """The traced graphs of one module's forward, one per key, made on first use."""

    def __init__(self, module: nn.Module) -> None:
        if not traceable(module):
            raise ValueError(
                f"{type(module).__name__} computes outside torch: no trace can record it"
            )
        torch._C._set_graph_executor_optimize(False)  # process-wide; see the module docstring
        # process-wide too: warnings.catch_warnings is not thread-safe, and traces run beside
        # other threads. TracerWarnings name the shape logic handled above; torch.jit.trace (and
        # .script) are deprecated in favour of torch.export, whose programs run from Python again
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        self._module = [module]  # not a submodule: no second path to its weights
        self._graphs: dict[Hashable, _Graph] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs)

    def run(
        self,
        key: Hashable,
        fn: Callable[..., torch.Tensor],
        args: tuple[torch.Tensor, ...],
        threads: int | None = None,
    ) -> torch.Tensor:
        """``fn(*args)`` through the graph traced for ``key`` (traced from this call if new):
        ``fn`` must compute the same operations for every call of that key. Under a torch
        function or dispatch mode (a FLOP counter, a profiler's mode) ``fn`` runs eagerly: the
        mode observes each operation, which a graph would hide from it. ``threads``: the
        calling thread's torch threads for this call (an LLM step's: the threads its packed
        products were given at load, which eager products switch to one at a time)."""
        if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
            return fn(*args)
        graph = self._graphs.get(key)
        if graph is None:
            with self._lock:
                graph = self._graphs.get(key)
                if graph is None:
                    graph = self._graphs[key] = self._trace(fn, args)
        return call_on_threads(threads, graph.function, *graph.weights, *args)

    def run_in_groups(
        self,
        x: torch.Tensor,
        rows: int,
        begin: Callable[[slice], tuple[Any, tuple[torch.Tensor, ...]]],
        increment: Callable[..., tuple[torch.Tensor, ...]],
    ) -> list[torch.Tensor]:
        """A stream step's rows of ``x`` in groups of ``rows``, each group through the graph of
        its layout (so a few graphs serve every batch): ``begin(group)`` reads the group's caches
        and returns its call (``.layout``: what the graph bakes in; ``.store(outputs)``: writes
        the caches back, returns the group's output) and the graph's inputs;
        ``increment(layout, *inputs)`` is the pure computation, traced on a key's first call.
        Shared by the U-Net's and the DiT's streams (flow_v2, flow_v3_stream)."""
        outputs = []
        for first in range(0, x.size(0), rows):
            call, inputs = begin(slice(first, first + rows))
            layout = call.layout

            def traced(
                *inputs: torch.Tensor, layout: Hashable = layout
            ) -> tuple[torch.Tensor, ...]:
                return increment(layout, *inputs)

            key = ("increment", layout, x.dtype, x.device)
            outputs.append(call.store(self.run(key, traced, inputs)))
        return outputs

    def _trace(self, fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...]) -> _Graph:
        # on a thread of its own: the tracer keeps the Python call stack of every operation it
        # records (for its error messages), and a fresh thread's stack is the trace's alone (a
        # graph of 20,000 operations held 55 MB traced at the top of a stack, 78 MB 30 deep)
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        module = self._module[0]
        weights = tuple(dict.fromkeys([*module.parameters(), *module.buffers()]))  # once each
        count = len(weights)
        result: list = []

        def flat(*inputs: torch.Tensor) -> torch.Tensor:
            return fn(*inputs[count:])

        def trace() -> None:
            try:
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    result.append(torch.jit.trace(flat, (*weights, *args), check_trace=False))
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                result.append(exc)

        thread = threading.Thread(target=trace, name="graph-trace")
        with _TRACING:
            thread.start()
            thread.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        return _Graph(result[0], weights)


@dataclass(frozen=True)
class _Graph:
    """A traced function and the weights it takes first, as traced."""

    function: Callable[..., Any]
    weights: tuple[torch.Tensor, ...]
