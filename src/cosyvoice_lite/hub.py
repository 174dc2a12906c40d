"""Model names -> local directories (downloading the official files when absent), and assets.

Users normally have internet: ``Engine.load("CosyVoice2-0.5B")`` fetches the official repository
into the cache once, with a progress bar. Without network we say so and name the directory where the
files can be placed by hand.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .errors import ModelDirError, ModelDownloadError

log = logging.getLogger(__name__)

# Official releases: our name -> Hugging Face repository (the ModelScope ids are listed for users).
MODELS: dict[str, str] = {
    "CosyVoice-300M": "FunAudioLLM/CosyVoice-300M",
    "CosyVoice-300M-SFT": "FunAudioLLM/CosyVoice-300M-SFT",
    "CosyVoice-300M-Instruct": "FunAudioLLM/CosyVoice-300M-Instruct",
    "CosyVoice2-0.5B": "FunAudioLLM/CosyVoice2-0.5B",
    "Fun-CosyVoice3-0.5B-2512": "FunAudioLLM/Fun-CosyVoice3-0.5B-2512",
}
MODELSCOPE_IDS: dict[str, str] = {
    "CosyVoice-300M": "iic/CosyVoice-300M",
    "CosyVoice-300M-SFT": "iic/CosyVoice-300M-SFT",
    "CosyVoice-300M-Instruct": "iic/CosyVoice-300M-Instruct",
    "CosyVoice2-0.5B": "iic/CosyVoice2-0.5B",
    "Fun-CosyVoice3-0.5B-2512": "FunAudioLLM/Fun-CosyVoice3-0.5B-2512",
}

# openai-whisper's multilingual BPE ranks, needed by the v1 text tokenizer.
WHISPER_VOCAB = "multilingual.tiktoken"
WHISPER_VOCAB_URL = (
    "https://raw.githubusercontent.com/openai/whisper/main/whisper/assets/multilingual.tiktoken"
)
WHISPER_VOCAB_SHA256 = "b34b360dbb493e781e479794586d661700670d65564001f23024971d1f2fa126"
WHISPER_SDIST = "openai-whisper==20250625"


def cache_dir() -> Path:
    """``$COSYVOICE_LITE_CACHE`` or ``~/.cache/cosyvoice-lite``."""
    root = os.environ.get("COSYVOICE_LITE_CACHE") or Path.home() / ".cache" / "cosyvoice-lite"
    return Path(root).expanduser()


def resolve_model(name_or_dir: str | Path, download: bool = True) -> Path:
    """A local model directory for a path or an official model name (``Name`` or
    ``Org/Name``; a path that does not exist is not taken for a name, it is an error)."""
    path = Path(name_or_dir).expanduser()
    if path.exists():
        return path
    name = official_name(name_or_dir)
    target = cache_dir() / "models" / name
    if _looks_complete(target):
        return target
    if not download:
        raise ModelDownloadError(f"model {name} is not in {target} and downloading is disabled")
    download_model(name, target)
    return target


def official_name(name_or_dir: str | Path) -> str:
    """The official model a ``--model`` that is no path here names; a ModelDownloadError where
    it names none (a mistyped path: checked before a server starts, not found by its load)."""
    text = str(name_or_dir)
    name = text.split("/")[-1]
    as_name = text.count("/") <= 1 and not text.startswith(("/", ".", "~"))
    if name not in MODELS or not as_name:
        known = ", ".join(MODELS)
        raise ModelDownloadError(
            f"'{name_or_dir}' is neither an existing directory nor a known model name ({known})"
        )
    return name


# written once a download has finished: an interrupted one (resumed by the next run) lacks it
COMPLETE_MARK = ".cosyvoice-lite-complete"
# written when a download starts: with it and without the other, a download is unfinished
DOWNLOADING_MARK = ".cosyvoice-lite-downloading"


def _looks_complete(path: Path) -> bool:
    """Downloaded whole (the mark, and the files the engine opens still there), or a copy placed
    by hand (no sign of a download: every file the engine opens is there). A download cut short
    is never taken as whole, even when only optional files (spk2info.pt, llm.rl.pt) were left:
    the next run resumes it."""
    if not _has_required_files(path):
        return False
    if (path / COMPLETE_MARK).is_file():
        return True
    # (a Hugging Face download's own metadata, .cache/huggingface, may come with a copy)
    return not (path / DOWNLOADING_MARK).exists() and not _unfinished_files(path)


def _has_required_files(path: Path) -> bool:
    from .modeldir import detect_version, required_files

    try:
        version = detect_version(path)
    except ModelDirError:
        return False
    return all((path / name).is_file() for name in required_files(version))


def _unfinished_files(path: Path) -> dict[Path, tuple[int, int]]:
    """Files a hub client left half-fetched (Hugging Face: ``*.incomplete``): their size and
    modification time."""
    found = {}
    for part in (path / ".cache").rglob("*.incomplete"):
        try:
            stat = part.stat()
        except OSError:  # gone meanwhile
            continue
        found[part] = (stat.st_size, stat.st_mtime_ns)
    return found


Fetch = Callable[[str, Path], None]  # (repository, target directory): fetch its files there


def download_sources(name: str) -> list[tuple[str, str, Fetch]]:
    """Where ``name`` is fetched from, in order: (hub, repository, fetch). Hugging Face
    (``HF_ENDPOINT`` picks a mirror), else ModelScope when its package is installed
    (``COSYVOICE_LITE_HUB=modelscope``: ModelScope first)."""
    sources: list[tuple[str, str, Fetch]] = [
        ("Hugging Face", MODELS[name], _from_hugging_face),
        ("ModelScope", MODELSCOPE_IDS[name], _from_modelscope),
    ]
    if os.environ.get("COSYVOICE_LITE_HUB", "").lower() == "modelscope":
        sources.reverse()
    return sources


def download_model(
    name: str, target: Path, sources: list[tuple[str, str, Fetch]] | None = None
) -> None:
    """Fetch the official release ``name`` into ``target`` from the first of ``sources``
    (default ``download_sources(name)``) that gives it whole; resumes an interrupted one."""
    sources = download_sources(name) if sources is None else sources
    errors = []
    try:
        target.mkdir(parents=True, exist_ok=True)
        (target / COMPLETE_MARK).unlink(missing_ok=True)  # (a mark over missing files)
        (target / DOWNLOADING_MARK).touch()
    except OSError as exc:
        raise ModelDownloadError(f"cannot download {name} into {target}: {exc}") from None
    for hub, repo, fetch in sources:
        # a first run fetches gigabytes: never silently (nor a hung hub taken for a slow load)
        _notice(f"downloading {name} from {hub} ({repo}) into {target} ...")
        before = _unfinished_files(target)
        try:
            fetch(repo, target)  # both show a progress bar and resume an interrupted download
            # some hub clients return what they have when the hub is unreachable: files this
            # fetch left half-written (not those an earlier one left, for files not fetched now)
            if not _has_required_files(target):
                raise ModelDownloadError("the download did not finish (required files missing)")
            after = _unfinished_files(target).items()
            if unfinished := sorted(p for p, seen in after if before.get(p) != seen):
                names = ", ".join(p.name for p in unfinished)
                raise ModelDownloadError(f"the download did not finish ({names} half-written)")
            _remove_damaged(target)
        except Exception as exc:  # offline, hub unreachable, repository moved, package missing
            errors.append(f"{hub} {repo}: {exc}")
            continue
        (target / COMPLETE_MARK).write_text(f"{hub} {repo}\n", encoding="utf-8")
        (target / DOWNLOADING_MARK).unlink(missing_ok=True)
        for stale in _unfinished_files(target):  # earlier fetches' leftovers (up to ~1 GB each)
            stale.unlink(missing_ok=True)
        return
    raise ModelDownloadError(
        f"could not download {name}: " + "; ".join(errors) + ".\n"
        f"Without network, copy the official model directory (Hugging Face {MODELS[name]} or "
        f"ModelScope {MODELSCOPE_IDS[name]}) into {target} and run again."
    )


def _remove_damaged(target: Path) -> None:
    """Files damaged in transfer (``integrity``: a checkpoint's CRC-32s, the hub's hashes) are
    removed, with the hub client's record of them, so that the next fetch gets them again."""
    from .integrity import check_model_files

    damaged = [result for result in check_model_files(target) if result.problem is not None]
    for result in damaged:
        (target / result.name).unlink(missing_ok=True)
        metadata = target / ".cache" / "huggingface" / "download" / f"{result.name}.metadata"
        metadata.unlink(missing_ok=True)
    if damaged:
        listed = "; ".join(f"{result.name} {result.problem}" for result in damaged)
        raise ModelDownloadError(f"files came damaged ({listed}); removed, to be fetched again")


