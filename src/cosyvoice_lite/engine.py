"""The synthesis engine: load a model once, then turn requests into streams of audio chunks.

    engine = Engine.load("CosyVoice-300M-SFT")                     # or a directory
    for chunk in engine.synthesize(SynthesisRequest(Mode.PRESET, "你好", voice="中文女")):
        play(chunk.samples, chunk.sample_rate)

One entry point (``synthesize``) serves every mode, streaming or not. The engine holds only
read-only things (networks, tokenizers, voices); all per-request state lives in the generator.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import numbers
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .decoding import LengthPolicy
from .device import Placement, configure_backend, resolve_placement, slow_precision_warning
from .engine_loop import DEFAULT_LIMITS, EngineLoop, Job, LoopLimits, Sink, close_at_exit
from .errors import (
    EngineClosedError,
    InvalidRequestError,
    ModelOutputError,
    UnknownVoiceError,
    UnsupportedModeError,
)
from .frontend.markup import (
    V1_TAGS,
    check_markup,
    held_back,
    instruction_in_text,
    own_system_prompt,
    unescape,
    user_markup,
    without_system_prompt,
)
from .frontend.prompt import PromptEncoder, PromptFeatures
from .frontend.text import TextFrontend, is_only_punctuation, speaks_nothing
from .heap import release_freed_memory
from .hub import resolve_model
from .modeldir import ModelDir, check_model_for_load, load_speakers
from .networks.flow_matching import check_steps
from .networks.graph_capture import traceable
from .onnx_threads import share_threads
from .pipelines.common import ModelInputs
from .precision import has_int8_products, int8_product_kernel, packs_linear
from .precision import stream_cache_dtype as resolve_stream_cache_dtype
from .request import (
    MAX_INSTRUCT_CHARS,
    MAX_PROMPT_SECONDS,
    MAX_PROMPT_TEXT_CHARS,
    MAX_SEED,
    MAX_SPEED,
    MIN_SPEED,
    AudioChunk,
    Mode,
    SynthesisRequest,
)
from .row_parallel import RowSplit
from .sampling import RasSampler
from .versions import ENDOFPROMPT, SYSTEM_PROMPT, VersionSpec, spec

log = logging.getLogger(__name__)

# Speech tokens one text segment may ask for (``max_speech_tokens``): what every flow and vocoder
# takes in one segment with a 30 s prompt (v2/v3: 15,000 fixed noise frames, 2 per token; the v3
# vocoder: 300 s, fewer tokens below speed 0.8: ``Engine._segment_tokens``), so a request never
# reaches their limits half-way.
# It is also the default cap: a text segment has the official bound (20 speech tokens per text
# token; the splitter keeps segments short), streamed text in has none of its own.
MAX_SPEECH_TOKENS = 6000

Progress = Callable[[int, int], None]  # (segments done, segments total)
PromptSource = PromptFeatures | Callable[[], PromptFeatures] | None

STREAM_NOISE_SALT = 0x5EED5EED


@dataclass(frozen=True)
class Voice:
    """A voice usable by name: a preset x-vector (spk2info.pt) or a saved prompt's features."""

    name: str
    kind: str  # "preset" or "prompt"
    embedding: torch.Tensor
    prompt: PromptFeatures | None = None


def _split_flow_rows(pipeline, placement: Placement, backend: str) -> None:  # noqa: ANN001
    """On a CPU with the torch backend and more than one torch thread (the CLI's ``--threads``),
    the flow estimator's rows are computed on that many threads with one torch thread each
    (row_parallel.py: no OpenMP wake-ups on its small operations), one share of the rows per
    thread where the products are oneDNN's packed ones (several streams' chunks: larger
    products, the same floats as alone), else each row alone. Whole utterances with
    ``exact_float32`` stay one batch, as the official computes them: split, a row's mel moves by
    ~1e-6, which the vocoder's phase turns into ~6e-3 of waveform. Otherwise (oneDNN's float32
    products round differently anyway; int8 products are nothing like the official's) their rows
    are split too: a float32 v2 utterance's flow 4-8% faster (benchmarks/README.md)."""
    threads = torch.get_num_threads()
    if placement.device.type != "cpu" or backend != "torch" or threads < 2:
        return
    # exact_float32 implies float32 weights (resolve_placement refuses it with others)
    exact = placement.exact_float32 and not has_int8_products(pipeline.flow)
    # shares where the flow's products are oneDNN's packed ones (and int8 ones, per row), which
    # compute a row alike in any batch; torch's default products (exact_float32, float16, a
    # CPU without bfloat16 products) are not known to
    split = RowSplit(threads, shares=packs_linear(placement))
    pipeline.flow.decoder.set_row_split(split, utterances=not exact)


def _share_onnx_threads(placement: Placement, backend: str, model_dir: ModelDir) -> bool:
    """One onnxruntime pool for the process (onnx_threads.py), where the int8 LLM gains from it:
    int8 decoding, the torch backend, and no flow products on onnxruntime. A flow's int8
    products (CosyVoice3's DiT) run there on a CPU without VNNI or AMX, from its row threads at
    once: two callers of a shared 2-thread pool took 1.25x as long as two with a thread each.
    Measured (full size, 2 cores, benchmarks/README.md): a CosyVoice-300M int8 step 1.16x
    faster, whole requests 1.16x / 1.07x the audio per second (one / four at once); CosyVoice2
    streams 1.15x / 1.11x (an AVX2 CPU: a step 1.33x, streams 1.11x / 1.04x). Called before any
    session exists; True if the process's sessions share a pool."""
    if placement.quantize != "int8" or backend != "torch":
        return False
    if int8_product_kernel(placement) == "onnxruntime" and _flow_has_int8_products(model_dir):
        return False
    share_threads(torch.get_num_threads())
    return True


def _flow_has_int8_products(model_dir: ModelDir) -> bool:
    """Whether the model's flow has int8 products, from its structure alone (no weights, no
    session); True if that cannot be told (the pools then stay per session, the safe side)."""
    from .pipelines import factory

    try:
        return factory.flow_declares_int8_products(model_dir)
    except Exception:  # noqa: BLE001 - a constructor the meta device cannot run: play safe
        log.warning("could not tell the flow's int8 products; onnxruntime pools stay per session")
        return True


def _captures_by_default(placement: Placement, backend: str) -> bool:
    """Whether graphs are captured unless the caller says: on a CPU with the torch backend,
    not with ``exact_float32`` (the official's calls as they are)."""
    return placement.device.type == "cpu" and backend == "torch" and not placement.exact_float32


def _capture_flow_graphs(
    pipeline,
    placement: Placement,
    backend: str,
    capture: bool | None,  # noqa: ANN001
) -> bool:
    """The flow estimator's calls as traced graphs (networks/graph_capture.py), where the
    estimator can be captured (the U-Nets and CosyVoice3's DiT: whole utterances and v2/v3
    streams' increments). By default on a CPU with the torch backend: there each of a call's
    ~2,000 operations paid Python and the interpreter lock, which the decoding loop and the
    other audio worker contend for (four concurrent whole requests 1.07-1.26x the throughput,
    CosyVoice2 streams 1.17-1.31x; benchmarks/README.md). Not with ``exact_float32``, which
    keeps the official's calls as they are, nor where the DiT's int8 products run on
    onnxruntime (a CPU without VNNI or AMX), which a trace cannot record
    (``graph_capture.traceable``). True if captured."""
    if capture is None:
        capture = _captures_by_default(placement, backend)
    estimator = getattr(pipeline.flow.decoder, "estimator", None)
    if capture and callable(getattr(estimator, "capture_graphs", None)) and traceable(estimator):
        estimator.capture_graphs()
        return True
    return False


