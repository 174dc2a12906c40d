"""Form bodies (multipart/form-data and URL-encoded), read strictly and within bounds.

Starlette's own form reader turns text that is not valid in the body's charset into Latin-1
characters without a word, so a transcript sent in GBK was spoken as mojibake. Here each file and
text field is read against its own limit as it arrives (the guard middleware bounds the whole
body), files spooled to disk past ``SPOOL_BYTES`` so that many slow uploads at once do not hold
their bodies in memory; a part the route does not take is refused as soon as its headers are
read, a body that stops before its closing boundary is refused (a cut upload is not a shorter
recording), and text that does not decode is a 400 naming the field.
"""

from __future__ import annotations

import codecs
import errno
import os
from dataclasses import dataclass, field
from tempfile import SpooledTemporaryFile
from urllib.parse import unquote_to_bytes

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from .errors import ApiError
from .guard import FORM_OVERHEAD

TEXT_FIELD_BYTES = 64 * 1024  # a text field (names, transcripts, options) is never near this
# repeated text fields are allowed (the last wins), within this many parts per field a route takes
PARTS_PER_FIELD = 2
SPOOL_BYTES = 1024 * 1024  # a file part past this goes to a temporary file while it arrives


@dataclass
class Form:
    """A parsed form: text fields and file contents (already size-checked)."""

    fields: dict[str, str]
    files: dict[str, bytes]


@dataclass
class _Part:
    """A part as it arrives: the parser's callbacks add to ``data``; a file's data moves to its
    spool after each chunk of the body (``flush``), on a worker thread once it is on disk."""

    name: str
    is_file: bool
    data: bytearray = field(default_factory=bytearray)
    spool: SpooledTemporaryFile | None = None
    size: int = 0

    def add(self, data: bytes) -> None:
        self.data.extend(data)
        self.size += len(data)

    async def flush(self) -> None:
        if self.spool is None or not self.data:
            return
        data = bytes(self.data)
        self.data.clear()
        try:
            if self.size > SPOOL_BYTES:  # rolled over to a file: disk writes off the event loop
                await run_in_threadpool(self.spool.write, data)
            else:
                self.spool.write(data)
        except OSError as exc:
            raise _spool_failed(exc) from None

    async def read(self) -> bytes:
        if self.spool is None:
            return bytes(self.data)
        try:
            self.spool.seek(0)
            return await run_in_threadpool(self.spool.read)
        except OSError as exc:
            raise _spool_failed(exc) from None

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()


def _spool_failed(exc: OSError) -> ApiError:
    """The temporary directory (TMPDIR) full or failing while an upload is spooled: the
    server's condition, as for its voice storage (it had been a generic 500 with tracebacks)."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    reason = "is full" if full else f"failed ({os.strerror(exc.errno) if exc.errno else exc})"
    return ApiError(
        507 if full else 503,
        f"cannot receive the upload: the server's temporary storage {reason}",
        "server_error",
        "insufficient_storage" if full else "storage_unavailable",
        headers={"Connection": "close"},  # (the rest of the body is not read)
    )


def _malformed(message: str) -> ApiError:
    return ApiError(400, f"malformed form body: {message}", code="invalid_multipart")


def _charset(params: dict[bytes, bytes]) -> str:
    """The form's charset (UTF-8 unless named): a text encoding that writes ASCII as ASCII, as
    the form's framing is ASCII (``rot13``, ``base64`` or ``utf-16`` are not)."""
    name = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(name).name
        if "name=-_.09AZaz".encode(charset) == b"name=-_.09AZaz":
            return charset
    except (LookupError, UnicodeError, TypeError):
        pass
    raise ApiError(
        400, f"charset {name!r} cannot be used for a form; send UTF-8", code="invalid_multipart"
    )


def _decode(data: bytes, charset: str, name: str | None) -> str:
    try:
        text = data.decode(charset)
        text.encode("utf-8")  # UTF-7 (and some others) can decode to lone surrogates
        return text
    except UnicodeError:
        what = f"field '{name}'" if name is not None else "a field name"
        raise ApiError(
            400,
            f"{what} is not valid {charset} text (send UTF-8, or name the charset in the "
            "Content-Type)",
            code="invalid_text",
            param=name,
        ) from None


class _Fields:
    """What one route takes: its file fields (at most one file each, ``limit`` bytes) and text
    fields; every check names the field."""

    def __init__(
        self, limit: int, files: tuple[str, ...], texts: tuple[str, ...], max_files: int
    ) -> None:
        self.limit, self.files, self.texts, self.max_files = limit, files, texts, max_files
        self.max_parts = PARTS_PER_FIELD * (len(files) + len(texts))
        self.file_count = 0

    def check(self, name: str, is_file: bool) -> None:
        self.file_count += is_file
        if self.file_count > self.max_files:
            raise self._invalid(
                name, f"at most {self.max_files} file(s) of {', '.join(self.files)}"
            )
        if name in self.files and not is_file:
            raise self._invalid(name, f"'{name}' must be a file upload")
        if name in self.texts and is_file:
            raise self._invalid(name, f"'{name}' must be a text field, not a file")
        if name not in self.files and name not in self.texts:
            accepted = ", ".join(self.texts + self.files)
            raise self._invalid(name, f"unknown field '{name}'; accepted: {accepted}")

    def check_size(self, part: _Part) -> None:
        if part.is_file and part.size > self.limit:
            raise ApiError(
                413,
                f"{part.name} is too large: more than {self.limit} bytes of audio",
                code="upload_too_large",
                param=part.name,
            )
        if not part.is_file and part.size > TEXT_FIELD_BYTES:
            raise ApiError(
                413,
                f"field '{part.name}' is too large: more than {TEXT_FIELD_BYTES} bytes",
                code="field_too_large",
                param=part.name,
            )

    @staticmethod
    def _invalid(name: str, message: str) -> ApiError:
        return ApiError(400, message, code="invalid_field", param=name)


