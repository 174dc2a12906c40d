"""onnxruntime backend: the exported flow estimator and vocoder behind the torch call interfaces.

    pipeline = use_onnxruntime(pipeline, "exported/")      # after `cosyvoice-lite export onnx`

`OrtEstimator` is an `nn.Module` with the estimator's forward signature, so it takes the place of
`flow.decoder.estimator` and the torch Euler solver runs unchanged; `OrtVocoder` has the vocoder's
`inference` signatures (v1/v2: mel, cache_source, generator; v3: mel, finalize) and hands
everything else (streaming state, attributes) to the torch vocoder it wraps. Networks are
load-time objects: install the backend once, before serving requests.

Not covered: the incremental v2/v3 streaming flow (`new_stream`/`stream_step` computes per-step
attention caches that the chunk graphs do not expose) and the vocoders' streaming calls (the v3
windows, and the v1/v2 cross-faded pieces through which the engine vocodes every v1/v2 utterance);
those keep running in torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ModelDirError
from ..networks.flow_matching import CFG_ROWS, euler_times, time_span
from ..onnx_threads import session_options
from ..versions import SPECS
from . import staging
from .manifest import file_fingerprint
from .vocoder import draw_source_noise

FLOW_VERSION = {spec.network_classes[1]: version for version, spec in SPECS.items()}
STAGES = ("flow", "hift")
# what int8 quantises per stage (graph name prefix); see quantized()
INT8_OPS = {"flow": ("MatMul",), "hift": ("MatMul", "Conv")}


def read_manifest(export_dir: str | Path) -> dict:
    path = Path(export_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelDirError(
            f"{path} is not a readable cosyvoice-lite export manifest: {exc}"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "cosyvoice-lite-onnx":
        raise ModelDirError(f"{path} is not a cosyvoice-lite export manifest")
    graphs, model = manifest.get("graphs"), manifest.get("model")
    if (
        not isinstance(graphs, dict)
        or not all(_describes_graph(g) for g in graphs.values())
        or not isinstance(model, dict)
        or not isinstance(model.get("version"), int)
        or not _maps(model.get("checkpoints"), str)
    ):
        raise ModelDirError(f"{path} is damaged: its graphs or its model are not described")
    return manifest


def _describes_graph(entry: object) -> bool:
    """A graph's entry: its file, and (since they were recorded) its files' sizes/fingerprints."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("file"), str)
        and _maps(entry.get("files"), dict)
    )


def _maps(value: object, kind: type) -> bool:
    """Absent (None), or a mapping of file names to ``kind`` (a list or a string there was a
    raw AttributeError or TypeError in the checks that read it)."""
    return value is None or (
        isinstance(value, dict)
        and all(isinstance(k, str) and isinstance(v, kind) for k, v in value.items())
    )


# the graphs the backend runs, per stage
BACKEND_GRAPHS = {"flow": ("flow_estimator", "flow_estimator_chunk"), "hift": ("hift",)}


def check_graphs(export_dir: Path, manifest: dict, stages: tuple[str, ...] = STAGES) -> None:
    """The graphs the backend would run are there, whole, the ones exported (each file's size
    and fingerprint as the manifest records them), and float32 (the backend's precision)."""
    for stage in stages:
        for name in BACKEND_GRAPHS[stage]:
            entry = manifest["graphs"].get(name)
            if entry is None:
                if name == BACKEND_GRAPHS[stage][0]:  # the stage's own graph (the chunk one is
                    # optional): missing, the networks would load and then fail
                    raise ModelDirError(f"{export_dir} has no {name} graph: export it whole")
                continue
            if entry.get("dtype", "float32") != "float32":
                raise ModelDirError(
                    f"{export_dir}: {name} is a {entry['dtype']} export; the onnxruntime "
                    "backend runs float32 graphs (export again without --dtype)"
                )
            files = entry.get("files") or {entry["file"]: {"bytes": None}}
            for file, recorded in files.items():
                path = export_dir / file
                if not path.is_file():
                    raise ModelDirError(f"{export_dir} is incomplete: {file} is missing")
                size = recorded.get("bytes")
                if size is not None and path.stat().st_size != size:
                    raise ModelDirError(
                        f"{export_dir}: {file} is {path.stat().st_size} bytes, the export wrote "
                        f"{size} (damaged or replaced): export again"
                    )
                if "fingerprint" in recorded and file_fingerprint(path) != recorded["fingerprint"]:
                    raise ModelDirError(
                        f"{export_dir}: {file} is not the graph this export wrote: export again"
                    )