def _capture_llm_graphs(
    pipeline,
    placement: Placement,
    backend: str,
    capture: bool | None,  # noqa: ANN001
) -> bool:
    """The LLM's decoding steps as traced graphs, where the LLM can be captured (the v1
    Transformer, CosyVoice2/3's Qwen2; not where its int8 products run on onnxruntime), under
    the same default as the flow's (``_capture_flow_graphs``). A step runs on the threads its
    packed products were given at load (``precision.apply_precision``). True if captured."""
    if capture is None:
        capture = _captures_by_default(placement, backend)
    llm = pipeline.llm
    if capture and callable(getattr(llm, "capture_graphs", None)) and traceable(llm):
        llm.capture_graphs(torch.get_num_threads())
        return True
    return False


def _log_failure(future: Future) -> None:
    error = future.exception()
    if error is not None and not isinstance(error, EngineClosedError):  # closed: stopped early
        log.warning("tracing the flow's graphs failed: %r", error)


def utterance_batch_size(
    placement: Placement, backend: str, max_batch: int, batch: bool | None
) -> int:
    """Whole utterances in one flow batch at most (1: each alone). A padded batch pays off where
    its rows run in parallel: on an accelerator one batch of B utterances costs about one
    utterance's kernel launches. On a CPU the flow is compute-bound (its rows already split over
    the cores, ``_split_flow_rows``), so a batch only adds its padding; float32 rows batched
    there also move by ~1e-6 from the official's (which the vocoder's phase turns into ~1e-2 of
    waveform). The onnxruntime backend keeps one utterance per call (its graphs were checked
    that way)."""
    if batch is None:
        batch = placement.device.type != "cpu"
    return max_batch if batch and backend == "torch" else 1


def decode_threads(placement: Placement) -> int | None:
    """Torch threads of the thread that runs the LLM (None: the process's). On a CPU whose LLM
    products are onnxruntime's int8 ones (their own thread pool) or oneDNN's packed ones (which
    take the process's threads for their call, ``precision.PackedLinear``), one: what torch
    computes between the products (norms, rotary embeddings, attention of one new position) is
    too small to share, and under the passive OpenMP wait policy each such operation on 2
    threads pays for waking the other. int8, full-size v2, 16 alternating rounds: median step
    28-32 ms against 32-35 ms, the prefill within noise; packed bfloat16, one process
    alternating: v2 53.8 -> 51.9 ms a step (4 rows 66.0 -> 60.7), v1 35.0 -> 34.2 ms (4 rows
    48.8 -> 45.8), the same floats (benchmarks/README.md)."""
    if placement.device.type != "cpu":
        return None
    return 1 if placement.quantize == "int8" or packs_linear(placement) else None


