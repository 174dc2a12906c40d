"""Saving a voice from an upload, shared by ``POST /voices`` and ``POST /v1/audio/voices``:
the form read and checked one way, then the features computed off the event loop and stored in
the library; and preparing the saved voices for streaming when a server starts."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import CancelledError
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from .errors import ApiError, overloaded
from .forms import read_form
from .guard import check_text, check_texts
from .prompts import check_audio
from .scheduler import Job, JobTimeout, Overloaded
from .settings import Settings
from .synthesis import saved_features, voice_key
from .voices import SaveAbandoned, VoiceExistsError, name_key, validate_new_name

log = logging.getLogger("cosyvoice_lite.serving")


@dataclass(frozen=True)
class VoiceUpload:
    """A voice upload, checked: what ``save_voice`` takes."""

    name: str
    prompt_text: str  # "" without a transcript: the voice is used cross-lingually
    data: bytes
    transcript_field: str = "prompt_text"  # the form's name for it, which errors name
    request_id: str | None = None  # the request's (ServingMiddleware), for the log


async def read_voice_upload(
    request: Request,
    settings: Settings,
    audio_fields: tuple[str, ...],
    transcript_fields: tuple[str, ...],
    other_fields: tuple[str, ...] = (),
    check_fields: Callable[[dict[str, str]], None] | None = None,
) -> VoiceUpload:
    """Read a voice's form: ``name``, one recording under any of ``audio_fields`` (the first
    is the one named when it is missing) and its transcript under any of ``transcript_fields``
    (a blank one counts as none; two different ones are a 400, as either could be meant).
    ``other_fields`` are accepted too, and ``check_fields`` checks the route's own fields first.
    The cheap checks come before the recording's header is read."""
    form = await read_form(
        request,
        settings.max_upload_bytes,
        audio_fields,
        ("name", *transcript_fields, *other_fields),
        max_files=1,  # one recording, under any of its names
    )
    if check_fields is not None:
        check_fields(form.fields)
    name = form.fields.get("name", "").strip()
    if not name:
        raise ApiError(
            400, "missing field 'name' (the voice's name)", code="missing_field", param="name"
        )
    if not form.files:
        raise ApiError(
            400,
            f"missing file field '{audio_fields[0]}' (the recording)",
            code="missing_field",
            param=audio_fields[0],
        )
    ((audio_field, data),) = form.files.items()
    check_texts(settings, name=name)
    # compared as stored: without the spaces around them
    given = [
        (field, text) for field in transcript_fields if (text := form.fields.get(field, "").strip())
    ]
    for field, text in given:
        check_text(field, text, settings.max_prompt_text_chars, kind="prompt_text")
    if len({text for _, text in given}) > 1:
        raise ApiError(
            400,
            f"two different transcripts ({', '.join(field for field, _ in given)}); send one",
            code="invalid_field",
            param=given[1][0],
        )
    check_audio(data, audio_field, settings.max_upload_bytes, settings.max_prompt_seconds)
    field, text = given[0] if given else (transcript_fields[0], "")
    request_id = request.scope.get("state", {}).get("request_id")
    return VoiceUpload(name, text, data, field, request_id)


