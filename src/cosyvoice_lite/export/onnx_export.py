"""`cosyvoice-lite export onnx`: every network of a model directory as standard ONNX graphs plus a
manifest (manifest.json) that says what each graph takes and returns and how they chain.

Graphs are traced with torch's TorchScript-based exporter at opset 17 (default ONNX domain only,
no custom operators), every time axis dynamic except in the `--static-frames` estimator. Each
graph is checked right after export: onnxruntime runs it on inputs of another length than the
trace used and the largest difference from torch is written into the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CosyVoiceError
from ..onnx_threads import session_options
from ..versions import VersionSpec, spec
from . import flow as flow_graphs
from . import llm as llm_graphs
from . import staging
from . import vocoder as vocoder_graphs

log = logging.getLogger(__name__)

OPSET = 17
DTYPES = ("float32", "float16")
PARTS = ("llm", "flow", "hift")
# The export checks the static estimator in onnxruntime at N frames, which holds every head's
# N x N attention scores several times over (~24 bytes a score, measured; two rows): at 2,000
# frames ~3 GB for CosyVoice3's 16 heads, and a bad_alloc after all the work at 8,000.
MAX_STATIC_FRAMES = 2000
FP16_MAX = 65504.0


class ExportError(CosyVoiceError):
    """An export could not be done (bad options, existing output, missing `onnx`)."""


@dataclass
class Graph:
    """One graph to export: the wrapper module, names, example inputs and how to check it."""

    name: str
    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]
    example: Callable[[int], tuple[torch.Tensor, ...]]  # size -> inputs
    sizes: tuple[int, int]  # (trace size, check size)
    doc: str
    reference: Callable[..., tuple[torch.Tensor, ...]] | None = None  # torch network itself
    # how far torch's own output moves when its input moves by one float32 ulp (noise floor)
    floor: Callable[..., float] | None = None
    input_docs: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ options


def check_options(
    out_dir: Path,
    dtype: str,
    static_frames: int | None,
    force: bool,
    parts: tuple[str, ...] = PARTS,
) -> None:
    """Every option problem is an error before any work is done (an export to the same output
    already running too)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if static_frames is not None:
        if static_frames <= 0 or static_frames > MAX_STATIC_FRAMES:
            raise ExportError(
                f"--static-frames must be between 1 and {MAX_STATIC_FRAMES} mel frames (the "
                "export checks the graph at that size, which holds every head's N x N attention "
                f"scores), got {static_frames}"
            )
        if "flow" not in parts:
            raise ExportError("--static-frames sizes the flow estimator: export the flow too")
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ExportError(f"parts must be some of {', '.join(PARTS)}, got {', '.join(parts)}")
    if len(out_dir.name.encode()) > staging.NAME_MAX_BYTES:
        raise ExportError(
            f"the output's name is {len(out_dir.name.encode())} bytes long; file systems take "
            f"{staging.NAME_MAX_BYTES}"
        )
    if out_dir.is_symlink():  # replacing it would replace the link, not what it names
        raise ExportError(f"{out_dir} is a symbolic link: name the directory it points to")
    out_dir = out_dir.resolve()
    if out_dir.parent == out_dir:
        raise ExportError(f"{out_dir} is the root of the file system: name a directory in it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    existing = next(p for p in out_dir.parents if p.exists())
    if not existing.is_dir():
        raise ExportError(f"cannot make {out_dir}: {existing} is not a directory")
    parent = staging.staging_parent(out_dir)
    _check_not_exporting(out_dir, parent)
    for directory in (out_dir, out_dir.parent):
        staging.remove_dead_exports(directory)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise ExportError(
                f"{out_dir} already exists and is not empty; pass --force to replace it"
            )
        if parent != out_dir:  # files of its own: the finished export is swapped in by renames
            _check_replaceable(out_dir)
    # a directory that cannot be written is an error now, not after loading and tracing: the
    # one the export is staged in, under the longest name staging takes there (missing parents
    # are made only once the export is done)
    probe = staging.new_hidden(parent, staging.hidden_stem(out_dir, parent), "partial")
    try:  # (not os.access: root passes it where nothing can be written, in /proc)
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise ExportError(f"cannot write {out_dir}: {exc.strerror or exc}") from None
    try:
        import onnx  # noqa: F401  (needed to read back and convert the graphs)
    except ImportError as exc:
        raise ExportError(
            "exporting needs the onnx package (the 'export' extra): pip install 'onnx>=1.16'"
        ) from exc


def _check_replaceable(out_dir: Path) -> None:
    """What --force cannot replace: a mount point, a directory holding the current one."""
    if os.path.ismount(out_dir):
        raise ExportError(
            f"{out_dir} is a mount point, which --force cannot replace: empty it, or "
            "export into a new directory in it"
        )
    here = Path.cwd().resolve()
    if out_dir == here or out_dir in here.parents:
        raise ExportError(f"refusing to replace {out_dir}: it holds the current directory")


def _check_not_exporting(out_dir: Path, parent: Path) -> None:
    lock = staging.output_lock_path(parent, staging.hidden_stem(out_dir, parent))
    if staging.is_held(lock):
        raise _exporting(out_dir, lock)


def _exporting(out_dir: Path, lock: Path) -> ExportError:
    try:
        holder = lock.read_text().strip() or "?"
    except OSError:
        holder = "?"
    return ExportError(
        f"{out_dir} is being exported by another process (pid {holder}, {lock.name}): wait "
        "for it, or choose another output"
    )


@contextmanager
def _output_locked(out_dir: Path, parent: Path) -> Iterator[None]:
    """The export's lock, held for the whole export: a second export to the same output is
    refused, and the export's hidden entries are alive while it is held."""
    lock = staging.output_lock_path(parent, staging.hidden_stem(out_dir, parent))
    try:
        fd = staging.try_lock(lock)
    except staging.Held:
        raise _exporting(out_dir, lock) from None
    except OSError as exc:
        raise ExportError(f"cannot write {parent}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        staging.release(fd, lock)


# ------------------------------------------------------------------------------------ graphs


def _ints(*shape: int, high: int = 100) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=_rng(), dtype=torch.int64)


# Example inputs for tracing and checking; reseeded by every export, so exports are reproducible.
_RNG = torch.Generator().manual_seed(20251213)


def _rng() -> torch.Generator:
    return _RNG


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=_rng())