class Engine:
    """A loaded CosyVoice model: frontend, networks and voices. Thread-safe for reading."""

    def __init__(
        self,
        model: ModelDir,
        placement: Placement,
        text_frontend: TextFrontend,
        tokenizer,
        prompt_encoder: PromptEncoder,
        pipeline,
        voices: dict[str, Voice],
        load_seconds: float,
        limits: LoopLimits = DEFAULT_LIMITS,
    ) -> None:
        self.model = model
        self.placement = placement
        # the background trace of the flow's graphs after a load (done where nothing is
        # captured): what times its first requests can wait for it
        self.graphs_traced: Future = Future()
        self.graphs_traced.set_result(None)
        self.text_frontend = text_frontend
        self.tokenizer = tokenizer
        self.prompt_encoder = prompt_encoder
        self.pipeline = pipeline
        self.presets = voices
        self.load_seconds = load_seconds
        self.loop = EngineLoop(pipeline.llm, limits, decode_threads(placement))
        # an engine dropped without close(): its threads end once it is collected (they hold
        # the networks, not the engine, and kept its weights and threads for the process's life)
        self._finalizer = weakref.finalize(
            self, _close_dropped, self.loop, self.pipeline.flow.decoder
        )
        self._finalizer.atexit = False  # (at exit, running loops are closed anyway: _RUNNING)
        close_at_exit(self.loop, self.pipeline.flow.decoder.close_row_split)

    # ------------------------------------------------------------------ loading
    @staticmethod
    def check_load_options(**options: object) -> None:
        """The checks ``load`` makes of its options before reading any file (keywords of
        ``load``, defaults as there): a server that loads its model in the background refuses
        bad options at once instead of starting and failing to load."""
        names = inspect.signature(_checked_options).parameters
        unknown = sorted(set(options) - set(inspect.signature(Engine.load).parameters))
        if unknown:  # (a misspelt option was passed over)
            raise TypeError(f"Engine.load has no option {', '.join(map(repr, unknown))}")
        given = {k: v for k, v in options.items() if k in names}
        defaults = {
            name: param.default
            for name, param in inspect.signature(Engine.load).parameters.items()
            if name in names and name not in given
        }
        _checked_options(**defaults, **given)

    @classmethod
    def load(
        cls,
        model: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        variant: str | None = None,
        llm_checkpoint: str = "llm.pt",
        download: bool = True,
        quantize: str | None = None,
        flow_steps: int = 10,
        max_batch: int = DEFAULT_LIMITS.max_batch,
        prefill_tokens: int = DEFAULT_LIMITS.prefill_tokens,
        audio_workers: int = DEFAULT_LIMITS.audio_workers,
        idle_release_seconds: float | None = DEFAULT_LIMITS.idle_release_seconds,
        flow_threads_while_decoding: int | None = None,
        prompt_cache_mb: int = 2048,
        stream_cache_mb: int | None = 256,
        stream_cache_dtype: str | None = None,
        backend: str = "torch",
        onnx_dir: str | Path | None = None,
        batch_utterances: bool | None = None,
        exact_float32: bool = False,
        capture_graphs: bool | None = None,
        share_onnx_threads: bool = False,
    ) -> Engine:
        """Load an official model directory (or an official model name, downloaded once).

        ``variant`` overrides the v1 release detection (base / sft / instruct); ``llm_checkpoint``
        selects e.g. ``llm.rl.pt`` for the RL-tuned CosyVoice3 LLM. ``dtype`` stores the weights
        in that precision, ``quantize="int8"`` gives the LLM int8 linear layers and CosyVoice3's DiT
        int8 products (precision.py);
        ``flow_steps`` (official 10) trades the flow's quality for speed. ``max_batch`` requests
        decode together at most, one step prefills at most ``prefill_tokens`` positions, and
        ``audio_workers`` threads compute the flow and vocoder chunks of different requests.
        ``idle_release_seconds`` after the last request (and no other work), the freed heap goes
        back to the OS (None: never; engine_loop.LoopLimits). While the LLM decodes, a
        stream's flow call of fewer than two rows per row thread (on 2 threads: a lone stream's)
        uses ``flow_threads_while_decoding`` of them (None: half, at least one; calls once a
        stream has every token of its first piece use all of them).
        ``prompt_cache_mb`` bounds the memory of voices' prompt frames computed once through the
        v2/v3 streaming flow and shared by their streams (pipelines/prompt_flow.py; 0: per stream);
        ``stream_cache_mb`` is a threshold on each stream's own flow caches (checked before each
        flow call, so one chunk and buffer slack may pass it): past it they stop growing and the
        later frames are re-solved at every audio piece, as the official re-solves its whole
        history (flat memory, more compute). The default 256 bounds a stream whatever its length
        (unbounded, a float32 CosyVoice2 stream holds ~225 MB per second of audio, and a segment
        may run to minutes: a model that does not stop); None: unbounded.
        ``stream_cache_dtype`` ("float16" or "float32", float32 weights only) is the dtype of
        those caches and of the voices' prompt frames: float16 halves them at a rounding of the keys and values (streamed mel
        ~1e-5 relative); None: exact in float32, float16 with ``quantize="int8"``
        (precision.stream_cache_dtype).
        ``backend="onnxruntime"`` (or ``"onnxruntime-int8"``) runs the flow estimator and the
        vocoder through the graphs ``cosyvoice-lite export onnx`` wrote to ``onnx_dir``.
        ``batch_utterances``: whole (not streamed) v2/v3 utterances that end together have their
        flow computed as one padded batch of up to ``max_batch`` (``utterance_batch_size``;
        None: on an accelerator with the torch backend).
        ``exact_float32``: float32 by the official's kernels and operations, its floats on the
        same CPU (for parity checks); by default a CPU runs its float32 linear layers with
        oneDNN-packed weights and more (~1e-6 different, up to 2x faster flows: device.Placement).
        ``capture_graphs``: the flow estimator's calls (whole utterances, v2/v3 streams' chunks)
        and the LLM's decoding steps of one or two rows run as traced graphs, the same
        floats without Python between the operations (``_capture_flow_graphs``,
        ``_capture_llm_graphs``; None: on a CPU with the torch backend, not with
        ``exact_float32``). The graphs are traced in the background after the load (1-6 s each,
        once per process) and hold tens of MB each (full size): not worth it for a one-off
        request.
        ``share_onnx_threads``: where the int8 LLM gains from it (``_share_onnx_threads``), every
        onnxruntime session of the process from now on shares one pool of torch's thread count
        (onnx_threads.py). For good and process-wide: onnxruntime then refuses any session that
        asks for a pool of its own, so only a program that owns its process should ask (the CLI,
        the server and Ray replicas do).
        """
        start = time.perf_counter()
        limits, placement, cache_dtype = _checked_options(
            device, dtype, llm_checkpoint, quantize, flow_steps, max_batch, prefill_tokens,
            audio_workers, idle_release_seconds, flow_threads_while_decoding, prompt_cache_mb,
            stream_cache_mb, stream_cache_dtype, exact_float32, backend, onnx_dir,
            download=download, batch_utterances=batch_utterances, capture_graphs=capture_graphs,
            share_onnx_threads=share_onnx_threads,
        )  # fmt: skip
        if (warning := slow_precision_warning(placement)) is not None:
            log.warning(warning)
        configure_backend(placement)
        from .export.runtime import check_backend_dir, check_backend_source, install_backend

        check_backend_dir(backend, onnx_dir)
        model_dir = check_model_for_load(
            resolve_model(model, download=download), variant, llm_checkpoint, stream_cache_dtype
        )
        check_backend_source(backend, onnx_dir, model_dir)
        from .pipelines import factory  # version-specific wiring

        if share_onnx_threads:  # before any session
            _share_onnx_threads(placement, backend, model_dir)

        tokenizer = factory.text_tokenizer(model_dir, download)
        pipeline = factory.build_pipeline(
            model_dir,
            placement,
            llm_checkpoint,
            flow_steps,
            prompt_cache_mb << 20,
            None if stream_cache_mb is None else stream_cache_mb << 20,
            cache_dtype,
        )
        pipeline = install_backend(pipeline, backend, onnx_dir)
        _split_flow_rows(pipeline, placement, backend)
        pipeline.utterance_batch = utterance_batch_size(
            placement, backend, limits.max_batch, batch_utterances
        )
        # a batch's vocoder too, on an accelerator only: on 2 CPU cores the padded batch was
        # 0.6-1.0x as fast as one utterance after another (benchmarks/bench_vocoder_batch.py)
        pipeline.vocoder_batch = placement.device.type != "cpu"
        # On a CPU a stream's chunk calls leave their transients as free heap scattered over
        # the pages that calls before them used, resident ~0.4-0.7 GB past what the stream
        # holds; handed back after each call instead (1.02x the time, measured; heap.py)
        if placement.device.type == "cpu":
            pipeline.after_stream_call = release_freed_memory
        prompt_encoder = PromptEncoder(
            model_dir.path / "campplus.onnx",
            model_dir.path / f"speech_tokenizer_v{model_dir.version}.onnx",
            model_dir.config.mel,
        )
        voices = {
            name: _voice_from_spk2info(name, info)
            for name, info in load_speakers(model_dir.path / "spk2info.pt").items()
            if "embedding" in info or "flow_embedding" in info
        }
        engine = cls(
            model_dir,
            placement,
            TextFrontend(),
            tokenizer,
            prompt_encoder,
            pipeline,
            voices,
            time.perf_counter() - start,
            limits,
        )
        llm_captured = _capture_llm_graphs(pipeline, placement, backend, capture_graphs)
        if _capture_flow_graphs(pipeline, placement, backend, capture_graphs) or llm_captured:
            # traced in the background, not by the first voice or request that needs them
            engine.graphs_traced = engine.loop.background(pipeline.warm_graphs)
            engine.graphs_traced.add_done_callback(_log_failure)
        release_freed_memory()
        log.info(
            "loaded %s (v%d, %s) on %s in %.1f s",
            model_dir.name,
            model_dir.version,
            model_dir.variant,
            placement.device,
            engine.load_seconds,
        )
        return engine

    def wait_until_warm(self, timeout: float | None = None) -> bool:
        """Wait at most ``timeout`` seconds (None: as long as it takes) for the load's background
        work, the flow's graphs traced (``graphs_traced``: 1-6 s per graph on a fast CPU, ~20 s
        for all of CosyVoice2's on 2 AVX2 cores), which a request's flow call would otherwise
        wait for. True once it is over (failed included: the calls then run eagerly). Servers
        call it before they report ready, so that a load balancer sends traffic to warm
        replicas only."""
        try:
            self.graphs_traced.exception(timeout)
        except FutureTimeout:
            return False
        except CancelledError:
            pass
        return True

    # ------------------------------------------------------------------ facts
    @property
    def sample_rate(self) -> int:
        return self.model.config.sample_rate

    @property
    def version(self) -> int:
        return self.model.version

    @property
    def spec(self) -> VersionSpec:
        """What this model's version does differently (versions.py)."""
        return spec(self.model.version)

    @property
    def modes(self) -> tuple[Mode, ...]:
        """The modes this model supports."""
        modes = [Mode.ZERO_SHOT, Mode.CROSS_LINGUAL, Mode.VOICE_CONVERSION]
        if any(v.kind == "preset" for v in self.presets.values()):
            modes.insert(0, Mode.PRESET)
        if not self.spec.instruct_with_preset or self.model.variant == "instruct":
            modes.append(Mode.INSTRUCT)
        return tuple(modes)

    def voices(self) -> list[str]:
        return sorted(self.presets)

    def is_cloned_voice(self, name: str) -> bool:
        """Whether a voice stored with the model (spk2info.pt) is a cloned one (its prompt's
        features, as CosyVoice2's 'zero_shot_zh'): spoken zero-shot, not as a preset."""
        return name in self.presets and self.presets[name].kind != "preset"

    @functools.cached_property  # read per request and per streamed piece; the tokenizer is fixed
    def known_markup(self) -> frozenset[str]:
        """Inline tags this model understands ([breath], <strong>, <|en|>, [h][ào] ...)."""
        whisper = self.spec.text_tokenizer == "whisper"
        known = user_markup(self.tokenizer.special_tokens, whisper)
        if whisper:  # v1 tags are plain text to its tokenizer
            return V1_TAGS | known | {ENDOFPROMPT}
        return known

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, audio, prompt_text: str = "") -> PromptFeatures:
        """Features of a prompt recording, computed once (e.g. to save a voice). Escaped
        brackets in the transcript (``\\[sic]``) are text, as in a request."""
        if prompt_text is None:
            prompt_text = ""
        if not isinstance(prompt_text, str):
            raise InvalidRequestError(
                f"prompt_text must be text, got {type(prompt_text).__name__}", "prompt_text"
            )
        _check_length("prompt_text", prompt_text, MAX_PROMPT_TEXT_CHARS)
        _check_unicode("prompt_text", prompt_text)
        self.check_markup(prompt_text, "prompt_text")
        return self._encode_prompt(audio, unescape(prompt_text))

    def _encode_prompt(
        self, audio, prompt_text: str, max_seconds: float | None = None
    ) -> PromptFeatures:
        text = prompt_text.strip()
        if text and self.text_frontend is not None:
            text = self.text_frontend.normalize(text, split=False, encode=self.tokenizer.encode)
        return self.prompt_encoder.encode(audio, text, max_seconds)

    def prepare_voice(self, prompt: PromptFeatures, evict: bool = True) -> Future:
        """Compute, on an audio worker, what every stream of this voice shares (CosyVoice2/3: the
        prompt's frames through the streaming flow, kept within ``prompt_cache_mb``, the least
        recently used voice out first), so that even the first stream of a saved voice starts
        fast. The future's result is False when nothing is kept: the model keeps nothing per
        voice, the voice exceeds the budget (``prompt_cache_mb=0``, or by its estimated size:
        then nothing is computed), or (``evict=False``) keeping it would push out a voice kept
        earlier. It is background work that waits for the requests: it starts only while the
        engine has no request (one under way runs to its end), and at most one per audio worker
        waits; a newer preparation drops the oldest waiting one, whose future is then cancelled
        (the voice's first stream computes its part itself)."""
        # the flow's prompt inputs exactly as a request with this voice gets them (every mode
        # that clones a prompt gives the flow the same ones)
        if not isinstance(prompt, PromptFeatures):
            _check_prompt_source(prompt)  # names what it got
            raise InvalidRequestError("prepare_voice needs the voice's PromptFeatures")
        flows = getattr(self.pipeline, "prompt_flows", None)
        if flows is None or flows.budget_bytes == 0:  # nothing would be kept: nothing to wait for
            kept: Future = Future()
            kept.set_result(False)
            return kept
        request = SynthesisRequest(Mode.CROSS_LINGUAL)
        inputs = self._inputs(request, "", self._prompt(request, prompt))
        return self.loop.background(lambda: self.pipeline.prime_voice(inputs, evict), optional=True)

    # ------------------------------------------------------------------ synthesis
    def synthesize(
        self,
        request: SynthesisRequest,
        progress: Progress | None = None,
        prompt: PromptSource = None,
    ) -> Iterator[AudioChunk]:
        """Turn a request into audio chunks; ``prompt`` gives precomputed prompt features (a saved
        voice) in place of ``request.prompt_audio``. The work runs in the engine loop, stepped
        together with every other request; closing the iterator cancels it.

        ``progress(done, total)`` (text segments) is called in the thread iterating, never on an
        engine thread (a slow one holds up only its own iteration): ``progress(k, n)`` once
        segment k's last chunk has been yielded, before any chunk of a later segment and before
        the iteration ends (so a consumer that stops at the ``final`` chunk misses the last
        call). An error it raises ends the iteration and cancels the request."""
        sink = QueueSink(progress)
        report = None if progress is None else sink.progress
        job = self._submit(request, sink, progress, report, prompt)
        try:
            yield from sink
        finally:
            job.cancel()

    def submit(
        self,
        request: SynthesisRequest,
        sink: Sink,
        progress: Progress | None = None,
        prompt: PromptSource = None,
    ) -> Job:
        """Queue a request on the engine loop. Its chunks, then its end (``None`` or the error),
        go to ``sink`` from the loop thread; ``job.cancel()`` stops it at the next step.
        ``prompt`` may be a function, called in the loop when the request is admitted.

        With ``progress(done, total)``, a thread of the request's own calls it and the sink, in
        order (the chunks of segment k, then ``progress(k, n)``, ..., then the sink's end), so
        the callback never runs on an engine thread: a slow one delays only its own request's
        sink. An error the callback or the sink raises cancels the request and ends the sink
        with it."""
        if progress is None:
            return self._submit(request, sink, None, None, prompt)
        relay = QueueSink(progress)
        job = self._submit(request, relay, progress, relay.progress, prompt)
        try:
            threading.Thread(
                target=_relay, args=(relay, sink, job), name="cosyvoice-progress", daemon=True
            ).start()
        except BaseException:
            job.cancel()
            raise
        return job

    def _submit(
        self,
        request: SynthesisRequest,
        sink: Sink,
        progress: Progress | None,
        report: Callable[[int, int], None] | None,
        prompt: PromptSource,
    ) -> Job:
        """``report``: where the engine's audio worker puts a segment's end, without waiting (the
        sink's queue)."""
        _check_request_type(request)
        _check_progress(progress)
        request = _normalized(request)
        self._check(request)
        _check_prompt_source(prompt)
        request = _unescaped(request)
        return self.loop.submit(Job(lambda: self._prepare(request, report, prompt, sink), sink))

    def call(self, fn: Callable[[], object]) -> Future:
        """Run model work in the engine loop, between two steps (e.g. a health probe of the loop)."""
        return self.loop.call(fn)

    def close(self) -> None:
        """Stop the engine loop (pending requests end with an error). Needed: the loop's threads
        keep an engine, its weights and its threads alive until then (``with Engine.load(...)
        as engine:`` closes it at the block's end)."""
        self.loop.close()
        self.pipeline.flow.decoder.close_row_split()
        self._finalizer.detach()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _prepare(
        self,
        request: SynthesisRequest,
        report: Callable[[int, int], None] | None,
        prompt: PromptSource,
        sink: Sink,
    ) -> _Run:
        segments = self._segments(request)
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "little")
        generator = torch.Generator(device=self.placement.device).manual_seed(seed)
        sampler = RasSampler(generator, **vars(self.model.config.sampling))
        # Without streaming every draw comes from one generator in the official order (LLM, then
        # flow noise, then vocoder), which reproduces the official output. A stream interleaves
        # noise draws with sampling, so it draws its noise from a second generator: the spoken
        # tokens then do not depend on where the chunks fall.
        noise = generator
        if request.stream:
            noise = torch.Generator(device=self.placement.device).manual_seed(
                seed ^ STREAM_NOISE_SALT
            )
        if callable(prompt):
            prompt = prompt()
            if prompt is not None and not isinstance(prompt, PromptFeatures):
                raise InvalidRequestError(
                    "prompt= gave " + type(prompt).__name__ + ", not PromptFeatures (from "
                    "encode_prompt) or None"
                )
        prompt = self._prompt(request, prompt)
        max_tokens = request.max_speech_tokens or self._segment_tokens(request.speed)
        policy = LengthPolicy(max_tokens=max_tokens, ignore_eos=request.ignore_eos)
        # a voice conversion's source is decoded and tokenised here, on the preparing thread,
        # not when its segment starts on the loop (which stopped every row meanwhile)
        source = self._source_tokens(request) if request.mode == Mode.VOICE_CONVERSION else None
        return _Run(self, request, segments, prompt, sampler, noise, policy, report, sink, source)

    def _source_tokens(self, request: SynthesisRequest) -> torch.Tensor:
        wav, rate = self.prompt_encoder.load(
            request.source_audio, "source audio", request.max_audio_seconds
        )
        return self.prompt_encoder.tokens(wav, rate)

    def _chunk(self, piece: torch.Tensor, index: int, segment, final: bool) -> AudioChunk:
        samples = piece.detach().float().cpu().reshape(-1).numpy()
        # never handed on: LAME aborts the whole process on a NaN, and integer formats would
        # carry it as full-scale noise or silence behind a success
        if not np.isfinite(samples).all():
            bad = int(samples.size - np.isfinite(samples).sum())
            raise ModelOutputError(
                f"the model produced {bad} NaN or infinite samples of {samples.size}: its "
                f"weights are damaged (cosyvoice-lite check) or overflow in "
                f"{str(self.placement.dtype).removeprefix('torch.')}"
            )
        text = segment if isinstance(segment, str) else ""
        return AudioChunk(samples, self.sample_rate, index, final, text)

    def _check(self, request: SynthesisRequest) -> None:
        _check_types(request)
        if request.mode not in self.modes:
            supported = ", ".join(m.value for m in self.modes)
            raise UnsupportedModeError(
                f"{self.model.name} (CosyVoice v{self.version}, {self.model.variant}) does not support "
                f"mode '{request.mode.value}'; it supports: {supported}"
            )
        if not MIN_SPEED <= request.speed <= MAX_SPEED:
            raise InvalidRequestError(
                f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {request.speed}", "speed"
            )
        if request.stream and request.speed != 1.0:
            raise InvalidRequestError(
                "speed can only be changed without streaming (as the official)", "speed"
            )
        if (
            request.mode != Mode.VOICE_CONVERSION
            and isinstance(request.text, str)
            and not request.text.strip()
        ):
            raise InvalidRequestError("text is empty: give the text to speak", "text")
        _check_fields_used(request)
        if request.mode == Mode.INSTRUCT and not (request.instruct or "").strip():
            raise InvalidRequestError(
                "instruct mode needs an instruction (e.g. 'speak happily')", "instruct"
            )
        if request.mode == Mode.VOICE_CONVERSION and request.source_audio is None:
            raise InvalidRequestError("voice conversion needs source audio", "source_audio")
        if request.max_speech_tokens is not None and not (
            1 <= request.max_speech_tokens <= MAX_SPEECH_TOKENS
        ):
            raise InvalidRequestError(
                f"max_speech_tokens must be from 1 to {MAX_SPEECH_TOKENS} per text segment",
                "max_speech_tokens",
            )
        cap = self._segment_tokens(request.speed)
        if request.max_speech_tokens is not None and request.max_speech_tokens > cap:
            raise InvalidRequestError(
                f"at speed {request.speed:g} a text segment is at most {cap} speech tokens on "
                f"{self.spec.name} (its vocoder makes {self.spec.vocoder_max_seconds:g} s per "
                "call)",
                "max_speech_tokens",
            )
        if request.ignore_eos and request.max_speech_tokens is None:
            raise InvalidRequestError(
                "ignore_eos needs max_speech_tokens (the length to decode)", "ignore_eos"
            )
        for field in ("text", "instruct", "prompt_text"):
            if isinstance(value := getattr(request, field), str):
                self.check_markup(value, field)

    def check_markup(self, text: str, field: str = "text") -> None:
        """InvalidRequestError naming ``field`` for a tag in ``text`` this model does not know,
        or one of its own escaped (``frontend.markup``); a server checks a transcript it takes
        for a voice with it, as requests' texts are checked."""
        check_markup([text], self.known_markup, self.model.name, field)

    def _segment_tokens(self, speed: float) -> int:
        """The most speech tokens a text segment may have: ``MAX_SPEECH_TOKENS``, and where the
        vocoder makes at most so many seconds a call, what fills them once stretched for
        ``speed`` (v3 at speed 0.5: 3,750), so that no request fails after its decoding."""
        cap = MAX_SPEECH_TOKENS
        seconds = self.spec.vocoder_max_seconds
        if seconds is not None:
            cap = min(cap, int(seconds * self.spec.token_frame_rate * speed))
        return cap

    def _segments(self, request: SynthesisRequest) -> list:
        if request.mode == Mode.VOICE_CONVERSION:
            return [""]
        if not isinstance(request.text, str):
            if not self.spec.streaming_text_in:
                raise InvalidRequestError("streaming text input needs a CosyVoice2/3 model", "text")
            return [self._checked_pieces(request.text, self.spec.needs_system_prompt)]
        if (
            self.spec.needs_system_prompt
            and ENDOFPROMPT in own_system_prompt(request.text, ENDOFPROMPT)[1]
        ):
            raise instruction_in_text(
                self.model.name,
                "the text has a second <|endofprompt|> (the first ends its instruction)",
            )
        segments = self.text_frontend.normalize(
            request.text, split=True, enabled=request.text_frontend, encode=self.tokenizer.encode
        )
        # control tags alone (``<|en|>``; markup is kept whole) are not spoken either
        segments = [segment for segment in segments if not speaks_nothing(segment)]
        if not segments:
            raise InvalidRequestError(
                "the text has nothing to speak (only punctuation or symbols)", "text"
            )
        return segments

    def _checked_pieces(self, pieces: Iterable[str], system_prompt: bool) -> Iterator[str]:
        """Streaming text in, each piece checked as it arrives (in the request's text feeder
        thread: an error fails the request) as a whole text is before it is queued. With
        ``system_prompt`` (CosyVoice3: its prompt text carries one, set before the stream is
        read), the text's own canonical system prompt, up to <|endofprompt|>, is dropped rather
        than spoken after it, wherever the mark arrives in the text's first characters; another
        instruction there, or the mark after words already passed on, is an error
        (``without_system_prompt``): never spoken. A piece's end
        that may open a bracket tag or its escape (``[h``, ``\\``) waits for the next piece, so
        that a tag or an escape split between pieces reads as written."""
        spoken, pending = False, ""

        def checked(text: str) -> str:
            nonlocal spoken
            self.check_markup(text, "text")
            if system_prompt and ENDOFPROMPT in text:  # whole here: held_back keeps "<|endof"
                raise instruction_in_text(
                    self.model.name,
                    "<|endofprompt|> came in the streamed text after words already passed on (it "
                    "ends an instruction, which the LLM reads before the stream)",
                )
            text = unescape(text)
            spoken = spoken or not is_only_punctuation("".join(text.split()))
            return text

        if system_prompt:  # held back until its <|endofprompt|> can be decided
            pieces = without_system_prompt(pieces, ENDOFPROMPT, SYSTEM_PROMPT, self.model.name)
        for piece in pieces:
            if not isinstance(piece, str):
                raise InvalidRequestError(
                    f"streamed text pieces must be str, got {type(piece).__name__}", "text"
                )
            _check_unicode("text", piece)
            text = pending + piece
            cut = held_back(text)
            text, pending = text[:cut], text[cut:]
            if text:
                yield checked(text)
        if pending:
            yield checked(pending)
        if not spoken:
            raise InvalidRequestError(
                "text is empty: the streamed text had nothing to speak", "text"
            )

    def _preset(self, name: str | None, mode: Mode | None = None) -> Voice:
        if not name:
            what = f"mode '{mode.value}'" if mode is not None else "this mode"
            raise InvalidRequestError(
                f"{what} needs a voice; available: {', '.join(self.voices()) or 'none'}", "voice"
            )
        if name not in self.presets:
            raise UnknownVoiceError(
                f"unknown voice '{name}'; available: {', '.join(self.voices()) or 'none'}"
            )
        return self.presets[name]

    def _prompt(
        self, request: SynthesisRequest, prompt: PromptFeatures | None
    ) -> PromptFeatures | None:
        if request.mode == Mode.PRESET or (
            request.mode == Mode.INSTRUCT and self.spec.instruct_with_preset
        ):
            if self._preset(request.voice, request.mode).kind != "preset":
                raise InvalidRequestError(
                    f"'{request.voice}' is a cloned voice: use it with mode zero_shot", "voice"
                )
            return None
        if prompt is None and request.prompt_audio is None and request.voice in self.presets:
            prompt = self.presets[request.voice].prompt  # a voice saved in spk2info.pt
            if prompt is None:
                raise InvalidRequestError(
                    f"preset voice '{request.voice}' has no prompt recording, so it only speaks "
                    "as itself (mode preset): it cannot be cloned, take an instruction "
                    "(CosyVoice2/3) or be a voice-conversion target; use a saved voice or send "
                    "prompt audio",
                    "voice",
                )
            return prompt  # stored features are already aligned, as the official stores them
        if prompt is None:
            if request.prompt_audio is None and request.voice:
                self._preset(request.voice)  # an unknown voice is named as such
            if request.prompt_audio is None:
                raise InvalidRequestError(
                    f"mode '{request.mode.value}' needs prompt audio or a saved voice",
                    "prompt_audio",
                )
            # the request's transcript is unescaped already (``_unescaped``)
            prompt = self._encode_prompt(
                request.prompt_audio, request.prompt_text or "", request.max_audio_seconds
            )
        if (
            request.mode == Mode.ZERO_SHOT
            and not prompt.prompt_text
            and not (request.prompt_text or "").strip()
        ):
            raise InvalidRequestError(
                "zero-shot cloning needs the transcript of the prompt audio", "prompt_text"
            )
        _check_prompt(prompt, self.pipeline.llm.speech_token_size)
        ratio = self.spec.prompt_mel_ratio
        if ratio is not None and request.mode != Mode.VOICE_CONVERSION:
            prompt = prompt.aligned(ratio)
        return prompt

    def _tokens(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer.encode(text)], dtype=torch.int32)

    def _text_tokens(self, segment):
        if isinstance(segment, str):
            return self._tokens(segment)
        # Streaming text in: each piece is tokenised on its own (no normalisation, as the official)
        # and handed to the LLM one token at a time, which decides when the 5:15 mixing advances.
        return ([token] for piece in segment for token in self.tokenizer.encode(piece))

    def _instruction(self, instruct: str) -> str:
        """The instruction as each version's LLM expects it; users write only the instruction."""
        instruct = self.spec.instruction(instruct.strip())
        if self.spec.instruct_with_preset:  # v1 normalises it as upstream (which its <|...|> skips)
            instruct = self.text_frontend.normalize(
                instruct, split=False, encode=self.tokenizer.encode
            )
        return instruct

    def _with_system_prompt(
        self, prompt_text: str, text, stored: bool = False
    ) -> tuple[str, object]:
        """CosyVoice3 needs <|endofprompt|> in its input: add the canonical system prompt where the
        user did not write one (before the transcript, or before the text when there is none).
        A whole text's own system prompt or instruction (up to its <|endofprompt|>) is obeyed,
        never spoken: cross-lingually as written (upstream); with a transcript or an instruction
        (upstream puts it after them, and it was spoken) the canonical one is dropped and an
        instruction takes the transcript's system prompt's place, where upstream's zero-shot
        prompts carry theirs, unless that one is an instruction too (instruct, or ``stored``: a
        saved voice's transcript tokens): an error. Streamed text: ``_checked_pieces``."""
        if not self.spec.needs_system_prompt:
            return prompt_text, text
        own, body = own_system_prompt(text, ENDOFPROMPT) if isinstance(text, str) else (None, text)
        if own is not None and prompt_text:
            if own in ("", SYSTEM_PROMPT):  # no instruction: as if the text had no system prompt
                return self._with_system_prompt(prompt_text, body)
            system, mark, transcript = prompt_text.partition(ENDOFPROMPT)
            if mark and (stored or system.strip() not in ("", SYSTEM_PROMPT)):
                raise instruction_in_text(
                    self.model.name,
                    f"the text carries its own instruction ({own[:40]!r} before <|endofprompt|>) "
                    "besides the one in instruct or the voice's transcript: give one",
                )
            return text[: len(text) - len(body)] + (transcript if mark else prompt_text), body
        if own is not None or ENDOFPROMPT in prompt_text:
            return prompt_text, text
        if prompt_text:
            return f"{SYSTEM_PROMPT}{ENDOFPROMPT}{prompt_text}", text
        if not isinstance(text, str):  # streamed text: the LLM starts from the prompt text
            return f"{SYSTEM_PROMPT}{ENDOFPROMPT}", text
        return prompt_text, f"{SYSTEM_PROMPT}{ENDOFPROMPT}{text}"

    def _has_system_prompt(self, tokens: torch.Tensor) -> bool:
        """Whether stored transcript tokens carry CosyVoice3's <|endofprompt|>."""
        if not self.spec.needs_system_prompt:
            return False
        mark = self.tokenizer.encode(ENDOFPROMPT)
        return len(mark) == 1 and mark[0] in tokens.flatten().tolist()

    def _inputs(
        self,
        request: SynthesisRequest,
        segment,
        prompt: PromptFeatures | None,
        source: torch.Tensor | None = None,
    ) -> ModelInputs:
        """A segment's network inputs; ``source``: a voice conversion's source tokens, if
        already computed."""
        empty_tokens = torch.zeros(1, 0, dtype=torch.int32)
        no_embedding = torch.zeros(0, 192)
        prompt_text = ""
        if request.mode == Mode.ZERO_SHOT and prompt.prompt_tokens is not None:
            prompt_text = None  # stored as tokens (official zero-shot spk2info entries)
        elif request.mode == Mode.ZERO_SHOT:
            prompt_text = prompt.prompt_text or (request.prompt_text or "").strip()
        elif request.mode == Mode.INSTRUCT:
            prompt_text = self._instruction(request.instruct or "")
        if prompt_text is None:
            prompt_tokens = prompt.prompt_tokens
            if self._has_system_prompt(prompt_tokens):  # as a transcript's (_with_system_prompt)
                segment = self._with_system_prompt(ENDOFPROMPT, segment, stored=True)[1]
        else:
            prompt_text, segment = self._with_system_prompt(prompt_text, segment)
            prompt_tokens = self._tokens(prompt_text) if prompt_text else empty_tokens
        text = self._text_tokens(segment)
        if prompt is None:  # a preset voice (and v1 instruct, which also speaks with a preset)
            voice = self._preset(request.voice, request.mode)
            # v1 instruct drops the LLM x-vector, as the official does against information leakage
            llm_embedding = no_embedding if request.mode == Mode.INSTRUCT else voice.embedding
            inputs = ModelInputs(
                text,
                prompt_tokens,
                empty_tokens,
                llm_embedding,
                empty_tokens,
                torch.zeros(1, 0, 80),
                voice.embedding,
            )
        else:
            llm_speech = prompt.speech_tokens if request.mode == Mode.ZERO_SHOT else empty_tokens
            if request.mode == Mode.VOICE_CONVERSION and source is None:
                source = self._source_tokens(request)
            inputs = ModelInputs(
                text,
                prompt_tokens,
                llm_speech,
                prompt.embedding,
                prompt.speech_tokens,
                prompt.speech_feat,
                prompt.embedding,
                source,
            )
        return _to_device(inputs, self.placement.device)