# the model version of each official release (its files are known before it is downloaded)
RELEASE_VERSIONS = {"CosyVoice-300M": 1, "CosyVoice2-0.5B": 2, "Fun-CosyVoice3-0.5B-2512": 3}
# besides the files the engine opens: optional ones it reads, and the hubs' metadata
OPTIONAL_FILES = ("spk2info.pt", "llm.rl.pt", "configuration.json", "README.md")


def download_patterns(name: str) -> list[str]:
    """The files of an official release to fetch: those the engine reads, not the repository's
    others (the Qwen weights of CosyVoice-BlankEN, whose config alone is read, ~1 GB; the
    TensorRT/JIT exports), which the official's own scripts use."""
    from .modeldir import required_files

    version = next(v for prefix, v in RELEASE_VERSIONS.items() if name.startswith(prefix))
    return [*required_files(version), *OPTIONAL_FILES]


def _from_hugging_face(repo: str, target: Path) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # tokenizers normally brings it along
        raise ModelDownloadError("needs the huggingface_hub package") from None
    patterns = download_patterns(repo.split("/")[-1])
    bound_hub_timeouts()
    snapshot_download(repo_id=repo, local_dir=str(target), allow_patterns=patterns)


HUB_TIMEOUT_VARIABLE = "COSYVOICE_LITE_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 60.0  # seconds without progress: a slow download still goes on
_hub_timeout = DEFAULT_HUB_TIMEOUT  # (read by the request hook, set by bound_hub_timeouts)
_bounded_clients = False