def llm_graph_list(lm: nn.Module) -> list[Graph]:
    prefill, decode = llm_graphs.llm_graphs(lm)
    caches = list(prefill.caches)
    pasts = [f"past_{c}" for c in caches]
    eop = getattr(lm, "END_OF_PROMPT_ID", None)

    def text(n: int) -> torch.Tensor:
        ids = _ints(1, n, high=1000)
        if eop is not None:
            ids[0, 0] = eop
        return ids

    pre_inputs = list(prefill.inputs)
    examples = {
        "text": text,
        "embedding": lambda n: _randn(1, 192),
        "prompt_speech_token": lambda n: _ints(1, n // 2),
    }

    def pre_example(n: int):
        return tuple(examples[name](n) for name in pre_inputs)

    def dec_example(n: int):
        with torch.inference_mode():
            cache = prefill(*pre_example(n))[1:]
        return (_ints(1, 1), *cache)

    pos = {c: {2: "positions"} for c in caches}
    return [
        Graph(
            "llm_prefill",
            prefill,
            pre_inputs,
            ["logp", *caches],
            {
                "text": {1: "text_tokens"},
                "embedding": {0: "speakers"},
                "prompt_speech_token": {1: "prompt_speech_tokens"},
                **pos,
            },
            pre_example,
            (6, 9),
            "LLM input sequence -> next-token log-probabilities and the key/value cache",
        ),
        Graph(
            "llm_decode",
            decode,
            ["token", *pasts],
            ["logp", *caches],
            {**{p: {2: "past_positions"} for p in pasts}, **pos},
            dec_example,
            (5, 8),
            "one decoding step: the last sampled speech token after the cached positions",
        ),
    ]


def flow_graph_list(flow: nn.Module, spec: VersionSpec, static_frames: int | None) -> list[Graph]:
    graphs = []
    enc_inputs = ["prompt_token", "token", "prompt_feat", "embedding"]
    enc_dynamic = {
        "prompt_token": {1: "prompt_tokens"},
        "token": {1: "tokens"},
        "prompt_feat": {1: "prompt_frames"},
        "mu": {2: "frames"},
        "cond": {2: "frames"},
    }

    def enc_example(n: int):
        p = n // 3
        ratio = spec.prompt_mel_ratio  # v1: the prompt mel is not aligned to its tokens
        frames = p * ratio if ratio else int(p / flow.input_frame_rate * 22050 / 256)
        return _ints(1, p), _ints(1, n), _randn(1, frames, 80), _randn(1, 192)

    variants = [("flow_encoder", False, True)]
    if spec.chunk_causal_flow:
        variants.append(("flow_encoder_chunk", True, False))
    for name, streaming, finalize in variants:
        doc = (
            "speech tokens -> mu, cond, spks for the estimator"
            if finalize
            else "a non-final streaming chunk: chunk masks, the last "
            f"{flow.pre_lookahead_len} tokens only look-ahead (no mel for them)"
        )
        graphs.append(
            Graph(
                name,
                flow_graphs.flow_encoder_graph(flow, streaming, finalize),
                enc_inputs,
                ["mu", "cond", "spks"],
                enc_dynamic,
                enc_example,
                (30, 47),
                doc,
            )
        )

    estimator = flow.decoder.estimator
    est_inputs = ["x", "mask", "mu", "t", "spks", "cond"]
    est_dynamic = {n: {2: "frames"} for n in ("x", "mask", "mu", "cond", "velocity")}

    def est_example(n: int):
        return (
            _randn(2, 80, n),
            torch.ones(2, 1, n),
            _randn(2, 80, n),
            torch.rand(2, generator=_rng()),
            _randn(2, 80),
            _randn(2, 80, n),
        )

    est_variants = [("flow_estimator", False)] + (
        [("flow_estimator_chunk", True)] if spec.chunk_causal_flow else []
    )
    for name, streaming in est_variants:
        graphs.append(
            Graph(
                name,
                flow_graphs.estimator_graph(estimator, streaming),
                est_inputs,
                ["velocity"],
                est_dynamic,
                est_example,
                (60, 83),
                "velocity of one Euler step, batch of 2 (conditional, unconditional)"
                + (", chunk attention masks" if streaming else ""),
                reference=lambda *a, _s=streaming: estimator(*a, streaming=_s),
            )
        )
    if static_frames is not None:
        graphs.append(
            Graph(
                "flow_estimator_static",
                flow_graphs.estimator_graph(estimator, False),
                est_inputs,
                ["velocity"],
                {},
                est_example,
                (static_frames, static_frames),
                f"flow_estimator with every shape fixed at {static_frames} frames (static compilers)"
                + (
                    "; the U-Net's GroupNorm spans all frames: padding changes the result, run "
                    "chunks of exactly this size"
                    if not spec.chunk_causal_flow
                    else "; pad x, mu, cond with zeros and mask with 0 beyond the real frames: "
                    "the real frames come out as without padding"
                ),
                reference=lambda *a: estimator(*a),
            )
        )
    return graphs


def hift_graph_list(hift: nn.Module, spec: VersionSpec) -> list[Graph]:
    causal = spec.causal_vocoder

    def example(n: int):
        mel = _randn(1, 80, n)
        phase, noise = vocoder_graphs.draw_source_noise(hift, n, _rng())
        return (mel, phase, noise) if causal else (mel, phase, noise, _randn(1, 1, n * 60) * 0.1)

    inputs = ["mel", "phase", "noise"] + ([] if causal else ["cache_source"])
    outputs = ["speech"] + ([] if causal else ["source"])
    dynamic = {"mel": {2: "frames"}, "noise": {1: "samples"}, "speech": {1: "samples"}}
    if not causal:
        dynamic.update(cache_source={2: "cached_samples"}, source={2: "samples"})
    graphs = [
        Graph(
            "hift",
            vocoder_graphs.vocoder_graph(hift),
            inputs,
            outputs,
            dynamic,
            example,
            (12, 19),
            "mel -> waveform, the source randomness as inputs",
        )
    ]
    if causal:

        def floor(mel: torch.Tensor, *_: torch.Tensor, finalize: bool = True) -> float:
            """torch's own output change when the source moves by one ulp (v3 vocoder)."""
            with torch.inference_mode():
                _, source = hift.inference(mel, finalize=finalize)
                if not finalize:
                    mel = mel[:, :, : -hift.f0_predictor.look_ahead]
                nudged = hift.decode(mel, source * (1 + 2.0**-23), finalize=finalize)
                return float((nudged - hift.decode(mel, source, finalize=finalize)).abs().max())

        graphs[0].floor = floor
        graphs.append(
            Graph(
                "hift_chunk",
                vocoder_graphs.vocoder_graph(hift, finalize=False),
                inputs,
                outputs,
                {**dynamic, "speech": {1: "emitted_samples"}},
                example,
                (16, 23),
                "the official streaming call on the mel history: the last 3 frames are f0 "
                "look-ahead, the 4 before them conv_pre look-ahead, the last hop is dropped "
                "(frames - 8) * hop samples; noise as for hift (frames * hop rows)",
                floor=lambda *a: floor(*a, finalize=False),
            )
        )
    return graphs


# ------------------------------------------------------------------------------------ export


def _export_graph(graph: Graph, path: Path) -> None:
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values are expected
        torch.onnx.export(
            graph.module,
            graph.example(graph.sizes[0]),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=graph.inputs,
            output_names=graph.outputs,
            dynamic_axes=graph.dynamic or None,
            do_constant_folding=True,
        )


def _output_shapes(graph: Graph, size: int) -> list[tuple[int, ...]]:
    with torch.inference_mode():
        out = graph.module(*graph.example(size))
    return [tuple(t.shape) for t in (out if isinstance(out, tuple) else (out,))]


def _name_output_dims(graph: Graph, path: Path) -> None:
    """Declare every output dimension: a number where it does not depend on the input sizes, a
    name where it does (the tracer leaves generated names or nothing)."""
    import onnx

    first, second = (_output_shapes(graph, n) for n in graph.sizes)
    model = onnx.load(str(path), load_external_data=False)
    mine = {name for axes in graph.dynamic.values() for name in axes.values()}
    for value, a, b in zip(model.graph.output, first, second, strict=True):
        dims = value.type.tensor_type.shape.dim
        for index, (dim, n_a, n_b) in enumerate(zip(dims, a, b, strict=True)):
            if n_a == n_b and graph.sizes[0] != graph.sizes[1] or graph.sizes[0] == graph.sizes[1]:
                dim.Clear()
                dim.dim_value = n_a
            elif dim.dim_param not in mine:
                dim.Clear()
                dim.dim_param = f"{value.name}_{index}"
    onnx.save(model, str(path))


def _to_float16(path: Path) -> None:
    """Weights and compute in float16, inputs and outputs kept float32 (onnxruntime's converter).
    The vocoder is never converted: its NSF phase needs float32 and more (as in torch, where it
    stays float32 whatever the dtype)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(path))
    # Resize takes its scales in float32 only: keep the Constants that feed them as they are
    scales = {n.input[2] for n in model.graph.node if n.op_type == "Resize" and len(n.input) > 2}
    keep = [n.name for n in model.graph.node if n.op_type == "Constant" and n.output[0] in scales]
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        disable_shape_infer=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Resize"],
        node_block_list=keep,
    )
    onnx.save(converted, str(path))


def _session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = session_options(threads)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_graph(session, names: list[str], inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return session.run(
        None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
    )


def _max_activation(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[float, str]:
    """Largest |value| any submodule outputs in float32 (float16 overflows above 65504)."""
    worst = [0.0, ""]

    def hook(mod, _args, out, name=""):
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                value = float(t.detach().abs().max())
                if value > worst[0]:
                    worst[:] = [value, name or "(graph outputs)"]

    handles = [
        m.register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n))
        for n, m in module.named_modules()
    ]
    try:
        with torch.inference_mode():
            module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return worst[0], worst[1]


def check_graph(graph: Graph, path: Path, dtype: str) -> dict:
    """Run the exported graph in onnxruntime on fresh inputs and compare with torch."""
    inputs = graph.example(graph.sizes[1])
    with torch.inference_mode():
        expected = graph.reference(*inputs) if graph.reference else graph.module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = run_graph(_session(path), graph.inputs, inputs)
    errors = {}
    finite = True
    for name, want, have in zip(graph.outputs, expected, got, strict=True):
        finite = finite and bool(np.isfinite(have).all())
        errors[name] = float(np.abs(have.astype(np.float64) - want.double().numpy()).max())
    if "cache_source" in graph.inputs:
        # v1/v2 vocoder: the sine source integrates phase over thousands of samples, so float32
        # f0 convolutions summed in another order move the waveform by ~1e-4..1e-3 on their own.
        # Parity is checked per part: the source, and the waveform given the torch source.
        errors["speech_free_running"] = errors.pop("speech")
        given = dict(zip(graph.inputs, inputs, strict=True), cache_source=expected[1])
        speech = run_graph(_session(path), graph.inputs, tuple(given[n] for n in graph.inputs))[0]
        errors["speech_given_source"] = float(np.abs(speech - expected[0].numpy()).max())
    checked = {k: v for k, v in errors.items() if k != "speech_free_running"}
    if graph.floor is not None:
        errors["torch_float32_floor"] = graph.floor(*inputs)
    report = {
        "max_abs_error": max(checked.values()),
        "per_output": errors,
        "check_sizes": graph.sizes[1],
        "finite": finite,
    }
    if dtype == "float16":
        peak, where = _max_activation(graph.module, inputs)
        report["fp32_peak_activation"] = {
            "value": peak,
            "module": where,
            "overflows_float16": peak > FP16_MAX,
        }
    return report


def _io_spec(path: Path, docs: dict[str, str]) -> dict:
    """Inputs and outputs as the ONNX file declares them (names, element types, shapes)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    used = {(op.domain or "ai.onnx") for op in model.graph.node}
    if used - {"ai.onnx"}:
        raise ExportError(f"{path.name} uses non-standard operator domains: {sorted(used)}")

    def describe(value) -> dict:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        entry = {
            "name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
            "shape": dims,
        }
        if value.name in docs:
            entry["doc"] = docs[value.name]
        return entry

    ops = sorted({op.op_type for op in model.graph.node})
    return {
        "inputs": [describe(v) for v in model.graph.input],
        "outputs": [describe(v) for v in model.graph.output],
        "operators": ops,
    }


def load_networks(
    model: str | Path,
    parts: tuple[str, ...] = PARTS,
    llm_checkpoint: str = "llm.pt",
    variant: str | None = None,
):
    """(ModelDir, {part: network}) in float32 on the CPU with the official module tree (no
    fused or packed decoding kernels, which ONNX cannot express)."""
    from ..device import resolve_placement
    from ..hub import resolve_model
    from ..modeldir import open_model_dir
    from ..pipelines.factory import load_network

    model_dir = open_model_dir(resolve_model(model), variant)
    placement = resolve_placement("cpu", "float32")
    files = {"llm": llm_checkpoint, "flow": "flow.pt", "hift": "hift.pt"}
    nets = {p: load_network(model_dir, p, files[p], placement, kernels=False) for p in parts}
    return model_dir, nets


def export_onnx(
    model: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    static_frames: int | None = None,
    force: bool = False,
    parts: tuple[str, ...] = PARTS,
    llm_checkpoint: str = "llm.pt",
    variant: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export a model directory (or official name); returns the manifest path."""
    parts = tuple(parts)
    check_options(Path(out_dir), dtype, static_frames, force, parts)
    out_dir = Path(out_dir).resolve()
    _RNG.manual_seed(20251213)  # the same example inputs (and checks) on every export
    if llm_checkpoint != "llm.pt" and "llm" not in parts:
        raise ExportError("--llm selects an LLM checkpoint: export the llm too")
    from ..hub import resolve_model

    model = resolve_model(model)
    source = Path(model).resolve()
    if out_dir == source or out_dir in source.parents:  # --force would delete the model
        raise ExportError(f"{out_dir} holds the model being exported: write the graphs elsewhere")
    parent = staging.staging_parent(out_dir)
    with _output_locked(out_dir, parent):
        _export_locked(model, out_dir, parent, dtype, static_frames, force, parts,
                       llm_checkpoint, variant, progress)  # fmt: skip
    return out_dir / "manifest.json"


def _export_locked(
    model: str | Path,
    out_dir: Path,
    parent: Path,
    dtype: str,
    static_frames: int | None,
    force: bool,
    parts: tuple[str, ...],
    llm_checkpoint: str,
    variant: str | None,
    progress: Callable[[str], None] | None,
) -> None:
    """export_onnx once it holds the output's lock: load, trace, check, stage, move into place."""
    model_dir, nets = load_networks(model, parts, llm_checkpoint, variant)
    version_spec = spec(model_dir.version)
    graphs: list[Graph] = []
    if "llm" in nets:
        graphs += llm_graph_list(nets["llm"])
    if "flow" in nets:
        graphs += flow_graph_list(nets["flow"], version_spec, static_frames)
    if "hift" in nets:
        graphs += hift_graph_list(nets["hift"], version_spec)

    # written first in a directory of its own (never a name a user may hold): in the output
    # when it is empty (a mounted volume, the current directory), else beside it
    stem = staging.hidden_stem(out_dir, parent)
    work = staging.new_hidden(parent, stem, "partial")
    try:
        work.mkdir()
    except OSError as exc:
        raise ExportError(f"cannot write {work.parent}: {exc.strerror or exc}") from None
    try:
        entries = {graph.name: _export_one(graph, work, dtype, progress) for graph in graphs}
        from .manifest import build_manifest

        checkpoints = {"llm": llm_checkpoint, "flow": "flow.pt", "hift": "hift.pt"}
        sources = {checkpoints[part]: model_dir.path / checkpoints[part] for part in nets}
        manifest = build_manifest(model_dir, nets, entries, dtype, static_frames, OPSET, sources)
        (work / "manifest.json").write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        staging.replace(out_dir, work, stem, force)
    except staging.Appeared as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise ExportError(f"{exc}; nothing was replaced (--force replaces it)") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _export_one(
    graph: Graph, work: Path, dtype: str, progress: Callable[[str], None] | None
) -> dict:
    """Export, name, convert and check one graph in ``work``: its manifest entry."""
    start = time.perf_counter()
    path = work / f"{graph.name}.onnx"
    _export_graph(graph, path)
    _name_output_dims(graph, path)
    graph_dtype = dtype if not graph.name.startswith("hift") else "float32"
    if graph_dtype == "float16":
        _to_float16(path)
    report = check_graph(graph, path, graph_dtype)
    entry = {
        "file": path.name,
        "dtype": graph_dtype,
        "doc": graph.doc,
        **_io_spec(path, graph.input_docs),
        "check": report,
        **graph_files(work, graph.name),
    }
    if progress:
        peak = report.get("fp32_peak_activation")
        overflow = (
            f", float32 peak |activation| {peak['value']:.3g}"
            + (" OVERFLOWS float16" if peak["overflows_float16"] else "")
            if peak
            else ""
        )
        progress(
            f"{graph.name} ({graph_dtype}): {entry['bytes'] / 1e6:.1f} MB, max |onnxruntime"
            f" - torch| {report['max_abs_error']:.2e}{overflow}"
            f" ({time.perf_counter() - start:.1f} s)"
        )
    return entry


def graph_files(directory: Path, name: str) -> dict:
    """A graph's files (its .onnx, external data beside it) for the manifest: their total size
    and each one's size and fingerprint, which a loader checks."""
    from .manifest import file_fingerprint

    files = {
        path.name: {"bytes": path.stat().st_size, "fingerprint": file_fingerprint(path)}
        for path in sorted(directory.glob(f"{name}.onnx*"))
    }
    return {"bytes": sum(f["bytes"] for f in files.values()), "files": files}


__all__ = ["ExportError", "OPSET", "check_options", "export_onnx", "load_networks"]