class _Run:
    """A request prepared for the engine loop: its segments, sampler, noise and where audio goes."""

    def __init__(
        self,
        engine: Engine,
        request: SynthesisRequest,
        segments: list,
        prompt: PromptFeatures | None,
        sampler: RasSampler,
        noise: torch.Generator,
        policy: LengthPolicy,
        report: Callable[[int, int], None] | None,
        sink: Sink,
        source: torch.Tensor | None = None,
    ) -> None:
        """``source``: a voice conversion's source tokens; ``report(done, total)``: a segment's
        end, passed on without waiting (never the caller's progress callback itself: it runs on
        an audio worker every request shares)."""
        self.engine, self.request, self.segments, self.prompt = engine, request, segments, prompt
        self.sampler, self.noise, self.policy = sampler, noise, policy
        self.report, self.sink = report, sink
        self.stream = request.stream
        self.serial_segments = noise is sampler.generator
        self.source = source

    def start_segment(
        self, index: int, on_text: Callable[[], None] | None = None
    ) -> tuple[object, object]:
        engine, request = self.engine, self.request
        inputs = engine._inputs(request, self.segments[index], self.prompt, self.source)
        task = engine.pipeline.task(inputs, self.sampler, self.policy, on_text)
        audio = engine.pipeline.start(inputs, self.noise, request.stream, request.speed)
        return task, audio

    def emit(self, piece: torch.Tensor, index: int, final: bool) -> None:
        self.sink.chunk(self.engine._chunk(piece, index, self.segments[index], final))

    def segment_done(self, index: int) -> None:
        if self.report is not None:
            self.report(index + 1, len(self.segments))


