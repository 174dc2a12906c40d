"""Issue 11, bounded requests: body limits enforced while reading (Content-Length and chunked),
body read timeout, every text field under its limit and valid Unicode (400 naming the field),
security headers, the docs behind the key, and streams that cannot finish aborted (not ended as
if complete). All against a real uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import httpx
import pytest
from test_server_support import EngineProbe, ServerThread, metric, prompt_wav, tiny_engine

from cosyvoice_lite.serving import Settings, create_app
from cosyvoice_lite.serving.errors import ApiError
from cosyvoice_lite.serving.guard import PAGE_CSP, unreadable_json

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def engine(v1_dir):
    return tiny_engine(v1_dir)


@pytest.fixture(scope="module")
def preset(engine) -> str:
    return engine.voices()[0]


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    settings = Settings(
        max_text_chars=40,
        max_instruct_chars=30,
        max_prompt_text_chars=50,
        max_json_bytes=4096,
        max_upload_bytes=200_000,
        body_timeout=1.0,
        voices_dir=tmp_path_factory.mktemp("voices"),
    )
    with ServerThread(create_app(EngineProbe(engine), settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def error_of(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    if code is not None:
        assert error["code"] == code, error
    return error


def raw_request(server, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes and read until the server closes or ``wait`` passes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


# ------------------------------------------------------------------------------- body limits


def test_json_body_over_the_limit_is_refused_from_content_length(client, preset):
    body = json.dumps({"text": "你好", "speaker": preset, "pad": "x" * 10_000})
    error = error_of(
        client.post("/tts", content=body, headers={"content-type": "application/json"}),
        413,
        "body_too_large",
    )
    assert error["max_bytes"] == 4096


def test_chunked_json_body_is_cut_off_while_reading(client, server, preset):
    sent = {"bytes": 0}

    def chunks():
        yield b'{"text": "hello", "speaker": "' + preset.encode() + b'", "pad": "'
        for _ in range(2000):  # 2 MB offered, without a Content-Length
            sent["bytes"] += 1024
            yield b"x" * 1024
        yield b'"}'

    before = metric(
        httpx.get(f"{server.url}/metrics").text, "cosyvoice_errors_total", code="body_too_large"
    )
    try:
        response = client.post(
            "/tts", content=chunks(), headers={"content-type": "application/json"}
        )
        error_of(response, 413, "body_too_large")
    except (httpx.WriteError, httpx.RemoteProtocolError):
        pass  # the server answered and closed while the client was still sending: also fine
    after = metric(
        httpx.get(f"{server.url}/metrics").text, "cosyvoice_errors_total", code="body_too_large"
    )
    assert after == before + 1


def test_chunked_multipart_upload_is_cut_off_while_reading(client):
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()

    def chunks():
        yield head
        for _ in range(400):  # 400 kB offered, the upload limit is 200 kB (+ 64 kB of form)
            yield b"\0" * 1024
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        response = client.post(
            "/voices",
            content=chunks(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        error_of(response, 413)
    except (httpx.WriteError, httpx.RemoteProtocolError):
        pass
    assert client.get("/voices").json()["data"] == []  # nothing stored


def test_body_that_stops_arriving_gets_408(server, preset):
    start = time.monotonic()
    head = (
        b"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 200\r\n\r\n"
    )
    answer = raw_request(server, head + b'{"text": "hi", ', wait=5)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_timeout" in answer
    assert time.monotonic() - start < 4


def test_a_body_trickled_under_the_pause_limit_ends_at_the_request_timeout(engine, tmp_path):
    """A byte every 0.5 s, under the 1 s pause limit, held the connection and its handler for
    ever (240 s and counting): the whole body must come within --timeout too."""
    settings = Settings(body_timeout=1.0, request_timeout=3.0, voices_dir=tmp_path)
    with ServerThread(create_app(engine, settings)) as server:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                b"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 200\r\n\r\n{"
            )
            answer = b""
            while not answer and time.monotonic() - start < 8:
                time.sleep(0.5)
                with contextlib.suppress(OSError):
                    sock.sendall(b" ")
                sock.settimeout(0.01)
                with contextlib.suppress(TimeoutError, OSError):
                    answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and b"longer than 3 s" in answer, answer[:300]
    assert 2.5 < time.monotonic() - start < 6


# ------------------------------------------------------------------------------- text fields


@pytest.mark.parametrize(
    ("path", "body", "field", "code"),
    [
        ("/tts", {"text": "你好", "instruct": "x" * 31}, "instruct", "instruct_too_long"),
        ("/tts", {"text": "x" * 41}, "text", "text_too_long"),
        ("/tts", {"text": "你好", "speaker": "v" * 300}, "speaker", "speaker_too_long"),
    ],
)
def test_every_text_field_has_a_limit(client, preset, path, body, field, code):
    error = error_of(client.post(path, json={"speaker": preset, **body}), 400, code)
    assert error["param"] == field


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/tts", '{"text": "a\\ud800b", "speaker": "%s"}', "text"),
        ("/tts", '{"text": "hi", "speaker": "%s", "instruct": "\\udc00"}', "instruct"),
        ("/v1/audio/speech", '{"model": "tts-1", "input": "\\ud83d", "voice": "%s"}', "input"),
        (
            "/v1/audio/speech",
            '{"model": "tts-1", "input": "hi", "voice": {"id": "\\ud800"}}',
            "voice.id",
        ),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(client, preset, path, body, field):
    content = (body % preset if "%s" in body else body).encode()
    error = error_of(
        client.post(path, content=content, headers={"content-type": "application/json"}),
        400,
        "invalid_text",
    )
    assert error["param"] == field
    assert "surrogate" in error["message"]


@pytest.mark.parametrize("inner", [b'"\\ud800"', b"1"], ids=["surrogate", "plain"])
@pytest.mark.parametrize("path", ["/tts", "/v1/audio/speech"])
def test_json_nested_too_deeply_is_400(client, path, inner):
    """Past the JSON parser's depth, whatever the innermost value (the check for lone
    surrogates parses the body first), a clear 400, not a RecursionError."""
    body = b'{"x": ' + b"[" * 1500 + inner + b"]" * 1500 + b"}"
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    # a number past Python's 4,300 digits is looked for by parsing too (this server's JSON
    # limit is smaller than such a body)
    deep_digits = b'{"x": ' + b"[" * 1500 + b"1" * 4400 + b"]" * 1500 + b"}"
    assert "nested too deeply" in unreadable_json(deep_digits)


def test_valid_surrogate_pairs_are_text(client, preset):
    # an escaped emoji is a proper pair: not refused as invalid text
    content = ('{"text": "hi \\ud83d\\ude00", "speaker": "' + preset + '", "seed": 1}').encode()
    response = client.post("/tts", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_unreadable_and_compressed_bodies_say_why(client, preset):
    """What the route's parser only calls 'an error parsing the body' gets a code and a reason."""
    json_headers = {"content-type": "application/json"}
    not_utf8 = b'{"text": "\xff\xfe", "speaker": "x"}'
    error = error_of(
        client.post("/tts", content=not_utf8, headers=json_headers), 400, "invalid_json"
    )
    assert "UTF-8" in error["message"]
    # (this server's JSON limit is smaller than a number past Python's 4,300 digits)
    digits = b'{"text": "hi", "seed": ' + b"1" * 5000 + b"}"
    assert "digits" in unreadable_json(digits) and unreadable_json(b'{"a": 1}') is None
    gzip = {**json_headers, "content-encoding": "gzip"}
    body = ('{"text": "hi", "speaker": "' + preset + '"}').encode()
    error = error_of(client.post("/tts", content=body, headers=gzip), 415, "unsupported_media_type")
    assert "uncompressed" in error["message"]