def hub_timeout() -> float:
    """Seconds a hub request may wait for a connection or for each read or write:
    ``$COSYVOICE_LITE_HUB_TIMEOUT``, else 60."""
    text = os.environ.get(HUB_TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_HUB_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ModelDownloadError(
            f"${HUB_TIMEOUT_VARIABLE} must be a number of seconds, got {text!r}"
        )
    return seconds


def bound_hub_timeouts() -> None:
    """huggingface_hub makes its HTTP client with no timeout (and passes timeout=None to some
    calls): a hub or proxy that took the connection and never answered hung a download for
    good, without a word. From now on every request it makes waits at most ``hub_timeout()``
    for a connection and for each read or write; its own shorter timeouts stay."""
    global _hub_timeout, _bounded_clients
    _hub_timeout = hub_timeout()
    if _bounded_clients:
        return
    import huggingface_hub

    if hasattr(huggingface_hub, "set_client_factory"):  # 1.x and later: httpx clients
        from huggingface_hub.utils import _http

        # the factory in place (the user's own, set before), with the hook added
        made = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory

        def bounded_client():  # noqa: ANN202 - an httpx.Client (httpx or httpx2)
            client = made()
            hooks = client.event_hooks
            hooks["request"] = [*hooks.get("request", []), _bound_request]
            client.event_hooks = hooks
            return client

        huggingface_hub.set_client_factory(bounded_client)
    elif hasattr(huggingface_hub, "configure_http_backend"):  # 0.x: requests sessions
        import requests

        class BoundedSession(requests.Session):
            def request(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                if kwargs.get("timeout") is None:
                    kwargs["timeout"] = _hub_timeout
                return super().request(*args, **kwargs)

        huggingface_hub.configure_http_backend(BoundedSession)
    _bounded_clients = True


def _bound_request(request) -> None:  # noqa: ANN001 - an httpx.Request
    """An httpx request hook: the timeouts left unbounded (None) get ``_hub_timeout``. (Run
    before the request is sent: its transport, a proxy's too, reads them from there.)"""
    given = request.extensions.get("timeout") or {}
    kinds = {"connect": None, "read": None, "write": None, "pool": None, **given}
    bounded = {kind: _hub_timeout if value is None else value for kind, value in kinds.items()}
    request.extensions = {**request.extensions, "timeout": bounded}


def _from_modelscope(repo: str, target: Path) -> None:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelDownloadError("needs the modelscope package (pip install modelscope)") from None
    patterns = download_patterns(repo.split("/")[-1])
    try:
        snapshot_download(repo, local_dir=str(target), allow_patterns=patterns)
    except TypeError:  # a modelscope without allow_patterns: the whole repository
        snapshot_download(repo, local_dir=str(target))


def file_digest(path: Path, digest: hashlib._Hash) -> str:
    """``digest`` (a hashlib object, perhaps already fed a prefix) over ``path``'s bytes, read
    a MB at a time."""
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    return file_digest(path, hashlib.sha256())


def whisper_vocab_path(download: bool = True) -> Path:
    """Path of whisper's ``multilingual.tiktoken`` in the cache, fetching it once if needed.

    Two sources, tried in order: the file itself from the whisper repository, then the
    openai-whisper source distribution through pip (which ships it as a package asset), so installs
    behind a PyPI mirror work too.
    """
    target = cache_dir() / "assets" / WHISPER_VOCAB
    if target.is_file() and _sha256(target) == WHISPER_VOCAB_SHA256:
        return target
    if not download:
        raise ModelDownloadError(
            f"the v1 text vocabulary is missing and downloading is disabled: place "
            f"{WHISPER_VOCAB} in {target.parent}"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelDownloadError(f"cannot write the cache {target.parent}: {exc}") from None
    errors = []
    for fetch in (_fetch_vocab_url, _fetch_vocab_sdist):
        _notice(
            f"CosyVoice v1 needs whisper's text vocabulary ({WHISPER_VOCAB}, 0.8 MB, fetched "
            f"once into {target.parent}): {VOCAB_SOURCES[fetch.__name__]}"
        )
        try:
            with tempfile.TemporaryDirectory() as tmp:
                got = fetch(Path(tmp))
                if _sha256(got) != WHISPER_VOCAB_SHA256:
                    raise ModelDownloadError(
                        f"checksum mismatch for {WHISPER_VOCAB} from {fetch.__name__}"
                    )
                place_file(got, target)
            return target
        except Exception as exc:  # try the next source
            errors.append(f"{fetch.__name__.removeprefix('_fetch_vocab_')}: {exc}")
    raise ModelDownloadError(
        f"could not obtain whisper's {WHISPER_VOCAB} (needed by CosyVoice-300M models): "
        + "; ".join(errors)
        + f".\nWithout network, copy it from an openai-whisper install (whisper/assets/) or from "
        f"{WHISPER_VOCAB_URL} into {target.parent}."
    )


def place_file(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` under a name of this call's own (processes fetching it at
    once each write a whole copy), then move it into place at once: never half-written. Created
    as a plain file is (0666 less the umask: a shared cache stays readable to its users), not
    0600 as a temporary file is."""
    partial = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as out, source.open("rb") as data:
            shutil.copyfileobj(data, out)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


VOCAB_SOURCES = {
    "_fetch_vocab_url": f"downloading {WHISPER_VOCAB_URL}",
    "_fetch_vocab_sdist": f"trying pip instead: 'pip download {WHISPER_SDIST}' (the openai-whisper "
    "source package, ~800 KB, from your configured package index; only the vocabulary is kept)",
}


def _notice(message: str) -> None:
    """A one-line note on stderr: fetching something on first use should never be silent.
    Where logging is set up (``serve``: JSON lines a collector parses), a log record."""
    if logging.getLogger().handlers and log.isEnabledFor(logging.INFO):
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _fetch_vocab_url(tmp: Path) -> Path:
    out = tmp / WHISPER_VOCAB
    with urllib.request.urlopen(WHISPER_VOCAB_URL, timeout=20) as response, out.open("wb") as f:
        shutil.copyfileobj(response, f)
    return out


def _fetch_vocab_sdist(tmp: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--dest",
        str(tmp),
        WHISPER_SDIST,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise ModelDownloadError(
            done.stderr.strip().splitlines()[-1] if done.stderr else "pip failed"
        )
    archive = next(tmp.glob("openai_whisper-*.tar.gz"))
    with tarfile.open(archive) as tar:
        member = next(
            m for m in tar.getmembers() if m.name.endswith(f"whisper/assets/{WHISPER_VOCAB}")
        )
        source = tar.extractfile(member)
        if source is None:
            raise ModelDownloadError(f"{archive.name} has no {WHISPER_VOCAB}")
        out = tmp / WHISPER_VOCAB
        with out.open("wb") as f:
            shutil.copyfileobj(source, f)
    return out
