"""The engine loop: one thread owns the model and steps every active request together.

Each step: admit waiting requests (their prompt and first segment are prepared then), feed every
row that needs it (a joining row's prefill alone, within a token budget; every decoding row's next
token in one batched call, each row on its own KV cache), hand each row its log-probabilities,
sample with the row's own generator, and hand the step's tokens to the audio workers at once. An
audio worker (a thread; a row always uses the same one) runs its rows' audio stages: the due flow
chunks of all its rows as one batch, then each row's vocoder piece, delivered at once; segment ends
and other work run after the batch. So decoding goes on while chunks are computed, and streams that
decode together share their flow calls. Finished, failed and cancelled rows leave at the next step;
a failing row fails alone.

LLM decoding is memory-bound, so stepping 8 rows costs little more than stepping 1: that is where
the throughput of concurrent requests comes from. A single request is a batch of one, so the CLI,
the Python API and the server all go through here, and torch's threads are used once, by this
loop, whatever the number of requests.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import queue
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .decoding import WAIT, Draw, Feed
from .errors import EngineClosedError, InvalidRequestError
from .heap import release_freed_memory
from .networks.abort import ComputationAborted, abort_when
from .networks.flow_matching import StreamCallError
from .row_parallel import at_most, set_own_threads, start_torch_thread
from .sampling import sample_rows

log = logging.getLogger(__name__)

# rows waiting for streaming text sleep until a piece arrives (``_text_arrived``); this is only
# how long at most, should a wake-up be lost
TEXT_WAIT_SECONDS = 1.0
# Rows waiting only for their previous segment's audio are woken when it is out; this bounds the
# wait should a wake-up be missed.
SEGMENT_WAIT_SECONDS = 1.0
FIRST_CHUNK_PRIORITY_SECONDS = 5.0  # at most this long does decoding wait for a first chunk
PREPARE_THREADS = 2  # requests prepared at once (see _ensure_thread)
ADMIT_TOGETHER_SECONDS = 2.0  # at most this long does a prepared request wait for its burst
CANCEL_POLL_SECONDS = 0.05  # how often a wait for a first chunk looks at its request's cancel
# A worker with a due flow call waits for its other streams this many tokens from theirs, at most
# this long (a few decoding steps), so their chunks are computed in one batch.
BATCH_WAIT_TOKENS = 2
BATCH_WAIT_SECONDS = 0.5
# how often an audio worker with optional background work waiting (a voice's preparation) looks
# whether the engine has no request left, so that it may start it
BACKGROUND_POLL_SECONDS = 0.1
# close() waits this long at most for the engine's threads, all together (each stops at its next
# step once its requests have ended: networks.abort's checks, at most a few seconds apart on 2
# cores for a 6,000-token utterance); a warning names those still busy then
CLOSE_WAIT_SECONDS = 10.0
# At interpreter exit the engines' threads are waited for this long at most (all together, a
# warning every CLOSE_WAIT_SECONDS): a thread still inside a torch op when the interpreter
# finalizes aborts the process (SIGABRT, "terminate called without an active exception").
EXIT_WAIT_SECONDS = 120.0
LOOP_FAULT_PAUSE_SECONDS = 1.0  # the loop's pause after its wait failed (a bug), so as not to spin
MAX_AUDIO_WORKERS = 64  # each is a thread with the process's torch threads
MAX_IDLE_RELEASE_SECONDS = 86400.0  # a day (a wait must stay below threading.TIMEOUT_MAX)


class Sink(Protocol):
    """Where a request's output goes; called from the loop thread."""

    def chunk(self, chunk: Any) -> None: ...

    def end(self, error: BaseException | None) -> None: ...


class Run(Protocol):
    """A prepared request, as the engine builds it (see ``Engine._prepare``)."""

    segments: list
    stream: bool  # chunks as they are ready (the first one gets priority)
    # its audio stage draws noise from the generator its sampling draws from (the official
    # order, without streaming): a segment's sampling starts once the previous one's audio is out
    serial_segments: bool

    def start_segment(
        self, index: int, on_text: Callable[[], None] | None = None
    ) -> tuple[Any, Any]:
        """(decoding task, audio stage) of segment ``index``; ``on_text`` is called as its
        streamed text arrives."""

    def emit(self, piece: torch.Tensor, index: int, final: bool) -> None: ...

    def segment_done(self, index: int) -> None: ...