def test_a_body_of_many_small_values_is_refused_before_it_is_parsed(engine, preset, tmp_path):
    """Millions of empty objects within the JSON size limit parsed to ~23x their size (310 MB a
    request, 8 at once 3.4 GB); text full of commas and brackets is still text."""
    from test_server_support import ServerThread

    json_headers = {"content-type": "application/json"}
    padded = b'{"text": "hi", "speaker": "x", "pad": [' + b"{}," * 200_000 + b"{}]}"
    busy = "[breath]，, [laughter]{x}, " * 40  # tags and commas: text, within the text limit
    body = json.dumps({"text": busy[:180], "speaker": preset, "seed": 1}).encode()
    server = ServerThread(create_app(engine, Settings(voices_dir=tmp_path)))
    with server, server.client() as client:
        # every JSON media type: FastAPI parses application/*+json too (it had skipped the checks)
        for kind in ("application/json", "application/vnd.api+json; charset=utf-8"):
            refused = client.post("/tts", content=padded, headers={"content-type": kind})
            error = error_of(refused, 400, "invalid_json")
            assert "JSON objects, arrays or items" in error["message"]
        assert client.post("/tts", content=body, headers=json_headers).status_code == 200


def test_voice_fields_are_limited(client):
    files = {"audio": ("p.wav", b"RIFF", "audio/wav")}
    error = error_of(
        client.post("/voices", data={"name": "ok", "prompt_text": "x" * 51}, files=files),
        400,
        "prompt_text_too_long",
    )
    assert error["param"] == "prompt_text"


