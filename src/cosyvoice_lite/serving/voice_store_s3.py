"""The voice library in an S3-compatible bucket, shared by every server process (Ray Serve
replicas, several machines), and the choice between it and the local directory.

Layout under the key prefix:

    voices/<name>.json                    the voice's voice.json; its object metadata
                                          ``generation`` names the data below. Written last:
                                          a voice exists exactly when this object does.
    voice-data/<name>/<generation>/prompt.wav
    voice-data/<name>/<generation>/features/<key>.pt
    names/<name key>.claim                the name as the library compares names (case and
                                          compatibility forms folded, ``name_key``), holding
                                          the spelling that has it and its write's token

A write puts the data objects under a fresh generation first, then claims the name and puts the
manifest, both with ``If-None-Match: *``, so two processes cannot both create one name, nor
"Alice" and "ALICE" at once (a claim whose voice never came, its writer gone, is taken over
after ``CLAIM_GRACE`` seconds; voices saved before claims existed are compared by listing). A
failure before the manifest leaves nothing visible, and the data already written is deleted
again (objects that even this could not delete are unreferenced: invisible, and safe to
remove). A manifest PUT that fails but was not refused may have been stored all the same (its
answer lost): the manifest is read again, and the write is saved if it shows this write's
generation; if it is absent (read once more ``SETTLE_DELAY`` later, for a PUT still on its way),
the write's data and claim are deleted; when the manifest cannot be read, they stay (the PUT may
be stored: unreferenced objects at worst, never a manifest naming deleted data) and the answer
says the voice may or may not have been saved. Deleting removes the manifest first, so
the voice disappears at once, and only the manifest it read (``If-Match``): a voice deleted and
created again by another process meanwhile is not this delete's. Each write puts a token of its
own in its claim, and claims are released ``If-Match`` too, so a write that claims a name being
deleted keeps its claim. A new generation per write means a voice created again under an old
name never meets the old voice's files.

Reads go to the bucket (read-through): a voice created by another process is usable at once.
Manifests found are reused for ``CACHE_TTL`` seconds (a voice deleted elsewhere is noticed within
that time), and for as long as a listing at most that old shows the same ETag (a manifest is
never rewritten: a voice written again has a new one), so listing the library is one LIST per
1000 voices, plus a GET for each voice changed since; absent ones are never cached. S3 failures
raise StorageError (503).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import quote

from .outputs import make_s3_client, s3_reason
from .outputs import s3_error_code as _code
from .settings import S3Settings, Settings
from .voices import Chunks, LocalVoiceStore, StorageError, VoiceStore, name_key

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_TTL = 2.0  # seconds a manifest or listing read from the bucket is reused
CLAIM_GRACE = 60.0  # seconds a name's claim without its voice counts as a write in progress
MISSING = {"404", "NoSuchKey", "NotFound"}
TAKEN = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}
UNSUPPORTED = {"501", "NotImplemented"}
CLAIM_TRIES = 8  # claims changing under one write this often mean a storm of writes
SETTLE_DELAY = 1.0  # seconds before a manifest absent after its failed PUT is read once more


def voice_store(settings: Settings) -> VoiceStore:
    """The store the settings ask for: a bucket (``voices_s3``) or the local directory."""
    if settings.voices_s3 is not None:
        return S3VoiceStore(settings.voices_s3)
    return LocalVoiceStore(settings.voices_dir)


def attachment(filename: str) -> dict[str, str]:
    """A Content-Disposition header offering ``filename`` (RFC 6266 form for non-ASCII)."""
    quoted = quote(filename)
    if quoted != filename:
        return {"content-disposition": f"attachment; filename*=utf-8''{quoted}"}
    return {"content-disposition": f'attachment; filename="{filename}"'}


@dataclass
class _Staged:
    name: str
    generation: str
    manifest: bytes
    keys: list[str] = field(default_factory=list)
    committed: bool = False
    kept: bool = False  # its manifest may be stored: discard leaves its data alone


class S3VoiceStore:
    """Voices in ``settings.bucket`` under ``settings.prefix`` (see the module docstring)."""

    listing_may_lag = True  # a listing is kept 2 s (documented)

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.where = f"bucket {settings.bucket!r} at {settings.endpoint_url or 'the AWS endpoint'}"
        self.client = make_s3_client(settings)
        self._lock = threading.Lock()
        # name -> (read at, body, generation, ETag)
        self._manifests: dict[str, tuple[float, bytes, str, str]] = {}
        self._listing: tuple[float, list[str], dict[str, str]] | None = None  # (at, names, ETags)
        self._present: set[str] = set()  # data keys seen: a generation's files never change
        self._conditional_delete = True

    # ------------------------------------------------------------------ keys and errors
    def _key(self, *parts: str) -> str:
        return self.settings.prefix + "/".join(parts)

    def _manifest_key(self, name: str) -> str:
        return self._key("voices", f"{name}.json")

    def _data_key(self, name: str, generation: str, file: str = "") -> str:
        return self._key("voice-data", name, generation, file)

    def _claim_key(self, name: str) -> str:
        return self._key("names", quote(name_key(name), safe="") + ".claim")

    def _error(self, exc: Exception, action: str) -> OSError:
        code = _code(exc)
        if code in MISSING:
            return FileNotFoundError(action)
        reason = s3_reason(exc)
        log.warning("voice bucket %s: cannot %s: %s", self.where, action, exc)
        return StorageError(
            f"cannot {action}: the voice storage (S3) is unavailable ({reason})", 503
        )

    def _forget(self, name: str) -> None:
        with self._lock:
            self._manifests.pop(name, None)
            self._listing = None

    # ------------------------------------------------------------------ VoiceStore
    def open(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - every way of not reaching the bucket
            raise StorageError(
                f"the voice library's {self.where} cannot be reached: {_code(exc) or exc}", 503
            ) from None

    def entries(self) -> list[str]:
        with self._lock:
            if self._listing and time.monotonic() - self._listing[0] < CACHE_TTL:
                return list(self._listing[1])
        prefix = self._key("voices", "")
        names, etags = [], {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    rest = item["Key"][len(prefix) :]
                    if "/" not in rest and rest.endswith(".json") and len(rest) > 5:
                        names.append(rest[:-5])
                        etags[rest[:-5]] = item.get("ETag", "")
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "list the voices") from None
        names.sort()
        with self._lock:
            self._listing = (time.monotonic(), names, etags)
            for gone in self._manifests.keys() - etags.keys():  # deleted (maybe elsewhere)
                del self._manifests[gone]
        return list(names)

    def _listed(self, name: str) -> str | None:
        """The ETag of ``name``'s manifest in a listing at most ``CACHE_TTL`` old (under _lock)."""
        if self._listing is None or time.monotonic() - self._listing[0] >= CACHE_TTL:
            return None
        return self._listing[2].get(name) or None

    def version(self, name: str) -> str | None:
        """The ETag of the manifest cached for ``name`` if a recent listing shows it still."""
        with self._lock:
            cached, listed = self._manifests.get(name), self._listed(name)
        return listed if cached is not None and cached[3] == listed else None

    def exclusive(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()  # the names' claims keep writes apart (commit)

    def _manifest(self, name: str, fresh: bool = False) -> tuple[bytes, str, bool]:
        """(voice.json, generation, whether it came from the cache); FileNotFoundError."""
        with self._lock:
            cached, listed = self._manifests.get(name), self._listed(name)
        current = cached and (time.monotonic() - cached[0] < CACHE_TTL or cached[3] == listed)
        if current and not fresh:
            return cached[1], cached[2], True
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._manifest_key(name))
            body = response["Body"].read()
        except Exception as exc:  # noqa: BLE001
            self._forget(name)
            raise self._error(exc, "read the voice") from None
        generation = response.get("Metadata", {}).get("generation", "")
        with self._lock:
            self._manifests[name] = (time.monotonic(), body, generation, response.get("ETag", ""))
        return body, generation, False

    def has(self, name: str, fresh: bool = False) -> bool:
        """Whether voice ``name`` is stored (``fresh``: asked of the bucket, not the cache)."""
        try:
            self._manifest(name, fresh)
        except FileNotFoundError:
            return False
        return True

    def read(self, name: str, file: str) -> bytes:
        if file == "voice.json":
            return self._manifest(name)[0]
        return self._fetch(name, file, lambda response: response["Body"].read())

    def open_file(self, name: str, file: str) -> Chunks:
        # the GET answered (its headers) here, its body read as it is sent: a generation's
        # objects never change, and a GET under way is answered whole after a delete
        def opened(response: dict) -> Chunks:
            body = response["Body"]

            def read(size: int) -> bytes:
                try:
                    return body.read(size)
                except Exception as exc:  # noqa: BLE001
                    raise self._error(exc, "read the voice") from None

            return Chunks(int(response["ContentLength"]), read, body.close)

        return self._fetch(name, file, opened)

    def _fetch(self, name: str, file: str, take: Callable[[dict], T]) -> T:
        """``take`` of the GET of voice ``name``'s data ``file``; FileNotFoundError."""
        _, generation, cached = self._manifest(name)
        try:
            return self._get(self._data_key(name, generation, file), take)
        except FileNotFoundError:
            if not cached:
                raise
        # the voice may have been created again elsewhere since the manifest was cached
        _, generation, _ = self._manifest(name, fresh=True)
        return self._get(self._data_key(name, generation, file), take)

    def _get(self, key: str, take: Callable[[dict], T]) -> T:
        try:
            return take(self.client.get_object(Bucket=self.bucket, Key=key))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "read the voice") from None

    def has_file(self, name: str, file: str) -> bool:
        try:
            _, generation, _ = self._manifest(name)
            if file == "voice.json":
                return True
            key = self._data_key(name, generation, file)
            if key in self._present:
                return True
            self.client.head_object(Bucket=self.bucket, Key=key)
            with self._lock:
                self._present.add(key)
        except FileNotFoundError:
            return False
        except Exception as exc:  # noqa: BLE001
            error = self._error(exc, "read the voice")
            if isinstance(error, FileNotFoundError):
                return False
            raise error from None
        return True

    def stage(self, name: str, files: dict[str, bytes]) -> _Staged:
        staged = _Staged(name, uuid.uuid4().hex, files["voice.json"])
        try:
            for file, data in files.items():
                if file == "voice.json":
                    continue
                key = self._data_key(name, staged.generation, file)
                staged.keys.append(key)
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except Exception as exc:  # noqa: BLE001
            self.discard(staged)
            raise self._error(exc, "save the voice") from None
        return staged

    def commit(self, staged: _Staged) -> None:
        claim = self._claim(staged.name)  # kept, but where the manifest is surely absent
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._manifest_key(staged.name),
                Body=staged.manifest,
                ContentType="application/json",
                Metadata={"generation": staged.generation},
                IfNoneMatch="*",  # the first process to commit a name wins
            )
        except Exception as exc:  # noqa: BLE001
            self._settle(staged, claim, exc)  # returns if the manifest stored is this write's
        finally:
            self._forget(staged.name)
        staged.committed = True

    def _settle(self, staged: _Staged, claim: str, exc: Exception) -> None:
        """After the manifest PUT failed with ``exc``: return if the bucket has this write's
        manifest all the same, else raise (FileExistsError when the name is taken). An error
        other than a refusal may come after the bucket stored the manifest (its answer lost, a
        gateway failing after forwarding), and a retried PUT is refused by its own first try:
        only the manifest tells. Found absent, the write leaves nothing: its data is discarded
        and its claim (ETag ``claim``) released; another write's manifest refuses this one's
        for good, so its data goes as well."""
        refused = _code(exc) in TAKEN
        generation = self._stored(staged, exc)
        if generation is None and not refused:
            # A PUT not refused may still be on its way (a gateway or the bucket still handling
            # it after the error came back): read again a moment later. That covers a request
            # that failed on the way back; it is no proof against one held up longer (past a
            # read timeout, say), which may still land after the data is deleted: a voice that
            # cannot speak then, without a claim, until deleted (which works as for any other).
            time.sleep(SETTLE_DELAY)
            generation = self._stored(staged, exc)
        if generation == staged.generation:
            return
        if refused or generation is not None:  # another write's voice has this spelling
            raise FileExistsError(staged.name) from None
        try:  # (a write of this name that took the claim over since keeps it: a new ETag)
            self._delete_if(self._claim_key(staged.name), claim, "release the name")
        except OSError as error:  # a claim left behind is taken over after CLAIM_GRACE
            log.warning("could not release the name %r: %s", staged.name, error)
        raise self._error(exc, "save the voice") from None

    def _stored(self, staged: _Staged, exc: Exception) -> str | None:
        """The generation of the manifest stored under ``staged``'s name (None: absent). When
        it cannot be read, a StorageError saying the voice may or may not have been saved, and
        the write's data stays (whatever the PUT did: never a manifest naming deleted data)."""
        try:
            return self._manifest(staged.name, fresh=True)[1]
        except FileNotFoundError:
            return None
        except OSError:
            staged.kept = True
            reason = s3_reason(exc)
            log.warning("voice bucket %s: saving voice %r: %s", self.where, staged.name, exc)
            raise StorageError(
                f"voice {staged.name!r} may or may not have been saved: the voice storage (S3) "
                f"is unavailable ({reason}); look it up before saving it again",
                503,
            ) from None

    def _held(self, key: str, action: str) -> tuple[str, str, float] | None:
        """(the spelling holding a name's claim, the claim's ETag, when it was written), or
        None when the name is not claimed."""
        try:
            held = self.client.get_object(Bucket=self.bucket, Key=key)
            body = held["Body"].read().decode()
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in MISSING:
                return None
            raise self._error(exc, action) from None
        return body.split("\n", 1)[0], held["ETag"], held["LastModified"].timestamp()

    def _claim(self, name: str) -> str:
        """Claim ``name`` as the library compares names and return the claim's ETag (each write
        puts its own token in the claim, so a release never removes another write's claim).
        FileExistsError, naming the spelling that has it, when a voice of another spelling has
        the name or another write has claimed it in the last ``CLAIM_GRACE`` seconds."""
        key = self._claim_key(name)
        body = f"{name}\n{uuid.uuid4().hex}".encode()
        for _ in range(CLAIM_TRIES):
            try:
                put = self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*"
                )
                return put["ETag"]
            except Exception as exc:  # noqa: BLE001
                if _code(exc) not in TAKEN:
                    raise self._error(exc, "save the voice") from None
            held = self._held(key, "save the voice")
            if held is None:  # released meanwhile: claim it again
                continue
            holder, etag, written = held
            if self.has(holder, fresh=True):  # a voice has the name (in this spelling or not)
                raise FileExistsError(holder)
            if holder != name and time.time() - written < CLAIM_GRACE:  # being written: it wins
                raise FileExistsError(holder)
            # this spelling's own claim (its manifest decides between two writes of one name)
            # or one left by a writer that is gone: taken over, unless it changed meanwhile
            try:
                put = self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfMatch=etag)
                return put["ETag"]
            except Exception as exc:  # noqa: BLE001
                if _code(exc) not in TAKEN | MISSING:
                    raise self._error(exc, "save the voice") from None
        raise FileExistsError(name)  # claimed and released all the while: being written

    def _delete_if(self, key: str, etag: str, action: str) -> bool:
        """Delete ``key`` only if it is still the object with ``etag``; False when it is gone or
        changed meanwhile. A bucket without conditional deletes (some S3-compatible servers
        answer NotImplemented) deletes unconditionally, as S3 did before it had them."""
        condition = {"IfMatch": etag} if self._conditional_delete else {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key, **condition)
            return True
        except Exception as exc:  # noqa: BLE001
            code = _code(exc)
            if code in TAKEN | MISSING:
                return False
            if code in UNSUPPORTED and condition:
                log.warning("voice bucket %s has no conditional deletes", self.where)
                self._conditional_delete = False
                return self._delete_if(key, etag, action)
            raise self._error(exc, action) from None

    def discard(self, staged: _Staged) -> None:
        if staged.committed or staged.kept or not staged.keys:
            return
        try:
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in staged.keys]}
            )
        except Exception as exc:  # noqa: BLE001 - unreferenced objects are invisible
            log.warning("could not delete the unfinished voice %r: %s", staged.name, exc)

    def write(self, name: str, file: str, data: bytes) -> None:
        _, generation, _ = self._manifest(name)
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._data_key(name, generation, file), Body=data
            )
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "save the voice") from None

    def remove(self, name: str) -> None:
        # the claim is read before the manifest goes: a write of this name after that takes the
        # claim over (a new ETag), and keeps it
        claim_key = self._claim_key(name)
        claim = self._held(claim_key, "delete the voice")
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._manifest_key(name))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "delete the voice") from None
        finally:
            self._forget(name)
        generation = head.get("Metadata", {}).get("generation", "")
        # only the voice read above: one created again meanwhile under this name is not this
        # delete's (another process deleted the old one first)
        deleted = self._delete_if(self._manifest_key(name), head["ETag"], "delete the voice")
        self._forget(name)
        # not deleted and gone (a retried delete whose first try was applied, or another
        # process's delete) counts as deleted
        replaced = not deleted and self.has(name, fresh=True)
        if not replaced and claim is not None and claim[0] == name:
            try:
                self._delete_if(claim_key, claim[1], "release the name")
            except OSError as exc:  # a claim left behind is taken over after CLAIM_GRACE
                log.warning("could not release the name %r: %s", name, exc)
        prefix = self._data_key(name, generation)
        with self._lock:
            self._present = {key for key in self._present if not key.startswith(prefix)}
        try:  # the voice is gone already; its data is only garbage now
            listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
            keys = [{"Key": item["Key"]} for item in listing.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
        except Exception as exc:  # noqa: BLE001
            log.warning("voice %r deleted, but not all of its data: %s", name, exc)
        if replaced:  # deleted and created again by another process: the new one is not ours
            raise FileNotFoundError(name)

    def check(self) -> str | None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001
            return f"the voice storage (S3) is unavailable ({s3_reason(exc)})"
        return None