async def save_voice(state, upload: VoiceUpload, reserved: Collection[str] = ()) -> JSONResponse:
    """Store the uploaded voice (201 with its description); 409 if the name is a preset, one
    of ``reserved`` (e.g. voice aliases) or already saved, compared as the library compares
    names (case and compatibility forms: ``ＡＬＬＯＹ`` is ``alloy``)."""
    name, prompt_text, data = upload.name, upload.prompt_text, upload.data
    key = name_key(validate_new_name(name))
    engine = state.require_engine()
    if prompt_text:  # checked as a request's texts are (its tags, \[sic] as text)
        engine.check_markup(prompt_text, upload.transcript_field)
    library, settings = state.library, state.settings
    if any(name_key(taken) == key for taken in (*engine.presets, *reserved)):
        raise ApiError(
            409,
            f"{name!r} is a preset voice or alias of this model; choose another name",
            code="voice_exists",
            param="name",
        )
    if await asyncio.to_thread(library.exists, name):  # storage I/O: off the event loop
        raise ApiError(
            409,
            f"a voice named {name!r} already exists; delete it first",
            code="voice_exists",
            param="name",
        )
    job = Job(asyncio.get_running_loop(), time.monotonic() + settings.request_timeout)
    gate = CommitGate(job)

    # on a thread of its own: the storage I/O may be slow or hang (an S3 bucket), and computing
    # the features there too leaves the engine loop decoding every other request meanwhile
    encode = engine.encode_prompt

    def create():
        voice = library.create(
            name,
            data,
            prompt_text,
            voice_key(engine),
            encode,
            max_seconds=settings.max_prompt_seconds,
            may_commit=gate.commit,
        )
        # its streams' shared part, computed in the background: even the first stream starts
        # fast. Never at a request's expense (the engine starts it only while it has no request,
        # keeps one waiting per audio worker, the oldest dropped for a newer one) nor for
        # nothing (not over --prompt-cache-mb); the voice is stored whatever happens here
        try:
            features = library.features(voice.name, voice_key(engine), encode)
            engine.prepare_voice(features).add_done_callback(_log_failure(voice.name))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not prepare voice %r for streaming: %s", voice.name, exc)
        return voice

    try:
        state.scheduler.call(job, create, runner=state.storage_call)
    except Overloaded as exc:
        state.metrics.count("rejected_total")
        raise overloaded(exc.retry_after) from None
    try:
        voice = await _outcome(job, gate, settings.request_timeout)
    except JobTimeout:
        message = "computing the voice took too long"
        if gate.committed:  # the storage did not answer: the voice may be stored or not
            message = "the voice storage did not answer in time; the voice may have been saved"
        raise ApiError(504, message, "timeout_error", "timeout") from None
    except VoiceExistsError as exc:
        raise ApiError(409, str(exc), code="voice_exists", param="name") from None
    state.metrics.count("voices_created_total")
    log.info(
        "voice created",
        extra={"voice": name, "duration": voice.duration, "request_id": upload.request_id},
    )
    return JSONResponse(voice.to_api(), status_code=201)


class CommitGate:
    """Decides once between a voice's commit and its request's timeout: a voice whose request
    was answered 504 is never stored, and one whose commit began is answered as stored."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self._lock = threading.Lock()
        self._decided: bool | None = None  # True: committing; False: timed out

    @property
    def committed(self) -> bool:
        return self._decided is True

    def commit(self) -> bool:
        """Whether the voice may be committed (asked under the library's write lock)."""
        with self._lock:
            if self._decided is None:
                self._decided = not self._job.stop_requested()
            return self._decided

    def time_out(self) -> bool:
        """Whether the request may be answered as timed out (no commit begun)."""
        with self._lock:
            if self._decided is None:
                self._decided = False
            return not self._decided


async def _outcome(job: Job, gate: CommitGate, grace: float):
    """The job's result; JobTimeout past its deadline, unless the commit had begun by then:
    then its outcome, waited for up to ``grace`` seconds more."""
    try:
        return await job.next()
    except (JobTimeout, SaveAbandoned):
        if gate.time_out():
            raise JobTimeout() from None
    job.deadline = time.monotonic() + grace
    return await job.next()


def _log_failure(name: str):
    def done(future) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.warning("could not prepare voice %r for streaming: %s", name, future.exception())

    return done


def prepare_saved_voices(state) -> int:  # noqa: ANN001 - app.ServerState (no import cycle)
    """Prepare the most recently saved voices for streaming (``Engine.prepare_voice``): at most
    ``settings.prepare_voices``, and only those the engine's prompt cache holds without pushing
    one out (a voice that would not fit is skipped, a smaller one may), so that after a restart,
    or on a new replica, their first streams start as fast as later ones (CosyVoice2, 4.9 s
    prompt: first audio 3.3 s against 5.4 s in bfloat16; benchmarks/bench_restart.py). Runs in
    a thread of its own once the server serves and the model is loaded, until done or the
    server stops; the work goes through the engine's loop like any voice's (while it has no
    request). Returns how many voices were kept."""
    engine, limit = state.engine, state.settings.prepare_voices
    if limit == 0 or not hasattr(engine, "prepare_voice"):
        return 0
    try:
        saved = state.library.list()
    except Exception as exc:  # noqa: BLE001 - e.g. a voice bucket out of reach: serve anyway
        log.warning("could not list the saved voices to prepare them: %s", exc)
        return 0
    newest = sorted(saved, key=lambda voice: voice.created_at, reverse=True)
    kept = 0
    for voice in newest[:limit]:
        if state.stopping.is_set():
            break
        try:  # read here, and computed here only where not stored
            prompt = saved_features(state, voice.name)
            kept += bool(engine.prepare_voice(prompt, evict=False).result())
        except CancelledError:  # dropped for a newer voice's preparation: not kept
            log.debug("preparing voice %r was dropped for a newer one", voice.name)
        except Exception as exc:  # noqa: BLE001 - a damaged or deleted voice, or a shutdown
            log.warning("could not prepare voice %r for streaming: %s", voice.name, exc)
    if kept:
        log.info("prepared %d saved voice(s) for streaming", kept)
    return kept