def multipart(parts: list[tuple[str, bytes, str | None]], charset: str | None = None):
    """A form body written by hand (httpx always sends UTF-8): (name, bytes, filename)."""
    boundary = "f0rmb0undary"
    body = b""
    for name, data, filename in parts:
        file = f'; filename="{filename}"' if filename else ""
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{file}\r\n\r\n'.encode()
        )
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    if charset:
        content_type += f"; charset={charset}"
    return {"content": body, "headers": {"content-type": content_type}}


def test_form_text_must_decode_in_the_forms_charset(client):
    """Text that is not UTF-8 was read as Latin-1 and spoken as mojibake; now it is a 400 naming
    the field, and a form that names its charset is read in it."""
    said = "希望你好"
    audio = ("audio", prompt_wav(2.0), "p.wav")
    gbk = [("name", b"gbk-voice", None), ("prompt_text", said.encode("gbk"), None), audio]
    error = error_of(client.post("/voices", **multipart(gbk)), 400, "invalid_text")
    assert error["param"] == "prompt_text" and "utf-8" in error["message"]
    assert client.get("/voices/gbk-voice").status_code == 404
    created = client.post("/voices", **multipart(gbk, charset="gbk"))
    assert created.status_code == 201, created.text
    assert client.get("/voices/gbk-voice").json()["prompt_text"] == said
    assert client.delete("/voices/gbk-voice").status_code == 200
    urlencoded = {"content-type": "application/x-www-form-urlencoded"}
    error = error_of(
        client.post("/tts/upload", content=b"text=%FF%FE&speaker=x", headers=urlencoded),
        400,
        "invalid_text",
    )
    for charset in ("no-such-charset", "rot13", "base64", "undefined", "utf-16"):
        # not text encodings, or not ASCII-compatible as the form's framing is
        bad_charset = multipart([("name", b"x", None)], charset=charset)
        error = error_of(client.post("/voices", **bad_charset), 400, "invalid_multipart")
        assert charset in error["message"]
        error_of(
            client.post(
                "/tts/upload",
                content=b"text=hi",
                headers={"content-type": f"application/x-www-form-urlencoded; charset={charset}"},
            ),
            400,
            "invalid_multipart",
        )
    error = error_of(
        client.post("/tts/upload", content=b"text=u%FF", headers=urlencoded), 400, "invalid_text"
    )
    assert error["param"] == "text"