class _MultipartReader:
    """The callbacks of python-multipart's parser: each part checked when its headers end,
    its data against its limit as it arrives."""

    def __init__(self, charset: str, fields: _Fields) -> None:
        self.charset, self.fields = charset, fields
        self.parts: list[_Part] = []
        self.ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_end": self._end,
        }

    def _begin(self) -> None:
        if len(self.parts) >= self.fields.max_parts:
            raise _malformed(f"more than {self.fields.max_parts} parts")
        self._disposition = b""

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise _malformed("a part without a name in its Content-Disposition")
        name = _decode(options[b"name"], self.charset, None)
        # (python-multipart's header parser drops an RFC 5987 filename*=, which marks a file too)
        is_file = b"filename" in options or b"filename*=" in self._disposition.lower()
        self.fields.check(name, is_file)
        # closed by _close once read (or on any error)
        spool = SpooledTemporaryFile(max_size=SPOOL_BYTES) if is_file else None  # noqa: SIM115
        self.parts.append(_Part(name, is_file, spool=spool))

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.add(data[start:end])
        self.fields.check_size(part)

    def _end(self) -> None:
        self.ended = True


async def _read_multipart(
    request: Request, params: dict, charset: str, fields: _Fields
) -> list[_Part]:
    if not params.get(b"boundary"):
        raise _malformed("no boundary in the Content-Type")
    reader = _MultipartReader(charset, fields)
    try:
        # (the parser refuses a boundary longer than 256 bytes as it is made)
        parser = MultipartParser(params[b"boundary"], reader.callbacks())
        async for chunk in request.stream():
            parser.write(chunk)
            for part in reader.parts:  # a few at most (_Fields.max_parts)
                await part.flush()
        if not reader.ended:  # python-multipart's finalize() does not check this
            raise _malformed("the body ends before its closing boundary")
    except FormParserError as exc:
        _close(reader.parts)
        raise _malformed(str(exc) or type(exc).__name__) from None
    except BaseException:
        _close(reader.parts)
        raise
    return reader.parts


def _close(parts: list[_Part]) -> None:
    for part in parts:
        part.close()


async def _read_urlencoded(request: Request, charset: str, fields: _Fields) -> list[_Part]:
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > TEXT_FIELD_BYTES:
            raise ApiError(
                413,
                f"form too large: more than {TEXT_FIELD_BYTES} bytes of fields",
                code="field_too_large",
            )
    parts = []
    for pair in bytes(body).split(b"&"):
        if not pair:
            continue
        if len(parts) >= fields.max_parts:
            raise _malformed(f"more than {fields.max_parts} fields")
        raw_name, _, raw_value = pair.partition(b"=")
        name = _decode(unquote_to_bytes(raw_name.replace(b"+", b" ")), charset, None)
        fields.check(name, is_file=False)
        value = unquote_to_bytes(raw_value.replace(b"+", b" "))
        parts.append(_Part(name, False, bytearray(value), size=len(value)))
    return parts


async def read_form(
    request: Request,
    limit: int,
    file_fields: tuple[str, ...],
    text_fields: tuple[str, ...],
    max_files: int | None = None,
) -> Form:
    """Read a form with files named in ``file_fields`` (``limit`` bytes each, at most one of
    each, at most ``max_files`` in all: None, one per field) and text fields named in
    ``text_fields``; anything else is a 400 naming what is accepted. The last of a repeated
    text field wins."""
    max_files = len(file_fields) if max_files is None else max_files
    length = request.headers.get("content-length")
    allowed = limit * max_files + FORM_OVERHEAD
    if length and length.isdigit() and int(length) > allowed:
        raise ApiError(
            413,
            f"request too large: {int(length)} bytes, at most {limit} bytes per audio file",
            code="upload_too_large",
        )
    fields = _Fields(limit, file_fields, text_fields, max_files)
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    if kind not in (b"multipart/form-data", b"application/x-www-form-urlencoded"):
        raise ApiError(
            415,
            "send multipart/form-data (audio as files, the rest as fields)",
            code="unsupported_media_type",
        )
    charset = _charset(params)
    if kind == b"multipart/form-data":
        parts = await _read_multipart(request, params, charset, fields)
    else:
        parts = await _read_urlencoded(request, charset, fields)
    texts, files = {}, {}
    try:
        for part in parts:
            if not part.is_file:
                text = _decode(await part.read(), charset, part.name)
                # browsers send a form's line breaks as CRLF (HTML's form encoding): one break
                # each, as in JSON, or text the page counted as fitting is too long here
                texts[part.name] = text.replace("\r\n", "\n").replace("\r", "\n")
            elif part.name in files:
                raise ApiError(
                    400, f"more than one file '{part.name}'", code="invalid_field", param=part.name
                )
            else:
                files[part.name] = await part.read()
    finally:
        _close(parts)
    return Form(texts, files)