class QueueSink:
    """A sink read by iterating it (from any thread): the chunks, then the end or the error.
    ``progress(done, total)`` queues a segment's end too, and iterating calls the ``progress``
    given here for it, in its place among the chunks: in the iterating thread, never in the
    engine thread that queued it."""

    _END = object()

    def __init__(self, progress: Progress | None = None) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._progress = progress

    def chunk(self, chunk: AudioChunk) -> None:
        self._queue.put(chunk)

    def progress(self, done: int, total: int) -> None:
        self._queue.put(_Progress(done, total))

    def end(self, error: BaseException | None) -> None:
        self._queue.put(self._END if error is None else error)

    def __iter__(self) -> Iterator[AudioChunk]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _Progress):
                if self._progress is not None:
                    self._progress(item.done, item.total)
                continue
            yield item


@dataclass(frozen=True)
class _Progress:
    done: int
    total: int


def _relay(relay: QueueSink, sink: Sink, job: Job) -> None:
    """``submit``'s thread for a request with a progress callback: the request's chunks and
    progress from ``relay`` to ``sink`` and its callback, in order, then the sink's end. An error
    of the callback or the sink (or the request's own) cancels the request and ends the sink."""
    error: BaseException | None = None
    try:
        for chunk in relay:
            sink.chunk(chunk)
    except BaseException as exc:  # noqa: BLE001 - handed to the sink
        error = exc
        job.cancel()  # (a no-op for a request that ended with this error)
    try:
        sink.end(error)
    except Exception:  # noqa: BLE001 - the caller's sink: logged, as the loop does
        log.exception("a request's sink failed at its end")