@pytest.mark.parametrize(
    ("path", "field"), [("/tts/upload", "text"), ("/voices", "name"), ("/v1/audio/voices", "name")]
)
def test_forms_that_the_parser_refuses_or_that_decode_to_surrogates_are_400(client, path, field):
    """A multipart boundary past python-multipart's 256 bytes, and UTF-7 text that decodes to a
    lone surrogate (in a field name or a value): clear 400s, not 500s."""
    boundary = "b" * 300
    long_boundary = {
        "content": f"--{boundary}--\r\n".encode(),
        "headers": {"content-type": f"multipart/form-data; boundary={boundary}"},
    }
    error_of(client.post(path, **long_boundary), 400, "invalid_multipart")
    utf7 = {"content-type": "application/x-www-form-urlencoded; charset=utf-7"}
    for body in (b"%2B2AA-=1", f"{field}=%2B2AA-".encode()):
        error_of(client.post(path, content=body, headers=utf7), 400, "invalid_text")
    error_of(
        client.post(path, **multipart([("+2AA-", b"1", None)], charset="utf-7")),
        400,
        "invalid_text",
    )


def test_form_fields_are_the_routes_own_and_bounded(client):
    audio = ("audio", prompt_wav(2.0), "p.wav")
    unknown = multipart([("name", b"v", None), ("colour", b"blue", None), audio])
    error = error_of(client.post("/voices", **unknown), 400, "invalid_field")
    assert error["param"] == "colour" and "accepted: name" in error["message"]
    as_file = multipart([("name", b"v", "name.txt"), audio])
    error = error_of(client.post("/voices", **as_file), 400, "invalid_field")
    assert "text field" in error["message"]
    twice = multipart([("name", b"v", None), audio, audio])
    error_of(client.post("/voices", **twice), 400, "invalid_field")
    huge_field = multipart([("name", b"v", None), ("prompt_text", b"x" * 70_000, None), audio])
    error = error_of(client.post("/voices", **huge_field), 413, "field_too_large")
    assert error["param"] == "prompt_text"
    as_text = multipart([("name", b"v", None), ("audio", prompt_wav(2.0), None)])
    error = error_of(client.post("/voices", **as_text), 400, "invalid_field")
    assert "file upload" in error["message"]  # refused at its headers, not after 64 KiB of it
    huge_unknown = multipart([("name", b"v", None), ("zzz", b"x" * 70_000, None), audio])
    error_of(client.post("/voices", **huge_unknown), 400, "invalid_field")
    many = multipart([("name", b"v", None)] * 2_000)
    error = error_of(client.post("/voices", **many), 400, "invalid_multipart")
    assert "parts" in error["message"]
    # a body cut before its closing boundary is not a shorter recording
    whole = multipart([("name", b"cut", None), audio])
    for cut in (40_000, len(b"--f0rmb0undary--\r\n")):
        truncated = {**whole, "content": whole["content"][:-cut]}
        error = error_of(client.post("/voices", **truncated), 400, "invalid_multipart")
        assert "closing boundary" in error["message"]
    assert client.get("/voices/cut").status_code == 404
    two = multipart([("name", b"v", None), ("audio_sample", *audio[1:]), ("file", *audio[1:])])
    error = error_of(client.post("/v1/audio/voices", **two), 400, "invalid_field")
    assert "at most 1 file" in error["message"]
    nameless = {**multipart([]), "content": b"--f0rmb0undary\r\n\r\nx\r\n--f0rmb0undary--\r\n"}
    error_of(client.post("/voices", **nameless), 400, "invalid_multipart")
    assert client.get("/voices").json()["data"] == []


# ------------------------------------------------------------------------------- headers, docs


def test_security_headers_on_every_response(client):
    for path in ("/health", "/nope", "/static/app.js"):
        response = client.get(path)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
    page = client.get("/")
    assert page.headers["content-security-policy"] == PAGE_CSP
    assert "content-security-policy" not in client.get("/health").headers