def check_source(
    export_dir: Path, manifest: dict, model_path: Path, version: int | None = None
) -> None:
    """The graphs were exported from this model (``version``) and its weights (the checkpoints'
    fingerprints; an export made before they were recorded is not checked)."""
    exported = manifest["model"]["version"]
    if version is not None and version != exported:
        raise ModelDirError(
            f"{export_dir} holds a v{exported} export; the loaded model is v{version}"
        )
    recorded = manifest["model"].get("checkpoints") or {}
    for file in ("flow.pt", "hift.pt"):
        if file in recorded and file_fingerprint(model_path / file) != recorded[file]:
            raise ModelDirError(
                f"{export_dir} was exported from other weights than {model_path / file}: "
                "export this model"
            )


def session(path: Path, threads: int | None = None):
    """A CPU onnxruntime session using as many threads as torch does."""
    import onnxruntime as ort

    options = session_options(threads or torch.get_num_threads())
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own types: a file it cannot take
        raise ModelDirError(f"onnxruntime cannot load {path}: {exc}") from exc


def quantized(path: Path, ops: tuple[str, ...] = ("MatMul",)) -> Path:
    """An int8 copy of a graph, made once next to it in int8-<ops>/: onnxruntime's dynamic
    quantisation of the weights of `ops` (uint8, as its ConvInteger kernels take). The flow
    estimator gains from int8 MatMuls; int8 convolutions made it slower (benchmarks/README.md)."""
    target = path.parent / ("int8-" + "-".join(op.lower() for op in ops)) / path.name
    # tied to its source by the graph files' fingerprints, not by file times: an export copied
    # over another (cp -a, rsync -a keep times) had run the previous model's int8 weights
    source = target.parent / f"{path.name}.source"
    fingerprints = json.dumps(
        {
            file.name: file_fingerprint(file)
            for file in sorted(path.parent.glob(f"{path.stem}.onnx*"))
        }
    )
    with contextlib.suppress(OSError):  # (what a read-only export keeps stays)
        staging.remove_dead_work_dirs(target.parent, _work_dirs(path.stem), WORK_LOCK)
    if target.is_file() and source.is_file() and source.read_text() == fingerprints:
        return target
    # Made in a directory of this process's own (the quantiser also writes a shape-inferred
    # copy beside its input), then moved into place at once: processes starting together (a
    # server's replicas) each make a whole copy, and the last one in stays. Its lock proves it
    # alive: those of processes killed part-way (the OOM killer) are removed above.
    work = target.parent / f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}"
    try:
        target.parent.mkdir(exist_ok=True)
        work.mkdir()
        lock = staging.try_lock(work / WORK_LOCK)
    except OSError as exc:
        raise ModelDirError(
            f"cannot write the int8 copy of {path.name} in {target.parent} ({exc.strerror}): "
            "make the export directory writable once, or use --backend onnxruntime"
        ) from exc
    try:
        _quantize_into(work, path, ops, target)
        (work / "source").write_text(fingerprints)
        (work / "source").replace(source)  # after the copy: a crash between re-quantises
    except OSError as exc:
        raise _full(target.parent, path, exc) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock)
    return target


WORK_LOCK = "lock"  # in an int8 work directory, held by the process making the copy


def _work_dirs(stem: str) -> re.Pattern[str]:
    """The names of the int8 work directories of a graph (``quantized``)."""
    return re.compile(rf"\.{re.escape(stem)}\.\d+-[0-9a-f]{{8}}")