def _voice_from_spk2info(name: str, info: dict) -> Voice:
    """A spk2info.pt entry: an SFT voice ({'embedding'}) or an official zero-shot entry saved with
    ``add_zero_shot_spk`` (prompt tokens, speech tokens, mel and x-vectors)."""
    if "llm_prompt_speech_token" not in info:
        return Voice(name, "preset", info["embedding"].float().reshape(1, -1))
    prompt = PromptFeatures(
        speech_tokens=info["flow_prompt_speech_token"].to(torch.int32).cpu(),
        speech_feat=info["prompt_speech_feat"].float().cpu(),
        embedding=info["flow_embedding"].float().reshape(1, -1).cpu(),
        prompt_tokens=info["prompt_text"].to(torch.int32).cpu(),
    )
    return Voice(name, "prompt", prompt.embedding, prompt)


def _to_device(inputs: ModelInputs, device: torch.device) -> ModelInputs:
    moved = {
        k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(inputs).items()
    }
    return ModelInputs(**moved)


def synthesize_to_file(
    engine: Engine, request: SynthesisRequest, path: str | Path, progress: Progress | None = None
) -> float:
    """Run a request to completion and write it to ``path`` in the format its extension names
    (wav, mp3, flac, ogg, opus); returns the audio's seconds. The file appears whole or not at
    all (through a symlink, the file it points to; a file replaced keeps its permissions). A
    wrong request, an unknown extension or a path that cannot be written is an error before the
    synthesis."""
    import numpy as np

    from .audio.io import encode_audio
    from .files import EXTENSIONS, check_output_path, write_atomic

    _check_request_type(request)
    _check_progress(progress)
    fmt = EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InvalidRequestError(
            f"cannot tell the audio format of {str(path)!r}: name it {', '.join(EXTENSIONS)}"
        )
    path = check_output_path(path)
    chunks = list(engine.synthesize(request, progress))
    samples = np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32)
    write_atomic(path, encode_audio(samples, engine.sample_rate, fmt))
    return len(samples) / engine.sample_rate