def test_the_page_and_its_files_are_revalidated_not_cached_for_days(client):
    """Without Cache-Control browsers cached app.js heuristically (a tenth of its age) and ran
    an upgraded server's old page for days; now they ask each time, and get a 304."""
    for path in ("/", "/favicon.ico", "/static/app.js", "/static/style.css"):
        assert client.get(path).headers.get("cache-control") == "no-cache", path
    etag = client.get("/static/app.js").headers["etag"]
    again = client.get("/static/app.js", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.headers["cache-control"] == "no-cache"


def test_form_line_breaks_count_once(client):
    """Browsers send a form's line breaks as CRLF: each \r was counted, so text the page's
    counter allowed (39 of 40) was refused as too long in the upload modes."""
    text = "\r\n".join(["你好。"] * 10)  # 39 characters as the page counts them, 48 with CRLF
    clone = multipart(
        [
            ("text", text.encode(), None),
            ("prompt_text", "希望你以后能够做的比我还好呦。".encode(), None),
            ("prompt_wav", prompt_wav(2.0), "p.wav"),
        ]
    )
    response = client.post("/tts/upload", **clone)
    assert response.status_code == 200, response.text
    said = "\r\n".join(["你好。"] * 11) + "\r你好。"  # 47 of 50, a lone CR too
    voice = [("name", b"crlf", None), ("prompt_text", said.encode(), None)]
    created = client.post("/voices", **multipart([*voice, ("audio", prompt_wav(2.0), "p.wav")]))
    assert created.status_code == 201, created.text
    assert client.get("/voices/crlf").json()["prompt_text"] == "\n".join(["你好。"] * 12)
    assert client.delete("/voices/crlf").status_code == 200


def test_head_is_get_without_the_body(client):
    """Uptime checks and load balancers probe with HEAD: every GET route answers it."""
    for path in ("/health", "/ready", "/info", "/", "/speakers", "/voices", "/openapi.json"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
    assert client.head("/tts").status_code == 405  # a POST route stays one


def test_a_trailing_slash_is_not_redirected(client, preset):
    """A 307 to an absolute http:// URL is wrong behind a TLS proxy: a clear 404 instead."""
    response = client.post(
        "/tts/", json={"text": "你好", "speaker": preset}, follow_redirects=False
    )
    error_of(response, 404, "http_404")


def test_a_path_wrong_only_in_its_slashes_names_the_route(client):
    """Open WebUI joins a base URL ending in "/v1/" to "/audio/speech"."""
    for path, route in (("/v1//audio/speech", "/v1/audio/speech"), ("/v1/models/", "/v1/models")):
        assert f"did you mean {route}?" in error_of(client.post(path, json={}), 404)["message"]
    assert "did you mean" not in error_of(client.get("/no/such/"), 404)["message"]


def test_json_sent_without_a_content_type_is_read_as_json(client, preset):
    """requests' ``data=json.dumps(body)`` sends no Content-Type."""
    body = json.dumps({"text": "你好", "speaker": preset}).encode()
    response = client.post("/tts", content=body)  # (httpx names no type for bytes)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"


def test_null_optional_fields_take_their_defaults(client, preset):
    """Jackson and Newtonsoft write unset optional properties as null."""
    model = client.get("/v1/models").json()["data"][0]["id"]
    unset = {"speed": None, "response_format": None, "stream_format": None, "stream": None}
    body = {"model": model, "input": "你好", "voice": preset, **unset}
    response = client.post("/v1/audio/speech", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/mpeg"
    tts = {"text": "你好", "speaker": preset, "speed": None, "format": None, "stream": None}
    assert client.post("/tts", json=tts).headers["content-type"] == "audio/wav"
    assert error_of(client.post("/tts", json={"text": None, "speaker": preset}), 422)


def test_errors_a_retry_would_meet_again_say_so():
    """OpenAI's generated SDKs retry 409 and 5xx twice unless x-should-retry says no; an error
    with Retry-After (429, 503) invites one."""
    assert ApiError(504, "too long").response().headers["x-should-retry"] == "false"
    busy = ApiError(503, "busy", headers={"Retry-After": "1"}).response()
    assert "x-should-retry" not in busy.headers
    assert "x-should-retry" not in ApiError(400, "bad").response().headers


@pytest.mark.parametrize("public", [False, True])
def test_docs_follow_the_api_key(engine, tmp_path, public):
    settings = Settings(api_key=KEY, docs_public=public, voices_dir=tmp_path)
    with ServerThread(create_app(engine, settings)) as running, running.client() as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == (200 if public else 401), path
            authorized = c.get(path, headers={"Authorization": f"Bearer {KEY}"})
            assert authorized.status_code == 200, path
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


# ------------------------------------------------------------------------------- truncation


@pytest.fixture
def uvicorn_errors():
    """What uvicorn's error logger emits (past its filters), whatever its propagation."""
    import logging

    class Kept(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    kept = Kept()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(kept)
    yield kept
    logger.removeHandler(kept)


def test_stream_that_times_out_is_aborted_not_ended(engine, tmp_path):
    """A streamed WAV cut by the request timeout must not look complete: the chunked transfer
    is aborted (no final chunk) and counted."""
    slow = EngineProbe(engine, memo=False, split=8, delay=0.5)
    settings = Settings(request_timeout=4.0, voices_dir=tmp_path)
    with ServerThread(create_app(slow, settings)) as running, running.client() as c:
        preset = engine.voices()[0]
        got = bytearray()
        with (
            pytest.raises(httpx.RemoteProtocolError),
            c.stream(
                "POST",
                "/tts",
                json={
                    "text": "你好。今天天气很好。我们去公园吧。",
                    "speaker": preset,
                    "stream": True,
                    "seed": 3,
                },
            ) as response,
        ):
            assert response.status_code == 200
            for piece in response.iter_bytes():
                got += piece
        assert got.startswith(b"RIFF")  # audio had started
        text = c.get("/metrics").text
        assert metric(text, "cosyvoice_truncated_streams_total") == 1
        assert c.get("/health").status_code == 200  # the server is fine


def test_a_stream_cut_on_purpose_is_logged_once(engine, tmp_path, uvicorn_errors):
    """As `serve` runs it (its h11 protocol), uvicorn also logged the cut stream as an ERROR
    ("returned without completing response"), without a request id, after the guard's own
    warning: alerts on errors fired for every client timeout."""
    import threading

    import uvicorn
    from test_server_support import free_port

    from cosyvoice_lite.serving.server import uvicorn_config

    slow = EngineProbe(engine, memo=False, split=8, delay=0.5)
    settings = Settings(request_timeout=2.0, voices_dir=tmp_path)
    port = free_port()
    server = uvicorn.Server(
        uvicorn_config(create_app(slow, settings), settings, "127.0.0.1", port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        body = {"text": "你好。今天天气很好。我们去公园吧。", "speaker": engine.voices()[0],
                "stream": True, "seed": 3}  # fmt: skip
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("POST", f"http://127.0.0.1:{port}/tts", json=body, timeout=30) as r,
        ):
            for _ in r.iter_bytes():
                pass
        time.sleep(0.5)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not [r for r in uvicorn_errors.records if "without completing" in r.getMessage()]


def test_sse_that_times_out_ends_with_an_error_event(engine, tmp_path):
    slow = EngineProbe(engine, memo=False, split=8, delay=0.5)
    settings = Settings(request_timeout=4.0, voices_dir=tmp_path)
    with ServerThread(create_app(slow, settings)) as running, running.client() as c:
        body = {
            "model": "tts-1",
            "input": "你好。今天天气很好。我们去公园吧。",
            "voice": engine.voices()[0],
            "stream_format": "sse",
        }
        response = c.post("/v1/audio/speech", json=body)
        assert response.status_code == 200, response.text
        events = [line for line in response.text.splitlines() if line.startswith("event: ")]
        assert events[-1] == "event: error"
        assert "event: speech.audio.done" not in events
        assert metric(c.get("/metrics").text, "cosyvoice_truncated_streams_total") == 1


def test_info_reports_every_text_and_body_limit(client):
    limits = client.get("/info").json()["limits"]
    assert limits["max_text_chars"] == 40 and limits["max_instruct_chars"] == 30
    assert limits["max_prompt_text_chars"] == 50 and limits["max_json_bytes"] == 4096


def test_openai_instructions_and_voice_are_limited(client, preset):
    body = {"model": "tts-1", "input": "你好", "voice": preset, "instructions": "x" * 31}
    error = error_of(client.post("/v1/audio/speech", json=body), 400, "instructions_too_long")
    assert error["param"] == "instructions"
    body = {"model": "tts-1", "input": "你好", "voice": "v" * 300}
    assert error_of(client.post("/v1/audio/speech", json=body), 400)["param"] == "voice"


# ------------------------------------------------------------------------------- the unexpected


class BuggyProbe(EngineProbe):
    """The engine, one property of which fails (a stand-in for any bug in a route)."""

    @property
    def known_markup(self):
        raise RuntimeError("boom")


def test_an_unexpected_error_is_a_500_carrying_the_request_id(engine, tmp_path, caplog):
    """A route's unexpected exception was answered by Starlette's outermost error middleware:
    no X-Request-Id (nor security headers) on the 500, and its "unhandled error" log line
    without the request's id, so the two could not be matched."""
    import logging

    settings = Settings(voices_dir=tmp_path)
    with (
        ServerThread(create_app(BuggyProbe(engine), settings)) as running,
        running.client() as c,
        caplog.at_level(logging.INFO),
    ):
        failed = c.get("/info", headers={"X-Request-Id": "trace-77"})
        error_of(failed, 500, "internal_error")
        assert failed.headers["x-request-id"] == "trace-77"
        assert failed.headers["x-content-type-options"] == "nosniff"
        text = c.get("/metrics").text
    assert metric(text, "cosyvoice_errors_total", code="internal_error") == 1
    assert metric(text, "cosyvoice_requests_total", endpoint="/info", status="500") == 1
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert [getattr(r, "request_id", None) for r in logged] == ["trace-77"]
    assert logged[0].exc_info is not None  # the traceback, once
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]
    access = [r for r in caplog.records if r.name.endswith(".access") and r.status == 500]
    assert [r.request_id for r in access] == ["trace-77"]


def test_a_stream_cut_by_the_shutdown_is_not_a_client_gone(engine, tmp_path, caplog):
    """A stream uvicorn cancelled at the end of its shutdown time was logged "client went
    away, synthesis cancelled" and counted in cancelled_total: it is the shutdown's (logged
    as a stream aborted, guard.py)."""
    import logging
    import threading

    slow = EngineProbe(engine, memo=False, split=8, delay=0.5)
    app = create_app(slow, Settings(voices_dir=tmp_path))
    body = {"text": "你好。今天天气很好。我们去公园吧。", "speaker": engine.voices()[0],
            "stream": True, "format": "pcm"}  # fmt: skip
    outcome: dict[str, object] = {}
    started = threading.Event()

    def stream(url: str) -> None:
        try:
            with httpx.stream("POST", f"{url}/tts", json=body, timeout=30) as response:
                for _ in response.iter_bytes():
                    started.set()
            outcome["end"] = "complete"
        except httpx.HTTPError as exc:
            outcome["end"] = type(exc).__name__

    with caplog.at_level(logging.INFO, logger="cosyvoice_lite.serving"):
        with ServerThread(app) as running:
            running.server.config.timeout_graceful_shutdown = 0.5
            client = threading.Thread(target=stream, args=(running.url,))
            client.start()
            assert started.wait(30), "no audio arrived"
        client.join(timeout=30)
    assert outcome["end"] == "RemoteProtocolError", outcome  # cut, not complete
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "stream aborted" in m and "shutting down" in m], messages
    assert not [m for m in messages if "client went away" in m], messages
    assert metric(app.state.server.metrics.render(), "cosyvoice_cancelled_total") == 0
