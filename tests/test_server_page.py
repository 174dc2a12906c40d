"""The web page in a real headless Chromium (Debian's chromium package, driven by Playwright; no
browser is ever downloaded): it loads, speaks (whole files and streamed playback), downloads,
creates voices from a file and from the microphone, and shows the API's errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_server_support import EngineProbe, ServerThread, decode, prompt_wav, tiny_engine

from cosyvoice_lite.serving import Settings, create_app

CHROMIUM = os.environ.get("COSYVOICE_LITE_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = os.environ.get("COSYVOICE_LITE_SCREENSHOT", "/tmp/cosyvoice-lite-page.png")

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium)",
                allow_module_level=True)

TEXT = "你好。"


@pytest.fixture(scope="module")
def engine(v1_dir):
    return tiny_engine(v1_dir)


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    settings = Settings(max_text_chars=80, voices_dir=tmp_path_factory.mktemp("page-voices"))
    # A short pause before each chunk makes "audio arrives while synthesis goes on" observable
    # however fast the tiny model is.
    with ServerThread(create_app(EngineProbe(engine, split=2, delay=0.1), settings)) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--autoplay-policy=no-user-gesture-required",
                  "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    context.grant_permissions(["microphone"], origin=server.url)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url)
    page.wait_for_selector("body[data-ready='ready']", timeout=30000)
    page.errors = errors
    yield page
    assert not errors, errors
    context.close()


def set_streaming(page, on: bool) -> None:
    if page.is_checked("#stream") != on:
        page.click("label.toggle")
    assert page.is_checked("#stream") == on


def speak(page, text: str = TEXT) -> None:
    count = page.locator(".result").count()
    page.fill("#text", text)
    page.click("#speak")
    page.wait_for_function(f"document.querySelectorAll('.result').length > {count}", timeout=60000)
    assert page.is_hidden("#error"), page.inner_text("#error")


def audio_duration(page, selector: str = ".result audio") -> float:
    return page.eval_on_selector(selector, """a => new Promise(resolve => {
        if (a.readyState >= 1) resolve(a.duration);
        else a.addEventListener('loadedmetadata', () => resolve(a.duration));
    })""")


def test_page_loads(page, engine):
    assert page.title() == "cosyvoice-lite"
    assert page.inner_text("#status") == "ready"
    assert engine.model.name in page.inner_text("#model-name")
    options = page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")
    assert options == engine.voices()
    assert page.is_hidden("#instruct-field")  # the -SFT model takes no instructions
    page.fill("#text", "你好")
    assert page.inner_text("#count") == "2 / 80"
    assert page.is_enabled("#speak")
    page.fill("#text", "字" * 81)
    assert "over" in page.get_attribute("#count", "class")
    assert page.is_disabled("#speak")


def test_speak_play_and_download(page):
    set_streaming(page, False)
    page.select_option("#format", "wav")
    speak(page)
    assert page.inner_text(".result .said") == TEXT
    assert audio_duration(page) > 0
    # it plays in the page
    page.eval_on_selector(".result audio", "a => { a.currentTime = 0; return a.play(); }")
    page.wait_for_function("document.querySelector('.result audio').currentTime > 0", timeout=10000)
    with page.expect_download() as download:
        page.click(".result .dl")
    audio, rate = decode(Path(download.value.path()).read_bytes())
    assert rate == 22050 and len(audio) > 0
    assert download.value.suggested_filename.endswith(".wav")

    page.select_option("#format", "mp3")
    speak(page, "谢谢。")
    assert page.inner_text(".result .dl") == "Download MP3"
    assert audio_duration(page) > 0


def test_streamed_playback_starts_while_audio_arrives(page):
    set_streaming(page, True)
    assert page.is_disabled("#format")
    page.evaluate("""() => {
        window.pushes = [];
        const push = StreamPlayer.prototype.push;
        StreamPlayer.prototype.push = function (bytes) {
            push.call(this, bytes);
            window.pushes.push({bytes: bytes.length, state: this.context.state,
                                scheduled: this.sources.length, at: performance.now(),
                                done: document.querySelectorAll('.result').length});
        };
    }""")
    speak(page, "你好。今天天气很好。")
    pushes = page.evaluate("window.pushes")
    assert len(pushes) >= 2, pushes  # played piece by piece, as the pieces arrived
    assert pushes[-1]["at"] - pushes[0]["at"] > 50  # ms: the first piece played before the last came
    assert pushes[-1]["scheduled"] == len(pushes) and sum(p["bytes"] for p in pushes) > 0
    assert pushes[0]["state"] == "running"
    assert "first audio" in page.inner_text(".result .meta")
    assert audio_duration(page) > 0  # the assembled result can be replayed


def test_create_voice_from_file_and_use_it(page, server):
    page.set_input_files("#voice-file", files=[{"name": "me.wav", "mimeType": "audio/wav",
                                                "buffer": prompt_wav(2.0)}])
    assert "me.wav" in page.inner_text("#voice-source")
    page.fill("#voice-name", "page-voice")
    page.fill("#voice-text", "希望你以后能够做的比我还好呦。")
    page.click("#voice-save")
    page.wait_for_selector("#voice-list li[data-voice='page-voice']")
    assert page.input_value("#voice") == "page-voice"
    set_streaming(page, False)
    speak(page)
    assert "page-voice" in page.inner_text(".result .meta")
    set_streaming(page, True)
    speak(page, "Hello! This is cosyvoice-lite speaking.")
    page.fill("#text", "欢迎使用 cosyvoice-lite：在你自己的电脑上把文字变成语音。")
    page.wait_for_function("[...document.querySelectorAll('.result audio')].every(a => a.duration > 0)")
    page.screenshot(path=SCREENSHOT, full_page=True)


def test_record_a_voice_with_the_microphone(page):
    page.click("#record")
    page.wait_for_function("parseFloat(document.getElementById('record-time').textContent) >= 1.2",
                           timeout=10000)
    page.click("#record")
    assert "recording" in page.inner_text("#voice-source")
    page.fill("#voice-name", "mic-voice")
    page.click("#voice-save")
    page.wait_for_selector("#voice-list li[data-voice='mic-voice']", timeout=30000)


def test_errors_are_shown(page, server):
    # an upload that is not audio: 415
    page.set_input_files("#voice-file", files=[{"name": "notes.wav", "mimeType": "audio/wav",
                                                "buffer": b"not audio at all"}])
    page.fill("#voice-name", "broken")
    page.click("#voice-save")
    page.wait_for_selector("#error:not([hidden])")
    assert "(415)" in page.inner_text("#error-title")
    assert "could not be decoded" in page.inner_text("#error-message")
    page.click("#error-close")

    # a name that is taken: 409
    with server.client() as client:
        client.post("/voices", data={"name": "taken", "prompt_text": "你好。"},
                    files={"audio": ("p.wav", prompt_wav(1.5), "audio/wav")})
    page.set_input_files("#voice-file", files=[{"name": "p.wav", "mimeType": "audio/wav",
                                                "buffer": prompt_wav(1.5)}])
    page.fill("#voice-name", "taken")
    page.click("#voice-save")
    page.wait_for_selector("#error:not([hidden])")
    assert "(409)" in page.inner_text("#error-title")
    page.click("#error-close")

    # the chosen voice was deleted elsewhere meanwhile: 404
    page.reload()
    page.wait_for_selector("body[data-ready='ready']")
    page.select_option("#voice", "taken")
    with server.client() as client:
        assert client.delete("/voices/taken").status_code == 200
    page.fill("#text", TEXT)
    page.click("#speak")
    page.wait_for_selector("#error:not([hidden])")
    assert "(404)" in page.inner_text("#error-title")
    assert "unknown voice 'taken'" in page.inner_text("#error-message")


def test_instruction_field_with_an_instruct_model(browser, v1_variants, tmp_path):
    engine = tiny_engine(v1_variants["instruct"])
    with ServerThread(create_app(engine, Settings(voices_dir=tmp_path))) as server:
        context = browser.new_context()
        page = context.new_page()
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='ready']", timeout=30000)
        assert page.is_visible("#instruct-field")
        assert "preset" in page.inner_text("#instruct-hint")
        set_streaming(page, False)
        page.fill("#instruct", "用开心的语气说")
        speak(page)
        assert "用开心的语气说" in page.inner_text(".result .meta")
        context.close()