def _close_dropped(loop: EngineLoop, decoder: object) -> None:
    """Close what a collected engine left running, on a thread of its own: the collection may
    happen on any thread, one of those being closed among them, which cannot wait for itself."""

    def close() -> None:
        loop.close()
        decoder.close_row_split()

    threading.Thread(target=close, name="engine-close", daemon=True).start()


def iter_text(pieces: Iterable[str]) -> Iterator[str]:
    """Wrap any iterable of text pieces (e.g. a chat model's stream) for streaming text input."""
    yield from pieces


__all__ = ["Engine", "Voice", "synthesize_to_file", "iter_text"]


def _check_unicode(field: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(
            f"{field} is not valid Unicode (a lone surrogate, e.g. from a non-UTF-8 argument)",
            field,
        ) from None


def _normalized(request: SynthesisRequest) -> SynthesisRequest:
    """The request with values that stand for the field's type converted to it: a mode's name
    ("zero_shot"), numpy integers and floats (a seed drawn with numpy). Anything else is left for
    ``_check_types`` to refuse."""
    changes: dict[str, object] = {}
    names = {mode.value for mode in Mode}
    if (
        isinstance(request.mode, str)
        and not isinstance(request.mode, Mode)
        and request.mode in names
    ):
        changes["mode"] = Mode(request.mode)
    for name, kind, to in (
        ("seed", numbers.Integral, int),
        ("max_speech_tokens", numbers.Integral, int),
        ("speed", numbers.Real, float),
    ):
        value = getattr(request, name)
        if isinstance(value, kind) and not isinstance(value, bool | type(to(0))):
            changes[name] = to(value)
    return dataclasses.replace(request, **changes) if changes else request


def _unescaped(request: SynthesisRequest) -> SynthesisRequest:
    """The request's texts as spoken, once checked: composed (NFC: a pinyin tone typed as a
    combining mark reads as the tag), escaped brackets (``\\[sic]``) are text."""
    changes = {
        name: spoken
        for name in ("text", "instruct", "prompt_text")
        if isinstance(value := getattr(request, name), str) and (spoken := unescape(value)) != value
    }
    return dataclasses.replace(request, **changes) if changes else request


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_request_type(request: object) -> None:
    """A text or a dict where the request goes (the commonest slip) failed deep inside the
    engine with an AttributeError."""
    if not isinstance(request, SynthesisRequest):
        raise InvalidRequestError(
            f"request must be a SynthesisRequest(mode, text, ...), got {type(request).__name__}"
        )


def _check_progress(progress: object) -> None:
    if progress is not None and not callable(progress):
        raise InvalidRequestError(
            "progress must be a function of (segments done, segments total) or None, got "
            f"{type(progress).__name__}",
            "progress",
        )


def _check_prompt_source(prompt: object) -> None:
    """``prompt=`` is features (``encode_prompt``), a function giving them, or None."""
    if prompt is not None and not callable(prompt) and not isinstance(prompt, PromptFeatures):
        hint = " (a voice's name goes in the request's voice=)" if isinstance(prompt, str) else ""
        raise InvalidRequestError(
            f"prompt must be PromptFeatures from encode_prompt, got {type(prompt).__name__}{hint}"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(request: SynthesisRequest) -> None:
    """Field types and ranges that the model's checks take for granted: a wrong one is a clear
    InvalidRequestError, not an internal error half-way."""
    if not isinstance(request.mode, Mode):
        modes = ", ".join(m.value for m in Mode)
        raise InvalidRequestError(f"mode must be a Mode ({modes}), got {request.mode!r}")
    if not _is_number(request.speed) or request.speed != request.speed:
        raise InvalidRequestError(f"speed must be a number, got {request.speed!r}", "speed")
    if request.seed is not None and not (_is_int(request.seed) and 0 <= request.seed <= MAX_SEED):
        raise InvalidRequestError(
            f"seed must be an integer from 0 to 2**64 - 1, got {request.seed!r}", "seed"
        )
    seconds = request.max_audio_seconds
    if seconds is not None and not (_is_number(seconds) and 0 < seconds <= MAX_PROMPT_SECONDS):
        raise InvalidRequestError(
            f"max_audio_seconds must be a number above 0 and at most {MAX_PROMPT_SECONDS:g}, "
            f"got {seconds!r}",
            "max_audio_seconds",
        )
    for flag in ("stream", "text_frontend", "ignore_eos"):  # (stream="no" streamed)
        if not isinstance(getattr(request, flag), bool):
            raise InvalidRequestError(
                f"{flag} must be True or False, got {getattr(request, flag)!r}", flag
            )
    if request.max_speech_tokens is not None and not _is_int(request.max_speech_tokens):
        raise InvalidRequestError(
            f"max_speech_tokens must be an integer, got {request.max_speech_tokens!r}",
            "max_speech_tokens",
        )
    text = request.text
    # pieces come in order: a mapping or a set (unordered) is a mistake, not streamed text
    unordered = isinstance(text, Mapping | Set)
    if isinstance(text, bytes | bytearray) or unordered or not isinstance(text, str | Iterable):
        raise InvalidRequestError(
            f"text must be a str or an iterable of str pieces in order (a list, a generator), "
            f"got {type(text).__name__}",
            "text",
        )
    for field in ("text", "prompt_text", "instruct", "voice"):
        value = getattr(request, field)
        if value is not None and not isinstance(value, str) and field != "text":
            raise InvalidRequestError(f"{field} must be a str, got {type(value).__name__}", field)
        if isinstance(value, str):
            _check_unicode(field, value)
    for field, limit in (("instruct", MAX_INSTRUCT_CHARS), ("prompt_text", MAX_PROMPT_TEXT_CHARS)):
        _check_length(field, getattr(request, field), limit)


# the optional fields each mode reads; one given to a mode that does not read it is an error
# (it was dropped without a word: an instruction in a preset request, a transcript cross-lingual)
_FIELDS_USED = {
    Mode.PRESET: {"voice"},
    Mode.ZERO_SHOT: {"voice", "prompt_audio", "prompt_text"},
    Mode.CROSS_LINGUAL: {"voice", "prompt_audio"},
    Mode.INSTRUCT: {"voice", "prompt_audio", "instruct"},
    Mode.VOICE_CONVERSION: {"voice", "prompt_audio", "source_audio"},
}
_FIELD_HINTS = {
    "prompt_text": "the prompt's transcript is read in mode zero_shot",
    "instruct": "instructions are read in mode instruct",
    "source_audio": "source audio is converted in mode vc",
    "prompt_audio": "a preset voice speaks without a prompt",
}


def _check_fields_used(request: SynthesisRequest) -> None:
    used = _FIELDS_USED[request.mode]
    for field in ("prompt_audio", "prompt_text", "instruct", "source_audio"):
        value = getattr(request, field)
        given = value.strip() != "" if isinstance(value, str) else value is not None
        if given and field not in used:
            raise InvalidRequestError(
                f"{field} is not used in mode '{request.mode.value}' ({_FIELD_HINTS[field]}); "
                "leave it out or choose that mode",
                field,
            )
    text = request.text
    if request.mode == Mode.VOICE_CONVERSION and not (isinstance(text, str) and not text.strip()):
        raise InvalidRequestError(
            "voice conversion speaks the source audio, not text: leave the text empty", "text"
        )


def _check_length(field: str, text: str | None, limit: int) -> None:
    if text is not None and len(text) > limit:
        raise InvalidRequestError(
            f"{field} is {len(text)} characters; at most {limit} are taken", field
        )


def _checked_options(
    device: str | torch.device,
    dtype: str | torch.dtype,
    llm_checkpoint: str,
    quantize: str | None,
    flow_steps: int,
    max_batch: int,
    prefill_tokens: int,
    audio_workers: int,
    idle_release_seconds: float | None,
    flow_threads_while_decoding: int | None,
    prompt_cache_mb: int,
    stream_cache_mb: int | None,
    stream_cache_dtype: str | None,
    exact_float32: bool,
    backend: str,
    onnx_dir: str | Path | None,
    *,
    download: bool,
    batch_utterances: bool | None,
    capture_graphs: bool | None,
    share_onnx_threads: bool,
) -> tuple[LoopLimits, Placement, torch.dtype | None]:
    """``Engine.load``'s options checked (an InvalidRequestError or DeviceError naming the
    option), as the loop limits, placement and stream cache dtype they give. (No file is read:
    the export directory's check is ``check_backend_dir``.)"""
    from .export.runtime import check_backend_options, check_backend_placement

    _check_flags(
        {
            "exact_float32": exact_float32,
            "download": download,
            "share_onnx_threads": share_onnx_threads,
        },
        {"batch_utterances": batch_utterances, "capture_graphs": capture_graphs},
    )

    if Path(llm_checkpoint).name != llm_checkpoint or not llm_checkpoint.endswith(".pt"):
        raise InvalidRequestError(
            f"llm_checkpoint must be a .pt file name in the model directory, got {llm_checkpoint!r}"
        )
    counts = {
        "max_batch": max_batch, "prefill_tokens": prefill_tokens, "audio_workers": audio_workers,
        "prompt_cache_mb": prompt_cache_mb, "stream_cache_mb": stream_cache_mb,
        "flow_threads_while_decoding": flow_threads_while_decoding,
    }  # fmt: skip
    for name, value in counts.items():
        if value is not None and not _is_int(value):
            raise InvalidRequestError(f"{name} must be a whole number, got {value!r}")
    seconds = idle_release_seconds
    if seconds is not None and not (_is_number(seconds) and math.isfinite(seconds)):
        raise InvalidRequestError(f"idle_release_seconds must be a number, got {seconds!r}")
    if prompt_cache_mb < 0 or (stream_cache_mb is not None and stream_cache_mb < 0):
        raise InvalidRequestError("prompt_cache_mb and stream_cache_mb must be at least 0")
    limits = LoopLimits(
        max_batch, prefill_tokens, audio_workers, idle_release_seconds, flow_threads_while_decoding
    )
    try:
        check_steps(flow_steps)
    except ValueError as exc:  # a load option: the caller's error, named as such
        raise InvalidRequestError(str(exc)) from None
    # (before the placement: a replica's device that this machine lacks ends the checks there)
    check_backend_options(backend, onnx_dir)
    placement = resolve_placement(device, dtype, quantize, exact_float32)
    check_backend_placement(backend, placement)
    try:
        cache_dtype = resolve_stream_cache_dtype(placement, stream_cache_dtype)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    return limits, placement, cache_dtype


def _check_flags(flags: dict[str, object], optional: dict[str, object]) -> None:
    """Flags are True or False (``optional`` ones None too): exact_float32="false" turned exact
    mode on, as any truthy value did."""
    for name, value in {**flags, **optional}.items():
        if not isinstance(value, bool) and not (value is None and name in optional):
            allowed = "True, False or None" if name in optional else "True or False"
            raise InvalidRequestError(f"{name} must be {allowed}, got {value!r}")


def _check_prompt(prompt: PromptFeatures, speech_tokens: int) -> None:
    """Features given to a request (``prompt=``, a stored voice) fit this model: speech tokens of
    its vocabulary, an 80-bin mel, a finite 192-dim x-vector. Features of another model's
    ``encode_prompt`` failed inside a network (an IndexError) or gave NaN audio."""
    tokens, feat, embedding = prompt.speech_tokens, prompt.speech_feat, prompt.embedding
    problem = None
    if tokens.dim() != 2 or tokens.dtype.is_floating_point:
        problem = f"speech_tokens must be integer ids [1, T], got {tuple(tokens.shape)}"
    elif tokens.numel() and not (int(tokens.min()) >= 0 and int(tokens.max()) < speech_tokens):
        problem = f"its speech tokens are not all in this model's 0..{speech_tokens - 1}"
    elif feat.dim() != 3 or feat.shape[-1] != 80 or not bool(torch.isfinite(feat).all()):
        problem = "speech_feat must be a finite mel [1, T, 80]"
    elif embedding.numel() != 192 or not bool(torch.isfinite(embedding).all()):
        problem = "embedding must be a finite x-vector of 192 values"
    if problem is not None:
        raise InvalidRequestError(
            f"the prompt features do not fit this model: {problem} (features of another "
            "model's encode_prompt?)"
        )