def _quantize_into(work: Path, path: Path, ops: tuple[str, ...], target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for file in path.parent.glob(f"{path.stem}.onnx*"):  # the graph and its external data
        (work / file.name).symlink_to(file.resolve())
    logging.disable(logging.WARNING)  # the quantiser warns about every float64 constant
    try:
        quantize_dynamic(
            str(work / path.name),
            str(work / "int8.onnx"),
            op_types_to_quantize=list(ops),
            weight_type=QuantType.QUInt8,
        )
    except Exception as exc:  # noqa: BLE001 - its own and protobuf's types: a copy cut short
        # (a full volume reads back as "Wire format was corrupt", like a damaged export)
        raise _full(target.parent, path, exc) from exc
    finally:
        logging.disable(logging.NOTSET)
    (work / "int8.onnx").replace(target)


def _full(directory: Path, path: Path, exc: BaseException) -> ModelDirError:
    """The int8 copy could not be written: most often for want of space (the quantiser writes
    a shape-inferred copy of the graph and the int8 one, up to twice its size)."""
    free = shutil.disk_usage(directory).free
    need = sum(file.stat().st_size for file in path.parent.glob(f"{path.stem}.onnx*"))
    return ModelDirError(
        f"cannot make the int8 copy of {path.name} in {directory}: {exc}. Is the volume full? "
        f"{free / 1e6:.0f} MB free, the copy takes up to {2 * need / 1e6:.0f} MB while it is "
        "made; or use --backend onnxruntime"
    )


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


# The graphs trace attention as MatMul/Softmax, so onnxruntime holds every head's T x T scores,
# several copies of them (12-24 bytes a score, measured on the tiny v2/v3 estimators), where
# torch's fused kernel holds none: past what this many bytes of scores allow, the torch layers
# the backend keeps run the call instead (graph_frame_limit).
GRAPH_ATTENTION_BYTES = 1 << 30
ORT_BYTES_PER_SCORE = 24


def graph_frame_limit(estimator: nn.Module, rows: int = CFG_ROWS) -> int:
    """The most frames an estimator graph runs before its attention scores pass
    GRAPH_ATTENTION_BYTES: 1,182 for CosyVoice3's 16 heads, 1,672 for 8 (v1/v2)."""
    heads = [m.heads for m in estimator.modules() if isinstance(getattr(m, "heads", None), int)]
    per_frame2 = ORT_BYTES_PER_SCORE * rows * max(heads, default=16)
    return math.isqrt(GRAPH_ATTENTION_BYTES // per_frame2)


class OrtEstimator(nn.Module):
    """forward(x, mask, mu, t, spks, cond, streaming=False) -> velocity, through onnxruntime.

    ``incremental`` keeps the torch estimator for a stream's incremental flow steps
    (``flow_matching.stream_estimator``): they compute a stream's new frames against its own
    cached keys and values, which a graph of whole inputs cannot hold, so streams run the torch
    layers (their weights stay in memory beside onnxruntime's), as ``OrtVocoder`` keeps the
    torch vocoder for streams. Calls of more than ``max_frames`` frames run them too (the
    graph's memory grows with the square of the frames); ``time_of(t)`` gives them the
    solver's time conditioning of that t (the schedule fixed at load released the weights
    that compute it), or None for torch to compute it."""

    def __init__(
        self,
        sessions: dict[bool, object],
        incremental: nn.Module,
        max_frames: int,
        time_of: Callable[[torch.Tensor], object | None] = lambda t: None,
    ) -> None:
        super().__init__()
        self.sessions = sessions  # streaming flag -> session
        self.incremental = incremental
        self.max_frames = max_frames
        self.time_of = time_of

    def forward(
        self, x, mask, mu, t, spks, cond, streaming: bool = False, time=None
    ) -> torch.Tensor:  # noqa: ANN001
        """The torch estimator's call; ``time`` is always None here (no ``time_conditioning``:
        the graph conditions on t itself; a long call's torch layers get theirs from
        ``time_of``)."""
        if x.shape[2] > self.max_frames:
            time = self.time_of(t.reshape(-1).expand(x.shape[0]))
            return self.incremental(x, mask, mu, t, spks, cond, streaming=streaming, time=time)
        run = self.sessions.get(bool(streaming))
        if run is None:
            raise ModelDirError("the export has no chunk-masked estimator (flow_estimator_chunk)")
        feeds = {
            "x": x,
            "mask": mask,
            "mu": mu,
            "t": t.reshape(-1).expand(x.shape[0]),
            "spks": spks,
            "cond": cond,
        }
        (velocity,) = run.run(["velocity"], {k: _numpy(v) for k, v in feeds.items()})
        return torch.from_numpy(velocity).to(device=x.device, dtype=x.dtype)


def solver_time(cfm: nn.Module, estimator: nn.Module) -> Callable[[torch.Tensor], object | None]:
    """``OrtEstimator.time_of`` for a torch estimator of the solver ``cfm``: the solver's table
    entry of the Euler step whose t this is (None for a t off its schedule)."""
    if not callable(getattr(estimator, "time_conditioning", None)):
        return lambda t: None

    def time_of(t: torch.Tensor) -> object | None:
        like = torch.empty(0, device=t.device, dtype=torch.float32)  # as the solver's state
        span = time_span(cfm.steps, cfm.t_scheduler, like)
        steps = [float(step_t) for step_t, _ in euler_times(span)]
        if float(t[0]) not in steps:
            return None
        return cfm.time_conditioning(
            estimator, cfm.steps, steps.index(float(t[0])), len(t), t.device
        )

    return time_of


class OrtVocoder:
    """The vocoder's `inference` through onnxruntime; anything else goes to the torch vocoder."""

    def __init__(self, hift: nn.Module, run) -> None:  # noqa: ANN001
        self.torch_vocoder = hift
        self.run = run
        self.causal = hift.causal

    def __getattr__(self, name: str):  # noqa: ANN204 (streaming state, attributes)
        return getattr(self.__dict__["torch_vocoder"], name)

    def inference(
        self,
        speech_feat: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        finalize: bool = True,
    ):  # noqa: ANN201
        hift = self.torch_vocoder
        if self.causal and not finalize:  # non-final windows of the official stream: torch
            return hift.inference(speech_feat, finalize=False)
        if speech_feat.dim() != 3 or speech_feat.shape[0] != 1 or speech_feat.shape[1] != 80:
            raise ModelDirError(
                f"the exported vocoder takes a mel [1, 80, T], got {tuple(speech_feat.shape)}"
            )
        phase, noise = draw_source_noise(hift, speech_feat.shape[2], generator)
        feeds = {"mel": _numpy(speech_feat), "phase": _numpy(phase), "noise": _numpy(noise)}
        if self.causal:
            (speech,) = self.run.run(["speech"], feeds)
            return torch.from_numpy(speech).to(speech_feat.device), None
        if cache_source is None:
            cache_source = torch.zeros(1, 1, 0)
        feeds["cache_source"] = _numpy(cache_source)
        speech, source = self.run.run(["speech", "source"], feeds)
        return (
            torch.from_numpy(speech).to(speech_feat.device),
            torch.from_numpy(source).to(speech_feat.device),
        )


def use_onnxruntime(
    pipeline_or_networks,
    export_dir: str | Path,
    stages: tuple[str, ...] = STAGES,
    int8: bool = False,
    threads: int | None = None,
    model_path: str | Path | None = None,
    max_graph_frames: int | None = None,
):  # noqa: ANN001, ANN201
    """Run the flow estimator and/or the vocoder of a pipeline (anything with `.flow` and `.hift`)
    or of a {"flow": ..., "hift": ...} dict through the graphs in export_dir. Returns it.
    ``model_path``: the model directory the networks come from, checked against the weights
    the graphs were exported from. ``max_graph_frames``: estimator calls of more frames run the
    torch estimator (default ``graph_frame_limit``: the graph's attention memory grows with the
    square of the frames). Installed again (int8 after float32, say), it replaces the graphs
    installed before."""
    if max_graph_frames is not None and max_graph_frames < 0:
        raise ValueError(f"max_graph_frames must be 0 or more, got {max_graph_frames}")
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    check_graphs(export_dir, manifest, stages)
    if model_path is None and not isinstance(pipeline_or_networks, dict):
        model_path = getattr(pipeline_or_networks, "model_path", None)  # (build_pipeline's)
    if model_path is not None:
        check_source(export_dir, manifest, Path(model_path))
    graphs = manifest["graphs"]
    is_dict = isinstance(pipeline_or_networks, dict)

    def get(name: str):
        return pipeline_or_networks[name] if is_dict else getattr(pipeline_or_networks, name)

    def put(name: str, value) -> None:  # noqa: ANN001
        if is_dict:
            pipeline_or_networks[name] = value
        else:
            setattr(pipeline_or_networks, name, value)

    flow = get("flow")
    version = FLOW_VERSION.get(type(flow).__name__)
    if version != manifest["model"]["version"]:
        raise ModelDirError(
            f"{export_dir} holds a v{manifest['model']['version']} export; "
            f"the loaded model is v{version}"
        )

    def open_graph(name: str):
        if name not in graphs:
            return None
        path = export_dir / graphs[name]["file"]
        return session(quantized(path, INT8_OPS[name.split("_")[0]]) if int8 else path, threads)

    if "flow" in stages:
        sessions = {False: open_graph("flow_estimator"), True: open_graph("flow_estimator_chunk")}
        if sessions[False] is None:
            raise ModelDirError(f"{export_dir} has no flow_estimator graph")
        graphs_by_flag = {k: v for k, v in sessions.items() if v is not None}
        estimator = flow.decoder.estimator
        if isinstance(estimator, OrtEstimator):  # installed before: its torch layers stay
            estimator = estimator.incremental
        limit = graph_frame_limit(estimator) if max_graph_frames is None else max_graph_frames
        time_of = solver_time(flow.decoder, estimator)
        flow.decoder.estimator = OrtEstimator(graphs_by_flag, estimator, limit, time_of)
        # a graph takes a whole utterance's guidance rows in one call (streams keep the torch
        # layers, whose rows may still run apart)
        flow.decoder.set_row_split(flow.decoder.stream_rows, utterances=False)
    if "hift" in stages:
        run = open_graph("hift")
        if run is None:
            raise ModelDirError(f"{export_dir} has no hift graph")
        hift = get("hift")
        put("hift", OrtVocoder(hift.torch_vocoder if isinstance(hift, OrtVocoder) else hift, run))
    return pipeline_or_networks


BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")


def check_backend_options(backend: str, onnx_dir: str | Path | None) -> None:
    """Engine.load's backend options, by themselves (no file read: ``check_load_options``)."""
    from ..errors import InvalidRequestError

    if backend not in BACKENDS:
        raise InvalidRequestError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "torch" and onnx_dir is not None:
        raise InvalidRequestError("--onnx-dir is only used with --backend onnxruntime")
    if backend != "torch" and onnx_dir is None:
        raise InvalidRequestError(
            f"--backend {backend} needs --onnx-dir: a directory written by "
            "`cosyvoice-lite export onnx` for this model"
        )


def check_backend_placement(backend: str, placement) -> None:  # noqa: ANN001
    """The onnxruntime backends run float32 graphs on the CPU (after ``check_backend_options``)."""
    from ..errors import DeviceError

    if backend != "torch" and (placement.device.type != "cpu" or placement.dtype != torch.float32):
        raise DeviceError(
            f"--backend {backend} runs float32 graphs on the CPU; "
            f"got {placement.device} / {placement.dtype}"
        )


def check_backend_dir(backend: str, onnx_dir: str | Path | None) -> None:
    """The export directory of checked backend options: a whole export, before any network
    loads (Engine.load, and ``serve`` before it starts: the load is in the background there)."""
    if backend != "torch":
        check_graphs(Path(onnx_dir), read_manifest(onnx_dir))


def check_backend_source(backend: str, onnx_dir: str | Path | None, model_dir) -> None:  # noqa: ANN001
    """Engine.load, once the model directory is known and before its networks load: the export
    is of this model and its weights."""
    if backend != "torch":
        check_source(Path(onnx_dir), read_manifest(onnx_dir), model_dir.path, model_dir.version)


def install_backend(pipeline, backend: str, onnx_dir: str | Path | None):  # noqa: ANN001, ANN201
    """Engine.load's hook: nothing for torch, else `use_onnxruntime` on the built pipeline."""
    if backend == "torch":
        return pipeline
    return use_onnxruntime(pipeline, onnx_dir, int8=backend.endswith("int8"))
