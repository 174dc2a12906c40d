"""Form bodies (multipart/form-data and URL-encoded), read strictly and within bounds.

Starlette's own form reader turns text that is not valid in the body's charset into Latin-1
characters without a word, so a transcript sent in GBK was spoken as mojibake; it also spools
files to disk that we read back into memory anyway. Here every part is kept in memory as it
arrives (the guard middleware bounds the whole body), each file and text field against its own
limit, and text that does not decode is a 400 naming the field.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from .errors import ApiError

TEXT_FIELD_BYTES = 64 * 1024  # a text field (names, transcripts, options) is never near this


@dataclass
class Form:
    """A parsed form: text fields and file contents (already size-checked)."""

    fields: dict[str, str]
    files: dict[str, bytes]


@dataclass
class _Part:
    name: str = ""
    is_file: bool = False
    data: bytearray = field(default_factory=bytearray)
    text: str = ""  # a text field's value, decoded when the part ends


def _malformed(message: str) -> ApiError:
    return ApiError(400, f"malformed form body: {message}", code="invalid_multipart")


def _charset(params: dict[bytes, bytes]) -> str:
    name = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise ApiError(
            400, f"unknown charset {name!r}; send UTF-8", code="invalid_multipart"
        ) from None


def _not_text(what: str, charset: str, param: str | None = None) -> ApiError:
    return ApiError(
        400,
        f"{what} is not valid {charset} text (send UTF-8, or name the charset in the Content-Type)",
        code="invalid_text",
        param=param,
    )


def _decode(data: bytes, charset: str, what: str, param: str | None = None) -> str:
    try:
        return data.decode(charset)
    except UnicodeDecodeError:
        raise _not_text(what, charset, param) from None


class _FormReader:
    """The callbacks of python-multipart's parser: parts collected with their limits."""

    def __init__(self, charset: str, file_limit: int, file_fields: tuple[str, ...]) -> None:
        self.charset, self.file_limit, self.file_fields = charset, file_limit, file_fields
        self.parts: list[_Part] = []
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
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self.parts.append(_Part())
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
        part = self.parts[-1]
        part.name = _decode(options[b"name"], self.charset, "a field name")
        part.is_file = b"filename" in options

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.data.extend(data[start:end])
        if part.is_file and len(part.data) > self.file_limit:
            raise ApiError(
                413,
                f"{part.name} is too large: more than {self.file_limit} bytes of audio",
                code="upload_too_large",
                param=part.name,
            )
        if not part.is_file and len(part.data) > TEXT_FIELD_BYTES:
            raise ApiError(
                413,
                f"field '{part.name}' is too large: more than {TEXT_FIELD_BYTES} bytes",
                code="field_too_large",
                param=part.name,
            )

    def _end(self) -> None:
        part = self.parts[-1]
        if not part.is_file:
            part.text = _decode(bytes(part.data), self.charset, f"field '{part.name}'", part.name)
            part.data.clear()


async def _read_parts(request: Request, params: dict, limit: int, file_fields) -> list[_Part]:
    if b"boundary" not in params:
        raise _malformed("no boundary in the Content-Type")
    reader = _FormReader(_charset(params), limit, file_fields)
    parser = MultipartParser(params[b"boundary"], reader.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise _malformed(str(exc) or type(exc).__name__) from None
    return reader.parts


async def _read_urlencoded(request: Request, params: dict) -> list[_Part]:
    charset = _charset(params)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > TEXT_FIELD_BYTES:
            raise ApiError(
                413,
                f"form too large: more than {TEXT_FIELD_BYTES} bytes of fields",
                code="field_too_large",
            )
    try:
        text = bytes(body).decode(charset)
        pairs = parse_qsl(text, keep_blank_values=True, encoding=charset, errors="strict")
    except UnicodeDecodeError:
        raise _not_text("the form", charset) from None
    return [_Part(name, text=value) for name, value in pairs]


async def read_form(
    request: Request, limit: int, file_fields: tuple[str, ...], text_fields: tuple[str, ...]
) -> Form:
    """Read a form with files named in ``file_fields`` (``limit`` bytes each, at most one of
    each) and text fields named in ``text_fields``; anything else is a 400 naming what is
    accepted. The last of a repeated text field wins."""
    length = request.headers.get("content-length")
    allowed = limit * len(file_fields) + 64 * 1024
    if length and length.isdigit() and int(length) > allowed:
        raise ApiError(
            413,
            f"request too large: {int(length)} bytes, at most {limit} bytes per audio file",
            code="upload_too_large",
        )
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    if kind == b"multipart/form-data":
        parts = await _read_parts(request, params, limit, file_fields)
    elif kind == b"application/x-www-form-urlencoded":
        parts = await _read_urlencoded(request, params)
    else:
        raise ApiError(
            415,
            "send multipart/form-data (audio as files, the rest as fields)",
            code="unsupported_media_type",
        )
    fields, files = {}, {}
    for part in parts:
        if part.name in file_fields and part.is_file:
            if part.name in files:
                raise ApiError(
                    400, f"more than one file '{part.name}'", code="invalid_field", param=part.name
                )
            files[part.name] = bytes(part.data)
        elif part.name in text_fields and not part.is_file:
            fields[part.name] = part.text
        elif part.name in file_fields or part.name in text_fields:
            want = "a file upload" if part.name in file_fields else "a text field, not a file"
            raise ApiError(
                400, f"'{part.name}' must be {want}", code="invalid_field", param=part.name
            )
        else:
            raise ApiError(
                400,
                f"unknown field '{part.name}'; accepted: {', '.join(text_fields + file_fields)}",
                code="invalid_field",
                param=part.name,
            )
    return Form(fields, files)