@dataclass
class Job:
    """One submitted request: ``prepare()`` runs in the loop thread when the request is admitted
    and returns its :class:`Run`; ``sink`` gets its end (or error)."""

    prepare: Callable[[], Run]
    sink: Sink
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_cancel: Callable[[], None] | None = None  # the loop's wake-up, set when submitted
    _ended: bool = field(default=False, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def cancel(self) -> None:
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel()  # a queued request ends at once, also while the loop is idle

    def end(self, error: BaseException | None) -> None:
        """End the request at its sink once: close() ends it from its own thread while the
        thread that had it in hand (a preparer, the loop) may end it too."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        _end_sink(self.sink, error)


@dataclass(eq=False)
class _Row:
    job: Job
    run: Run
    segment: int = 0
    task: Any = None
    audio: Any = None
    cache: Any = None
    feed: Feed | None = None
    draw: Draw | None = None  # a token to sample, with the step's other rows' (sample_rows)
    reply: torch.Tensor | int | None = None
    failed: bool = False  # its audio stage failed: the loop drops the row at the next step
    audio_worker: int = -1  # index of the audio worker that computes its chunks
    streaming: bool = False  # the request streams: its first chunk has priority (TTFA)
    audio_out: bool = False  # some of its audio has been delivered
    first_audio: threading.Event = field(default_factory=threading.Event)  # set with audio_out
    sent: int = 0  # tokens of the current segment handed to its audio stage
    next_segment: int | None = None  # a serial run's segment that waits for the audio before it
    segments_out: int = 0  # segments whose audio is out (the audio worker counts them)
    hold_until: float | None = None  # decoding waits for its first piece until then at most
    on_end: Callable[[_Row], None] | None = None
    on_segment_out: Callable[[], None] | None = None  # wakes the loop for ``next_segment``
    _ended: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def delivered(self) -> None:
        """Some of its audio is out."""
        self.audio_out = True
        self.first_audio.set()

    def segment_out(self, segment: int) -> None:
        """A segment's audio is out (the audio worker): a serial run's next one may start."""
        self.segments_out = segment + 1
        if self.on_segment_out is not None:
            self.on_segment_out()

    def waits_for_audio(self) -> bool:
        """Whether its next segment waits for the audio before it (a serial run)."""
        return self.next_segment is not None and self.segments_out < self.next_segment

    def tokens_to_first_piece(self) -> int | None:
        """For a stream with no audio out yet, the tokens its first piece still needs (0: it has
        them all, and the loop holds decoding until that piece is out); None otherwise."""
        audio = self.audio
        need = None if audio is None else audio.first_piece_tokens
        if (
            not self.streaming
            or self.audio_out
            or self.segment != 0
            or need is None
            or self._ended
            or self.job.cancelled.is_set()
        ):
            return None
        return max(0, need - self.sent)

    def end(self, error: BaseException | None) -> None:
        """End the request once (from whichever thread gets there first)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self.first_audio.set()
        if error is not None and not isinstance(error, Exception):
            error = RuntimeError(f"synthesis stopped: {error!r}")
        if self.on_end is not None:
            self.on_end(self)
        self.job.end(error)

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def gone(self) -> bool:
        """Ended (close() ends it from its own thread) or cancelled: its audio is not wanted."""
        return self._ended or self.job.cancelled.is_set()


@dataclass(frozen=True)
class _AudioWork:
    row: _Row
    audio: Any  # the segment's audio stage (V1Segment / V2Segment)
    segment: int
    token: int | None = None  # None: the segment's tokens are complete
    last: bool = False  # the request's last segment


@dataclass
class _Background:
    """Work for an audio worker that belongs to no row (e.g. priming a saved voice's flow). It
    starts once no row's work waits on its worker, and, with ``wait_while``, not while that
    says so (optional work: while the engine has requests)."""

    fn: Callable[[], Any]  # replaced by a no-op once dropped (its inputs freed at once)
    future: Future
    wait_while: Callable[[], bool] | None = None

    def ready(self) -> bool:
        return self.wait_while is None or not self.wait_while()


def _nothing() -> None:
    return None


class AudioWorker:
    """The thread that runs rows' audio stages (flow + vocoder chunks), in order per row.

    Tokens and segment ends arrive from the loop thread, a step's worth at a time. The worker
    takes everything queued, advances each row through its tokens up to its next due flow call,
    and computes the due flow calls of all those rows together (``Pipeline.flow_steps``: one
    batch), then vocodes the pieces they complete (together where the pipeline batches them,
    ``Pipeline.complete_pieces``) and delivers each at once; it repeats until the rows' tokens are
    used up. A failing stage fails its row alone (an error inside a batched computation, e.g.
    out of memory, fails the rows of that batch). Work of no row (``EngineLoop.background``,
    e.g. preparing a saved voice) runs only when no row's work is queued, one job at a time
    (``_take``), so a stream's chunk waits at most for the one under way. While the loop
    decodes, streams' flow calls use fewer row threads (``narrow``), except on the way to a
    first piece.
    """

    def __init__(
        self, threads: int, decoding: Callable[[], bool] = lambda: False, narrow: int | None = None
    ) -> None:
        """``threads``: the worker's torch threads (the process's count); ``decoding``: whether
        the loop is decoding now (it shares the cores); ``narrow``: the flow's row threads then
        (None: all)."""
        self._decoding, self._narrow = decoding, narrow
        # Clear while a stream's first chunk is being computed: the loop holds its decoding
        # step meanwhile, so the first audio is not slowed down by other rows' tokens.
        self.no_first_chunk = threading.Event()
        self.no_first_chunk.set()
        self.running = False  # in a pass over queued work
        self.flow_calls = 0  # flow computations so far (a batch counts once; for tests, metrics)
        self.flow_streams = 0  # stream chunks those computations covered
        self.utterance_batches = 0  # batches of several whole utterances computed together
        # streaming rows seen here -> their audio stage; weak, so that a request that ended
        # (and its flow caches) is freed even while this worker has nothing to do
        self._streams: weakref.WeakKeyDictionary[_Row, Any] = weakref.WeakKeyDictionary()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # background work taken off the queue, waiting for a moment with no row's work (_take);
        # this thread's alone
        self._deferred: collections.deque[_Background] = collections.deque()
        # set by stop(): computations stop between their steps, and work put later fails
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()  # nothing is queued behind the stop mark
        self._thread = start_torch_thread(self._main, threads, "engine-audio", threads)

    def backlog(self) -> int:
        return self._queue.qsize() + len(self._deferred)

    def put(self, work: _AudioWork | _Background | list[_AudioWork]) -> None:
        """Queue work; once stopped, it fails at once (nobody would ever read it)."""
        with self._stop_lock:
            if not self._stopping.is_set():
                self._queue.put(work)
                return
        _close_queued([work])

    def stop(self) -> None:
        with self._stop_lock:
            self._stopping.set()
            self._queue.put(None)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def _main(self) -> None:
        with torch.inference_mode():
            while not self._run_once():
                pass

    def _run_once(self) -> bool:
        """One pass over everything queued; True at the stop mark. (Its own frame, so nothing of
        the pass, e.g. an ended request, stays referenced while the worker waits.)"""
        items, stop = self._take()
        self.running = True
        try:
            self._run(items)
        finally:
            self.running = False
        return stop

    @property
    def idle(self) -> bool:
        """Nothing queued and no pass under way."""
        return not self.running and self._queue.empty() and not self._deferred

    def _take(self) -> tuple[list[Any], bool]:
        """The rows' work queued, all of it (waiting for the first entry), or, when none is
        queued, one background job whose time has come (``EngineLoop.background``: work of no
        row never runs while a row's work waits here, so a live stream waits at most for the
        one under way); True once the stop mark is reached."""
        while True:
            job = self._ready_background()
            entries: list[Any] = []
            if job is None:
                try:  # with background work waiting for its moment: a look now and then
                    timeout = BACKGROUND_POLL_SECONDS if self._deferred else None
                    entries.append(self._queue.get(timeout=timeout))
                except queue.Empty:
                    continue
            while True:
                try:
                    entries.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items: list[Any] = []
            for index, entry in enumerate(entries):
                if entry is None:
                    _close_queued([*entries[index + 1 :], *self._deferred])
                    self._deferred.clear()
                    return items, True
                items.extend(self._rows_work(entry))
            if items:
                return items, False
            job = self._ready_background()
            if job is not None:
                self._deferred.remove(job)
                return [job], False

    def _rows_work(self, entry: Any) -> list[Any]:
        """The rows' work of a queue entry; its background work waits in ``_deferred``."""
        items = entry if isinstance(entry, list) else [entry]
        self._deferred.extend(item for item in items if isinstance(item, _Background))
        return [item for item in items if not isinstance(item, _Background)]

    def _ready_background(self) -> _Background | None:
        """The first background job waiting that may start now (those dropped meanwhile go)."""
        for job in [job for job in self._deferred if job.future.cancelled()]:
            self._deferred.remove(job)
        return next((job for job in self._deferred if job.ready()), None)

    def _run(self, items: list[Any]) -> None:
        rows: dict[_Row, collections.deque[_AudioWork]] = {}
        later: list[Any] = []  # segment ends and work of no row: after the due flow calls
        due: list[tuple[_AudioWork, Any, bool]] = []
        try:
            self._sort(items, rows, later)
            while rows or later:
                due = []
                self._collect(rows, due, later)
                if due:
                    self._wait_for_neighbours(rows, due, later)
                    self._flow_together(due)
                self._run_later(later)
        except BaseException as exc:  # noqa: BLE001 - a bug here must not kill the worker
            log.exception("audio worker pass failed; failing its rows")
            for row in {*rows, *(work.row for work, _, _ in due)}:
                _fail(row, exc)
            for item in later:
                if isinstance(item, _Background):
                    item.future.set_exception(exc)
                else:
                    _fail(item.row, exc)
        finally:
            self._forget_ended()

    @staticmethod
    def _sort(
        items: list[Any], rows: dict[_Row, collections.deque[_AudioWork]], later: list[Any]
    ) -> None:
        """Queue each row's work in order; work of no row goes to ``later``."""
        for item in items:
            if isinstance(item, _Background):
                later.append(item)
            else:
                rows.setdefault(item.row, collections.deque()).append(item)

    def _collect(
        self,
        rows: dict[_Row, collections.deque[_AudioWork]],
        due: list[tuple[_AudioWork, Any, bool]],
        later: list[Any],
    ) -> None:
        """Advance every row not yet in ``due`` through its queued work up to its next due flow
        call, which joins ``due``; segment ends and work of no row go to ``later`` (they run
        after the due flow calls, so a stream's chunk never waits behind them)."""
        # rows with a due call or a segment end pending go no further until those have run
        taken = {work.row for work, _, _ in due}
        taken.update(item.row for item in later if isinstance(item, _AudioWork))
        for row, works in list(rows.items()):
            while works and row not in taken:
                work = works.popleft()
                if work.token is None:
                    later.append(work)
                    taken.add(row)  # its next segment's work waits for this end
                    continue
                if _gone(work):
                    continue
                if row.streaming:
                    self._streams[row] = work.audio
                # the flow call of a stream's first piece (its tokens are all there): decoding
                # waits for it
                first = row.tokens_to_first_piece() == 0
                try:
                    flow = work.audio.accept(work.token)
                except BaseException as exc:  # noqa: BLE001 - a failing row fails alone
                    _fail(row, exc)
                    continue
                if flow is not None:
                    due.append((work, flow, first))
                    taken.add(row)
            if not works:
                del rows[row]

    def _run_later(self, later: list[Any]) -> None:
        wholes = {id(item): _whole_utterance(item) for item in later}
        # whole utterances last: their flow is computed together, after the others' work
        later.sort(key=lambda item: wholes[id(item)] is not None)
        speech = self._utterances_together(
            [(item, wholes[id(item)]) for item in later if wholes[id(item)] is not None]
        )
        for item in later:
            if isinstance(item, _Background):
                # stopped between its steps once the engine closes: tracing the flow's graphs
                # after a load takes ~20 s on a slow CPU, and a process that exits meanwhile
                # must not wait for it all (nor abort inside a torch op, see _RUNNING)
                with abort_when(self._stopping.is_set):
                    _run_into(item.fn, item.future)
            else:
                self._streams.pop(item.row, None)
                if not _gone(item):
                    self._finish(item, speech.pop(id(item), None))
        later.clear()

    def _utterances_together(self, wholes: list[tuple[_AudioWork, Any]]) -> dict[int, torch.Tensor]:
        """The waveforms of whole utterances (segment ends with their ``whole_utterance``),
        flow and vocoder computed in padded batches (``Pipeline.utterances``) where the pipeline
        batches them; keyed by id of the work. What a batch did not give (it failed) is computed
        alone, failing alone."""
        if len(wholes) < 2 or wholes[0][0].audio.pipeline.utterance_batch < 2:
            return {}
        try:
            with abort_when(lambda: self._stopping.is_set() or all(w.row.gone for w, _ in wholes)):
                speech, batches = wholes[0][0].audio.pipeline.utterances([u for _, u in wholes])
        except ComputationAborted:
            return {}  # every row was cancelled, or the engine closed: none is computed
        self.utterance_batches += batches
        return {id(w): s for (w, _), s in zip(wholes, speech, strict=True) if s is not None}

    def _wait_for_neighbours(
        self,
        rows: dict[_Row, collections.deque[_AudioWork]],
        due: list[tuple[_AudioWork, Any, bool]],
        later: list[Any],
    ) -> None:
        """Streams that decode together reach their chunks within a step or two of each other
        (they joined at different steps); computing a chunk alone and the others' a moment later
        costs about twice one batch on a CPU. So while another stream of this worker is at most
        ``BATCH_WAIT_TOKENS`` tokens from a flow call that can join this batch, wait for it (a
        bounded time)."""
        if not due[0][0].audio.pipeline.batches_flow_chunks:
            return
        deadline = time.monotonic() + BATCH_WAIT_SECONDS
        while True:
            self._forget_ended()
            taken = {work.row for work, _, _ in due}
            soon = [
                row
                for row, audio in list(self._streams.items())
                if row not in taken and _due_within(audio, BATCH_WAIT_TOKENS)
            ]
            left = deadline - time.monotonic()
            if not soon or left <= 0:
                return
            try:
                entry = self._queue.get(timeout=left)
            except queue.Empty:
                return
            if entry is None:  # stopping: handled by the main loop after this batch
                self._queue.put(None)
                return
            self._sort(self._rows_work(entry), rows, later)
            self._collect(rows, due, later)

    def _forget_ended(self) -> None:
        """Drop the streams whose rows have ended (their audio stages hold their flow caches)."""
        for row in [r for r in list(self._streams) if r.ended or r.job.cancelled.is_set()]:
            self._streams.pop(row, None)

    def _threads(self, pipeline: Any, narrowable: bool) -> AbstractContextManager:
        """The row threads of a flow call: fewer while the loop decodes beside it (looked at
        each Euler step) where ``narrowable`` (not on the way to a stream's first piece, which
        decoding waits for). Only incremental stream calls (``batches_flow_chunks``), whose rows
        compute alike in any share: a whole utterance's rows may round differently in another
        share (float32 convolutions), so its audio would depend on the load."""
        if not narrowable or self._narrow is None or not pipeline.batches_flow_chunks:
            return nullcontext()
        return at_most(self._narrow, while_=self._decoding)

    def _flow_together(self, due: list[tuple[_AudioWork, Any, bool]]) -> None:
        """The due flow calls of several rows as one batch, then each row's piece."""
        first = any(first for _, _, first in due)
        if first:
            self.no_first_chunk.clear()
        try:
            with (
                self._threads(due[0][0].audio.pipeline, narrowable=not first),
                abort_when(self._stopping.is_set),  # not on a cancel: the batch's others go on
            ):
                self._pieces_of(due)
        finally:
            self.no_first_chunk.set()

    def _pieces_of(self, due: list[tuple[_AudioWork, Any, bool]]) -> None:
        """The flow calls of ``due`` (one batch where the pipeline batches them), then the pieces
        they complete, each delivered at once; a failing row fails alone."""
        try:
            pipeline = due[0][0].audio.pipeline
            flows = [flow for _, flow, _ in due]
            if not pipeline.batches_flow_chunks:
                mels = [_one_flow(pipeline, flow) for flow in flows]
            else:
                try:
                    mels = pipeline.flow_steps(flows)
                except StreamCallError:
                    # a stream's bad call, found before any stream changed: each on its own
                    # (any other error may come after some streams advanced: all fail, below)
                    mels = [_one_flow(pipeline, flow) for flow in flows]
            self.flow_calls += 1
            self.flow_streams += len(due)
            live = []  # the rows whose flow call gave a mel, still wanted
            for (work, _, _), mel in zip(due, mels, strict=True):
                if isinstance(mel, BaseException):
                    _fail(work.row, mel)
                elif not _gone(work):
                    live.append((work, mel))
            # the pieces those calls complete (vocoded together where the pipeline batches them)
            pieces = pipeline.complete_pieces([w.audio for w, _ in live], [m for _, m in live])
            for (work, _), piece in zip(live, pieces, strict=True):
                try:
                    if isinstance(piece, BaseException):
                        raise piece
                    if piece is not None and not _gone(work):  # (it may end while others vocode)
                        work.row.delivered()
                        work.row.run.emit(piece, work.segment, False)
                except BaseException as exc:  # noqa: BLE001 - a failing row fails alone
                    _fail(work.row, exc)
        except ComputationAborted:  # the engine closed (close() has ended these rows)
            for work, _, _ in due:
                _fail(work.row, _closed())
        except BaseException as exc:  # noqa: BLE001
            # Not a stream's bad call: the batch's streams are in an unknown state, all fail.
            log.exception("a batched flow call failed; failing its %d rows", len(due))
            for work, _, _ in due:
                _fail(work.row, exc)

    def _finish(self, work: _AudioWork, speech: torch.Tensor | None = None) -> None:
        """A segment's last piece (its remaining tokens through flow and vocoder; ``speech``: a
        whole utterance's waveform computed with others)."""
        row = work.row
        first = row.streaming and not row.audio_out
        if first:
            self.no_first_chunk.clear()
        try:
            run = row.run
            with (
                self._threads(work.audio.pipeline, narrowable=row.streaming and not first),
                abort_when(lambda: row.gone or self._stopping.is_set()),
            ):
                piece = work.audio.finish(speech)
            if _gone(work):
                return  # ended or cancelled meanwhile: nobody wants the piece
            row.delivered()
            run.emit(piece, work.segment, work.last)
            run.segment_done(work.segment)
            row.segment_out(work.segment)
            if work.last:
                row.end(None)
        except ComputationAborted:
            # cancelled: it ends as a cancelled request does, quietly (closed: already ended)
            row.end(_closed() if self._stopping.is_set() else None)
        except BaseException as exc:  # noqa: BLE001 - a failing row fails alone
            _fail(row, exc)
        finally:
            self.no_first_chunk.set()


def _closed() -> EngineClosedError:
    """The error of a request or call the engine's closing cut off (one each: an exception
    raised in several threads would gather all their tracebacks)."""
    return EngineClosedError("the engine was closed")


def _close_queued(entries: list[Any]) -> None:
    """Work queued behind a worker's stop mark (or put after it) ends with an error instead of
    never."""
    for entry in entries:
        if entry is None:  # another stop mark
            continue
        for item in entry if isinstance(entry, list) else [entry]:
            if isinstance(item, _Background):
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(_closed())
            else:
                _fail(item.row, _closed())


def _one_flow(pipeline: Any, flow: Any) -> Any:
    """One stream's flow call alone: its mel, or the error it raised."""
    try:
        return pipeline.flow_steps([flow])[0]
    except ComputationAborted:
        raise  # the engine closed: not this row's fault
    except BaseException as exc:  # noqa: BLE001 - handed to its row
        return exc


def _whole_utterance(item: Any) -> Any:
    """The whole-utterance flow call of a live segment end (``Segment.whole_utterance``), or
    None."""
    if not isinstance(item, _AudioWork) or item.token is not None:
        return None
    if item.row.ended or item.row.job.cancelled.is_set():
        return None
    return item.audio.whole_utterance()


def _due_within(audio: Any, tokens: int) -> bool:
    """Whether the audio stage's next flow call is due within ``tokens`` more tokens."""
    due_in = audio.due_in()
    return due_in is not None and due_in <= tokens


def _gone(work: _AudioWork) -> bool:
    """Whether the work's row has ended or was cancelled (its last work ends it quietly)."""
    row = work.row
    if not (row.ended or row.job.cancelled.is_set()):
        return False
    row.first_audio.set()  # it will never deliver: decoding must not wait for its first piece
    if work.token is None and work.last:
        row.end(None)
    return True


def _fail(row: _Row, exc: BaseException) -> None:
    row.failed = True
    row.end(exc)


def _end_sink(sink: Sink, error: BaseException | None) -> None:
    """End a request at its sink; a sink that raises there (the caller's code) fails nothing else."""
    try:
        sink.end(error)
    except Exception:  # noqa: BLE001 - logged: the loop and the other requests go on
        log.exception("a request's sink failed at its end")


# Loops with threads, closed at interpreter exit: a daemon thread still inside a torch op when
# the interpreter finalizes aborts the process (exit status 134) if the engine was not closed.
_RUNNING: weakref.WeakSet[EngineLoop] = weakref.WeakSet()


# what else a running engine started (its flow's row threads): closed after its loop at exit
_AT_EXIT: weakref.WeakKeyDictionary[EngineLoop, Callable[[], None]] = weakref.WeakKeyDictionary()


def close_at_exit(loop: EngineLoop, close: Callable[[], None]) -> None:
    """Call ``close`` after ``loop`` is closed at exit, if it is still running then."""
    _AT_EXIT[loop] = close


@atexit.register
def _close_running_loops() -> None:
    """Close every running loop at interpreter exit, and return only once their threads have
    ended (``EXIT_WAIT_SECONDS`` at most, all together): the interpreter's finalization aborts
    the process while a thread is inside a torch op. They stop at their next step (a few seconds
    at most: the networks' abort checks); a second Ctrl-C stops the wait."""
    loops = list(_RUNNING)
    for loop in loops:  # all of them told first, so that their threads stop together
        loop.stop()
    deadline = time.monotonic() + EXIT_WAIT_SECONDS
    try:
        while busy := _wait_for_threads(
            loops, min(deadline, time.monotonic() + CLOSE_WAIT_SECONDS)
        ):
            left = deadline - time.monotonic()
            if left <= 0:
                log.error(
                    "exiting with engine threads still computing after %g s (the process may "
                    "abort): %s", EXIT_WAIT_SECONDS, _describe(busy),
                )  # fmt: skip
                break
            log.warning(
                "exiting: waiting for engine threads to stop (%.0f s at most): %s",
                left, _describe(busy),
            )  # fmt: skip
    except KeyboardInterrupt:
        log.warning("exiting without waiting for the engine's threads (interrupted)")
        return
    for loop in loops:
        closing = _AT_EXIT.get(loop)
        if closing is not None:
            closing()


def _wait_for_threads(loops: list[EngineLoop], deadline: float) -> list[threading.Thread]:
    """Wait until ``loops``' threads have ended or ``deadline`` (time.monotonic()) has passed;
    those still alive (other than the calling thread)."""
    for loop in loops:
        for thread in loop.threads_alive():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return [thread for loop in loops for thread in loop.threads_alive()]


def _describe(threads: list[threading.Thread]) -> str:
    """Each thread's name and what it is computing: the innermost calls of its stack in this
    package (a thread's name alone does not say which network holds it)."""
    frames = sys._current_frames()  # noqa: SLF001 - the documented way to see another thread's stack
    parts = []
    for thread in threads:
        frame = frames.get(thread.ident) if thread.ident is not None else None
        stack = traceback.extract_stack(frame) if frame is not None else []
        ours = [f for f in stack if _PACKAGE_DIR in f.filename] or stack
        calls = [
            f"{_short(f.filename)}:{f.lineno} {f.name}" for f in reversed(ours[-_CALLS_SHOWN:])
        ]
        parts.append(f"{thread.name} in " + (" < ".join(calls) if calls else "?"))
    return "; ".join(parts)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_CALLS_SHOWN = 4  # the innermost calls a warning names per thread


def _short(filename: str) -> str:
    """A source file's path within this package (or its name elsewhere)."""
    if filename.startswith(_PACKAGE_DIR + os.sep):
        return filename[len(_PACKAGE_DIR) + 1 :]
    return os.path.basename(filename)


@dataclass(frozen=True)
class LoopLimits:
    """``max_batch`` rows decode together at most (more requests wait their turn); a step
    prefills at most ``prefill_tokens`` positions (at least one request's prefix);
    ``audio_workers`` threads compute flow + vocoder chunks (a row always uses the same one).
    After ``idle_release_seconds`` with no request live and no audio work, the loop runs its idle
    hook once (the freed heap back to the OS, heap.py: after a float32 CosyVoice2 stream, 5.9 ->
    3.9 GB resident; None: never). Not right away: the next request faults those pages in again
    (5-7% of a stream's time), which a busy server should not pay between back-to-back requests.
    ``flow_threads_while_decoding``: the row threads an incremental stream call of fewer than
    two rows per row thread uses while the loop decodes beside it (row_parallel.at_most; None:
    half the threads, at least one), all of them otherwise and once a stream has every token of
    its first piece (decoding then waits for it). ``audio_workers`` is at most
    ``MAX_AUDIO_WORKERS`` (64) and ``idle_release_seconds`` at most ``MAX_IDLE_RELEASE_SECONDS``
    (a day)."""

    max_batch: int = 16
    prefill_tokens: int = 4096
    audio_workers: int = 2
    idle_release_seconds: float | None = 10.0
    flow_threads_while_decoding: int | None = None

    def __post_init__(self) -> None:
        if min(self.max_batch, self.prefill_tokens, self.audio_workers) < 1:
            raise InvalidRequestError(
                "max_batch, prefill_tokens and audio_workers must be at least 1"
            )
        if self.flow_threads_while_decoding is not None and self.flow_threads_while_decoding < 1:
            raise InvalidRequestError("flow_threads_while_decoding must be at least 1 (or None)")
        if self.audio_workers > MAX_AUDIO_WORKERS:
            raise InvalidRequestError(
                f"audio_workers must be at most {MAX_AUDIO_WORKERS} (each is a thread), "
                f"got {self.audio_workers}"
            )
        seconds = self.idle_release_seconds
        if seconds is not None and not 0 < seconds <= MAX_IDLE_RELEASE_SECONDS:
            raise InvalidRequestError(
                f"idle_release_seconds must be above 0 and at most {MAX_IDLE_RELEASE_SECONDS:g} "
                f"(a day; None: never), got {seconds!r}"
            )


DEFAULT_LIMITS = LoopLimits()


class EngineLoop:
    """The scheduler that owns all active requests of one loaded model."""

    def __init__(
        self,
        lm: torch.nn.Module,
        limits: LoopLimits = DEFAULT_LIMITS,
        decode_threads: int | None = None,
        on_idle: Callable[[], None] = release_freed_memory,
    ) -> None:
        """``decode_threads``: torch threads of the loop thread, which runs the LLM (None: the
        process's count when the loop is made, which the audio workers use). ``on_idle`` runs
        in the loop thread once per idle period (``limits.idle_release_seconds``)."""
        self.lm = lm
        self.limits = limits
        self.threads = torch.get_num_threads()
        self.decode_threads = decode_threads or self.threads
        self._waiting: collections.deque[Job] = collections.deque()  # not prepared yet
        # prepared off the loop thread, waiting for a row: (job, its run or why it failed)
        self._ready: collections.deque[tuple[Job, Run | BaseException | None, float]] = (
            collections.deque()
        )
        self._preparers: list[threading.Thread] = []
        self._preparing: list[Job] = []  # requests in the preparers' hands
        self._calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._optional: list[_Background] = []  # optional background work, newest last
        self._rows: list[_Row] = []  # decoding
        self._live: set[_Row] = set()  # admitted and not ended (decoding or vocoding)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._audio: list[AudioWorker] = []
        self._stopping = False
        self._holding = False  # decoding waits for a stream's first piece
        self._next_worker = 0
        self._outbox: dict[AudioWorker, list[_AudioWork]] = {}  # this step's audio work
        self._on_idle = on_idle
        self._idle_due = False  # work ran since the last on_idle
        self._resting = False  # the loop thread has the process's threads (_rest_threads)
        self.idle_calls = 0  # times on_idle ran (for tests and metrics)
        self.steps = 0  # batched decode calls so far (for tests and metrics)
        self.rows_stepped = 0  # rows those calls decoded
        self.waits = 0  # steps that found every row waiting (for text or audio) and slept
        self._text_arrivals = 0  # streamed text pieces (and ends) arrived: wakes a waiting loop

    # ------------------------------------------------------------------ submitting side
    @property
    def active(self) -> int:
        """Requests admitted and not finished (decoding, or their last audio being computed)."""
        return len(self._live)

    @property
    def flow_calls(self) -> tuple[int, int]:
        """(flow computations, stream chunks they covered) so far: chunks computed together
        make the second larger than the first."""
        return (
            sum(w.flow_calls for w in self._audio),
            sum(w.flow_streams for w in self._audio),
        )

    @property
    def utterance_batches(self) -> int:
        """Batches of several whole utterances whose flow was computed together so far."""
        return sum(w.utterance_batches for w in self._audio)

    @property
    def decoding(self) -> int:
        return len(self._rows)

    def _decoding_beside(self) -> bool:
        """Whether the loop thread decodes now: a row has its next input (not every row waiting
        for streaming text) and decoding is not held for a first piece. Read from the audio
        workers without a lock: a stale answer only sets the width of one flow step."""
        return not self._holding and any(row.feed is not None for row in self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._ready)

    def submit(self, job: Job) -> Job:
        with self._wake:
            if self._stopping:
                raise EngineClosedError("the engine is closed")
            self._ensure_thread()  # first: a thread that fails to start leaves nothing queued
            job.on_cancel = self._wake_up
            self._waiting.append(job)
            self._wake.notify_all()  # the preparer takes it
        return job

    def _wake_up(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` in the loop thread between two steps (model work that must not run beside
        decoding), so that it shares the loop's threads."""
        future: Future = Future()
        with self._wake:
            if self._stopping:
                raise EngineClosedError("the engine is closed")
            self._ensure_thread()
            self._calls.append((fn, future))
            self._wake.notify_all()
        return future

    def background(self, fn: Callable[[], Any], optional: bool = False) -> Future:
        """Run ``fn`` on an audio worker once no row's work waits there (work that must not hold
        up decoding nor any stream, e.g. tracing the flow's graphs after a load); one under way
        is not interrupted, but no other starts while a row's work waits. ``optional``: work
        that may never run (a saved voice's prompt through the flow, which its streams compute
        themselves otherwise): it starts only while the engine has no request, and at most
        ``len(audio workers)`` wait: a newer one drops the oldest waiting, whose future is
        cancelled (logged at debug)."""
        future: Future = Future()
        dropped: list[_Background] = []
        with self._wake:
            if self._stopping:
                raise EngineClosedError("the engine is closed")
            self._ensure_thread()
            job = _Background(fn, future, self._has_requests if optional else None)
            if optional:
                waiting = [old for old in self._optional if not old.future.running()]
                waiting = [old for old in waiting if not old.future.done()]
                while len(waiting) >= len(self._audio):
                    dropped.append(waiting.pop(0))
                self._optional = [*waiting, job]
            worker = min(self._audio, key=AudioWorker.backlog)  # the least busy one
            worker.put(job)
            self._idle_due = True
            self._wake.notify_all()
        for old in dropped:  # outside the lock: a future's callbacks run here
            if old.future.cancel():
                old.fn = _nothing  # what it would have computed from is freed now
                log.debug(
                    "background work dropped for newer work (%d wait at most)", len(self._audio)
                )
        return future

    def _has_requests(self) -> bool:
        """Whether a request is queued, being prepared or live (optional background work waits).
        Read from the audio workers without the lock: a stale answer only moves a start."""
        return bool(self._live or self._waiting or self._ready or self._preparing)

    def close(self, wait: float = CLOSE_WAIT_SECONDS) -> bool:
        """End every request not finished (queued, being prepared, decoding, in its audio stage)
        and every call not started with EngineClosedError, at once; stop the threads at their
        next step and wait for them (``wait`` seconds at most, all together). Not only the
        loop's own exit ends them: a step may outlast the wait, and a row in its audio stage is
        no longer the loop's. False if a thread was still busy after ``wait`` (a warning names
        it and what it computes; it ends at its next step, and the exit waits for it)."""
        self.stop()
        busy = _wait_for_threads([self], time.monotonic() + wait)
        if busy:
            log.warning(
                "engine closed with %d thread(s) still computing after %g s (each stops at its "
                "next step): %s", len(busy), wait, _describe(busy),
            )  # fmt: skip
        return not busy

    def threads_alive(self) -> list[threading.Thread]:
        """The engine's threads not ended yet (not the calling one: it cannot wait for itself)."""
        threads = (*self._preparers, self._thread, *(w.thread for w in self._audio))
        return [
            thread
            for thread in threads
            if thread is not None and thread.is_alive() and thread is not threading.current_thread()
        ]

    def stop(self) -> None:
        """``close`` without the wait: every request and call ended, every thread told to stop."""
        with self._wake:
            self._stopping = True  # nothing is submitted or admitted from now on
            jobs = [*self._queued(), *self._preparing]
            self._waiting, self._ready = collections.deque(), collections.deque()
            rows = list(self._live)
            self._wake.notify_all()
        for job in jobs:
            job.end(_closed())
        for row in rows:  # its audio worker stops its computation at the next step
            _fail(row, _closed())
        _fail_calls(self._calls)
        for worker in self._audio:
            worker.stop()

    def _ensure_thread(self) -> None:
        _RUNNING.add(self)
        narrow = self.limits.flow_threads_while_decoding or max(1, self.threads // 2)
        while len(self._audio) < self.limits.audio_workers:
            # one at a time: those started before a start that fails are close()'s to stop
            self._audio.append(AudioWorker(self.threads, self._decoding_beside, narrow))
        if self._thread is None or not self._thread.is_alive():
            self._thread = start_torch_thread(
                self._main, self.decode_threads, "engine-loop", self.threads
            )
        # off the loop thread: on it, a request's preparation stopped every row's decoding;
        # more than one, so that a slow one (a long new prompt's features, a long text) does not
        # hold back the start of every request submitted after it
        self._preparers = [thread for thread in self._preparers if thread.is_alive()]
        while len(self._preparers) < PREPARE_THREADS:
            self._preparers.append(
                start_torch_thread(self._prepare_main, 1, "engine-prepare", self.threads)
            )

    # ------------------------------------------------------------------ preparing thread
    def _prepare_main(self) -> None:
        """Prepare submitted requests (``Job.prepare``: the text's segments, the prompt's
        features), taken in order, beside the loop's decoding, for the loop to admit when a row
        frees (in the order they are ready)."""
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._waiting and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        return
                    job = self._waiting.popleft()
                    self._preparing.append(job)
                result: Run | BaseException | None = None
                if not job.cancelled.is_set():
                    try:
                        result = job.prepare()
                    except BaseException as exc:  # noqa: BLE001 - a bad request fails alone
                        result = exc
                with self._wake:
                    self._preparing.remove(job)
                    if not self._stopping:
                        self._ready.append((job, result, time.monotonic()))
                        self._wake.notify_all()
                        # not kept while waiting for the next: a finished request's run (its
                        # prompt, its sink) lived on here, and with it a dropped engine
                        del job, result
                        continue
                job.end(_closed())  # (close() has ended it already)
                return

    # ------------------------------------------------------------------ loop thread
    def _main(self) -> None:
        with torch.inference_mode():
            while True:
                self._rest_threads(not self._rows)
                if not self._waited_for_work():
                    break
                self._rest_threads(False)
                self._idle_due = True
                try:
                    self._step()
                except BaseException as exc:  # noqa: BLE001 - a bug here must not kill the loop
                    log.exception("engine step failed; failing its rows")
                    self._fail_all(exc)
        self._fail_all(_closed())
        # close() ended them already; this is the loop's own word that nothing is left unanswered
        with self._wake:
            waiting = self._queued()
            self._waiting, self._ready = collections.deque(), collections.deque()
            rows = list(self._live)  # rows in their audio stage too
        for job in waiting:
            job.end(_closed())
        for row in rows:
            _fail(row, _closed())
        _fail_calls(self._calls)  # nothing is queued after _stopping is set

    def _waited_for_work(self) -> bool:
        """``_wait_for_work``, guarded like a step: a fault there must not end the loop thread
        (the requests being prepared would never be admitted)."""
        try:
            return self._wait_for_work()
        except Exception:  # noqa: BLE001 - a bug here must not kill the loop
            log.exception("engine loop wait failed")
            with self._wake:
                if not self._stopping:
                    self._wake.wait(LOOP_FAULT_PAUSE_SECONDS)
                return not self._stopping

    def _rest_threads(self, rest: bool) -> None:
        """The loop thread's torch threads: ``decode_threads`` while it decodes, the process's
        count while it waits with no row (``set_own_threads``: threads starting meanwhile take
        the process's count either way)."""
        if self.decode_threads != self.threads and rest != self._resting:
            set_own_threads(self.threads if rest else self.decode_threads)
            self._resting = rest

    def _wait_for_work(self) -> bool:
        """Wait for something to step; False once closing. Once nothing is live (no row
        decoding or vocoding, no audio work) for ``idle_release_seconds`` after some work,
        run ``on_idle``, outside the lock so that a request arriving meanwhile is not held."""
        delay = self.limits.idle_release_seconds
        while True:
            with self._wake:
                admit_in = self._admission_in()
                if self._stopping or admit_in == 0.0 or self._calls or self._rows:
                    return not self._stopping
                if self._queued_cancelled():
                    return True  # the step ends it
                if admit_in is not None:  # more requests of the same burst are being prepared
                    self._wake.wait(admit_in)
                    continue
                due = self._idle_due and delay is not None
                if not (due and self._quiet()):
                    # woken by new work, a request's end or background work (they notify);
                    # a busy audio worker is looked at again after a while
                    self._wake.wait(delay if due else None)
                    continue
                # new work always comes with a notify, so a wait that times out saw none
                if self._wake.wait(delay) or not self._quiet():
                    continue  # woken, or still busy: start the wait again
                self._idle_due = False
            try:
                self._on_idle()
            except Exception:  # noqa: BLE001 - housekeeping must not stop the loop
                log.exception("idle housekeeping failed")
            self.idle_calls += 1

    def _queued(self) -> list[Job]:
        """The requests not admitted yet: to prepare, then prepared. The caller holds the lock."""
        return [*self._waiting, *(entry[0] for entry in self._ready)]

    def _queued_cancelled(self) -> bool:
        """Whether a request not yet admitted was cancelled. The caller holds the lock."""
        return any(job.cancelled.is_set() for job in self._queued())

    def _admission_in(self) -> float | None:
        """Seconds until prepared requests may be admitted (0: now; None: none is prepared).
        Requests submitted while others were being prepared (a burst) are admitted at one step
        once the preparer has caught up, as when the loop prepared them itself: their streams
        reach their chunks together and share flow calls. A prepared request waits
        ``ADMIT_TOGETHER_SECONDS`` at most for the others. Called on the loop thread (it reads
        the rows), holding the lock."""
        if not self._ready:
            return None
        if not self._waiting and not self._preparing:
            return 0.0
        if len(self._ready) >= self.limits.max_batch - len(self._rows):
            return 0.0  # those prepared fill the free rows: nobody else could join their step
        return max(0.0, self._ready[0][2] + ADMIT_TOGETHER_SECONDS - time.monotonic())

    def _quiet(self) -> bool:
        return not self._live and all(worker.idle for worker in self._audio)

    def _nudge(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _text_arrived(self) -> None:
        with self._wake:
            self._text_arrivals += 1
            self._wake.notify_all()

    def _row_ended(self, row: _Row) -> None:
        with self._wake:
            self._live.discard(row)
            # the loop drops it (a serial run's row may be waiting for its audio), and may start
            # its idle wait
            self._wake.notify_all()

    def _step(self) -> None:
        with self._wake:
            arrivals = self._text_arrivals
        try:
            fed = self._step_rows()
        finally:
            self._send_audio()
        if self._rows and not fed and all(row.feed is None for row in self._rows):
            # Every row waits: for streaming text, or for its previous segment's audio. Woken as
            # either comes (checked under the lock their threads notify under, and text that
            # came during the step is seen here, so that no wake-up is missed).
            with self._wake:
                if self._text_arrivals != arrivals:
                    return  # a row has text to take: step again at once
                self.waits += 1
                # a request waiting for a free row is admitted when a burst's window closes
                admit_in = self._admission_in() if len(self._rows) < self.limits.max_batch else None
                limit = TEXT_WAIT_SECONDS if admit_in is None else min(TEXT_WAIT_SECONDS, admit_in)
                if all(row.waits_for_audio() for row in self._rows):
                    self._wake.wait(min(SEGMENT_WAIT_SECONDS, limit))
                else:
                    self._wake.wait(limit)

    def _step_rows(self) -> bool:
        """One step; True if a forward ran."""
        self._run_calls()
        self._retire_cancelled()
        self._admit()
        if not self._rows:
            return True
        fed = self._forward()
        for row in list(self._rows):
            if row.draw is None and (row.reply is not None or row.feed is None):
                self._advance(row)
        self._sample()
        return fed

    def _sample(self) -> None:
        """Draw the tokens the rows asked for (``Draw``) together, each with its own sampler
        (``sampling.sample_rows``), and advance those rows to their next forward."""
        while True:
            rows = [row for row in self._rows if row.draw is not None]
            if not rows:
                return
            draws = [row.draw for row in rows]
            tokens = sample_rows([(d.scores, d.decoded, d.sampler) for d in draws])
            for row, token in zip(rows, tokens, strict=True):
                row.draw = None
                if isinstance(token, BaseException):
                    self._fail(row, token)
                    self._remove(row)
                    continue
                row.reply = token
                self._advance(row)

    def _send_audio(self) -> None:
        """Hand the step's tokens to the audio workers at once, so a worker sees every row whose
        chunk became due in this step and computes those chunks together."""
        outbox, self._outbox = self._outbox, {}
        for worker, works in outbox.items():
            worker.put(works)

    def _run_calls(self) -> None:
        while True:
            try:  # close() takes them too: each is taken once
                call = self._calls.popleft()
            except IndexError:
                return
            _run_into(*call)

    def _retire_cancelled(self) -> None:
        for row in [r for r in self._rows if r.job.cancelled.is_set() or r.failed]:
            self._remove(row)
            row.end(None)  # a failed row has already ended with its error
        # not only once a row is free: a queued request whose client left ends now
        with self._wake:  # submit and the preparer append from other threads
            gone = [job for job in self._queued() if job.cancelled.is_set()]
            if gone:
                self._waiting = collections.deque(
                    job for job in self._waiting if not job.cancelled.is_set()
                )
                self._ready = collections.deque(
                    entry for entry in self._ready if not entry[0].cancelled.is_set()
                )
        for job in gone:
            job.end(None)

    def _admit(self) -> None:
        while len(self._rows) < self.limits.max_batch:
            with self._wake:
                if self._stopping or self._admission_in() != 0.0:
                    return  # closing: close() has ended those queued
                job, run, _ = self._ready.popleft()
            if job.cancelled.is_set() or run is None:
                job.end(None)
                continue
            if isinstance(run, BaseException):
                job.end(run)
                continue
            try:
                row = _Row(
                    job,
                    run,
                    on_end=self._row_ended,
                    on_segment_out=self._nudge,
                    streaming=run.stream,
                )
                self._start_segment(row, 0)
            except BaseException as exc:  # noqa: BLE001 - a bad request fails alone
                job.end(exc)
                continue
            with self._wake:  # close() ends the rows in _live: a row is there, or sees it closing
                closing = self._stopping
                if not closing:
                    self._live.add(row)
            if closing:
                self._fail(row, _closed())
                self._remove(row)
                return
            self._rows.append(row)
            self._advance(row)

    def _start_segment(self, row: _Row, index: int) -> None:
        row.segment = index
        row.task, row.audio = row.run.start_segment(index, on_text=self._text_arrived)
        row.sent = 0
        row.cache = self.lm.new_cache()
        row.feed = row.reply = None

    # ------------------------------------------------------------------ compute
    def _forward(self) -> bool:
        """Compute the log-probabilities every fed row asked for; True if anything ran."""
        self._hold_for_first_pieces()
        prefills = [r for r in self._rows if r.feed is not None and r.feed.inputs.size(1) > 1]
        decodes = [r for r in self._rows if r.feed is not None and r.feed.inputs.size(1) == 1]
        budget = self.limits.prefill_tokens
        for number, row in enumerate(prefills):
            size = row.feed.inputs.size(1)
            if number > 0 and size > budget:
                break  # the rest join at a later step
            budget -= size
            self._forward_rows([row])
        for start in range(0, len(decodes), self.limits.max_batch):
            self._forward_rows(decodes[start : start + self.limits.max_batch])
        return bool(prefills or decodes)

    def _hold_for_first_pieces(self) -> None:
        """Decoding waits (a bounded time) while a stream's first chunk is being computed, and
        while a stream has every token of its first piece but not its audio: later tokens can
        wait, and the flow calls of that piece get the cores. Not while another stream is a token
        or two from its own first piece: it goes on, so that its chunk can join the same flow
        batch (the audio worker waits for such neighbours)."""
        self._holding = True  # the audio workers' flow calls may take every thread meanwhile
        try:
            self._wait_for_first_pieces()
        finally:
            self._holding = False

    def _wait_for_first_pieces(self) -> None:
        deadline = time.monotonic() + FIRST_CHUNK_PRIORITY_SECONDS
        for worker in self._audio:
            worker.no_first_chunk.wait(max(0.0, deadline - time.monotonic()))
        to_first = {row: row.tokens_to_first_piece() for row in self._rows}
        if any(n is not None and 0 < n <= BATCH_WAIT_TOKENS for n in to_first.values()):
            return
        for row, n in to_first.items():
            if n == 0:
                # bounded per stream, so a worker busy with other rows' work cannot stall decoding
                if row.hold_until is None:
                    row.hold_until = time.monotonic() + FIRST_CHUNK_PRIORITY_SECONDS
                until = min(deadline, row.hold_until)
                # in slices: a request cancelled meanwhile (its client gone) releases the others
                while not row.first_audio.is_set() and not row.job.cancelled.is_set():
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    row.first_audio.wait(min(left, CANCEL_POLL_SECONDS))

    def _forward_rows(self, rows: list[_Row]) -> None:
        lengths = [row.cache.length for row in rows]
        try:
            inputs = (
                rows[0].feed.inputs if len(rows) == 1 else torch.cat([r.feed.inputs for r in rows])
            )
            logp = self.lm.log_probs(inputs, [r.cache for r in rows])
        except BaseException as exc:  # noqa: BLE001
            # the step reserved every row's new positions before its layers ran: a retry (or the
            # rows that go on) must not attend over the failed step's half-written keys
            for row, length in zip(rows, lengths, strict=True):
                row.cache.rewind(length)
            if len(rows) == 1:
                self._fail(rows[0], exc)
                self._remove(rows[0])
                return
            for row in rows:  # find the row that fails; the others go on
                self._forward_rows([row])
            return
        if len(rows) > 1:
            self.steps += 1
            self.rows_stepped += len(rows)
        for index, row in enumerate(rows):
            row.reply, row.feed = logp[index], None

    def _advance(self, row: _Row) -> None:
        """Run the row's task until it needs a forward, waits for text, or its request ends;
        tokens go to the audio stage and audio to the request as soon as it exists."""
        try:
            self._advance_task(row)
        except BaseException as exc:  # noqa: BLE001 - a failing row fails alone
            self._fail(row, exc)
            self._remove(row)

    def _advance_task(self, row: _Row) -> None:
        while not row.job.cancelled.is_set():
            if row.next_segment is not None:
                if row.waits_for_audio():
                    return  # its audio stage is still drawing from the request's generator
                index, row.next_segment = row.next_segment, None
                self._start_segment(row, index)
            reply, row.reply = row.reply, None
            try:
                item = row.task.send(reply)
            except StopIteration:
                last = row.segment == len(row.run.segments) - 1
                self._send(row, _AudioWork(row, row.audio, row.segment, last=last))
                if last:  # the audio worker ends the request once the audio is done
                    self._remove(row)
                    return
                if row.run.serial_segments:
                    row.next_segment = row.segment + 1
                    continue
                self._start_segment(row, row.segment + 1)
                continue
            if isinstance(item, Feed):
                row.feed = item
                return
            if isinstance(item, Draw):
                row.draw = item
                return
            if item is WAIT:
                return
            row.sent += 1
            self._send(row, _AudioWork(row, row.audio, row.segment, token=item))

    def _send(self, row: _Row, work: _AudioWork) -> None:
        self._outbox.setdefault(self._audio_of(row), []).append(work)

    def _audio_of(self, row: _Row) -> AudioWorker:
        """A row's audio always goes to the same worker, so its chunks stay in order."""
        if row.audio_worker < 0:
            row.audio_worker = self._next_worker
            self._next_worker = (self._next_worker + 1) % len(self._audio)
        return self._audio[row.audio_worker]

    def _remove(self, row: _Row) -> None:
        if row in self._rows:
            self._rows.remove(row)
        if row.task is not None:
            row.task.close()
        row.task = row.audio = row.cache = row.feed = row.reply = row.draw = None

    def _fail(self, row: _Row, exc: BaseException) -> None:
        row.end(exc)

    def _fail_all(self, exc: BaseException) -> None:
        """End every row with ``exc``; their caches and tasks (a streamed text's feeder) go too.
        (A list taken first: removing rows from the one being walked skipped every second.)"""
        rows, self._rows = self._rows, []
        for row in rows:
            self._fail(row, exc)
            self._remove(row)


def _fail_calls(calls: collections.deque[tuple[Callable[[], Any], Future]]) -> None:
    """End the calls not started with EngineClosedError (each taken once: the loop takes them
    too)."""
    while True:
        try:
            _, future = calls.popleft()
        except IndexError:
            return
        if future.set_running_or_notify_cancel():
            future.set_exception(_closed())


def _run_into(fn: Callable[[], Any], future: Future) -> None:
    if future.set_running_or_notify_cancel():
        try:
            future.set_result(fn())
        except ComputationAborted as exc:  # the engine closed meanwhile
            closed = EngineClosedError("the engine was closed")
            closed.__cause__ = exc
            future.set_exception(closed)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)
