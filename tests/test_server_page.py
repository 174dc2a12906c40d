"""The web page in a real headless Chromium (Debian's chromium package, driven by Playwright; no
browser is ever downloaded): it loads, speaks (whole files and streamed playback), downloads,
creates voices from a file and from the microphone, and shows the API's errors."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest
from starlette.responses import PlainTextResponse
from test_server_support import EngineProbe, ServerThread, decode, prompt_wav, tiny_engine

from cosyvoice_lite.serving import Settings, create_app

CHROMIUM = os.environ.get("COSYVOICE_LITE_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = os.environ.get("COSYVOICE_LITE_SCREENSHOT", "/tmp/cosyvoice-lite-page.png")

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed"
)
if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium)",
        allow_module_level=True,
    )

TEXT = "你好。"


@pytest.fixture(scope="module")
def engine(v1_dir):
    return tiny_engine(v1_dir)


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    settings = Settings(max_text_chars=80, voices_dir=tmp_path_factory.mktemp("page-voices"))
    # A short pause before each chunk makes "audio arrives while synthesis goes on" observable
    # however fast the tiny model is (and however slowly a busy machine runs the browser).
    with ServerThread(create_app(EngineProbe(engine, split=2, delay=0.25), settings)) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--autoplay-policy=no-user-gesture-required",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
            ],
        )
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


def wait_js(page, expression: str, timeout: float = 30.0):
    """Poll a JavaScript expression until it is truthy. (page.wait_for_function compiles its
    predicate with eval inside the page, which the page's Content-Security-Policy forbids.)"""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.05)


# the control that has the keyboard focus: its id, else its name ("" for <body>)
FOCUSED = "document.activeElement.id || document.activeElement.getAttribute('aria-label') || ''"


def set_streaming(page, on: bool) -> None:
    if page.is_checked("#stream") != on:
        page.click("label.toggle")
    assert page.is_checked("#stream") == on


def speak(page, text: str = TEXT) -> None:
    count = page.locator(".result").count()
    page.fill("#text", text)
    page.click("#speak")
    wait_js(page, f"document.querySelectorAll('.result').length > {count}", timeout=60)
    assert page.is_hidden("#error"), page.inner_text("#error")


def audio_duration(page, selector: str = ".result audio") -> float:
    return page.eval_on_selector(
        selector,
        """a => new Promise(resolve => {
        if (a.readyState >= 1) resolve(a.duration);
        else a.addEventListener('loadedmetadata', () => resolve(a.duration));
    })""",
    )


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
    wait_js(page, "document.querySelector('.result audio').currentTime > 0", timeout=10)
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
    assert (
        pushes[-1]["at"] - pushes[0]["at"] > 50
    )  # ms: the first piece played before the last came
    assert pushes[-1]["scheduled"] == len(pushes) and sum(p["bytes"] for p in pushes) > 0
    assert pushes[0]["state"] == "running"
    assert "first audio" in page.inner_text(".result .meta")
    assert audio_duration(page) > 0  # the assembled result can be replayed


def test_create_voice_from_file_and_use_it(page, server):
    page.set_input_files(
        "#voice-file",
        files=[{"name": "me.wav", "mimeType": "audio/wav", "buffer": prompt_wav(2.0)}],
    )
    assert "me.wav" in page.inner_text("#voice-source")
    page.fill("#voice-name", "page-voice")
    page.fill("#voice-text", "希望你以后能够做的比我还好呦。")
    page.click("#voice-save")
    page.wait_for_selector("#voice-list li[data-voice='page-voice']")
    assert page.input_value("#voice") == "page-voice"
    # Save was disabled meanwhile (the focus fell to <body>): the new voice's Use has it now
    wait_js(page, f"({FOCUSED}) === 'Use the voice page-voice'", 5)
    set_streaming(page, False)
    speak(page)
    assert "page-voice" in page.inner_text(".result .meta")
    set_streaming(page, True)
    speak(page, "Hello! This is cosyvoice-lite speaking.")
    page.fill("#text", "欢迎使用 cosyvoice-lite：在你自己的电脑上把文字变成语音。")
    wait_js(page, "[...document.querySelectorAll('.result audio')].every(a => a.duration > 0)")
    page.screenshot(path=SCREENSHOT, full_page=True)


def test_record_a_voice_with_the_microphone(page):
    page.click("#record")
    wait_js(page, "parseFloat(document.getElementById('record-time').textContent) >= 1.2", 10)
    page.click("#record")
    assert "recording" in page.inner_text("#voice-source")
    # kept at 24 kHz whatever the device's rate (44.1 or 48 kHz here: a WAV 2x the size, which a
    # smaller --max-upload-mb than 2 s a MB refused as too large)
    header = "voiceCapture.blob.arrayBuffer().then(b => new DataView(b).getUint32(24, true))"
    assert page.evaluate(header) == 24000
    # resampled, not decimated: a tone is kept, one over 12 kHz is filtered out (not folded down)
    tone = """(f) => { const x = Float32Array.from({length: 48000}, (_, i) => Math.sin(2 * Math.PI * f * i / 48000));
      const y = resample(x, 48000, 24000); let error = 0, power = 0;
      for (let i = 1000; i < 23000; i++) {
        error = Math.max(error, Math.abs(y[i] - Math.sin(2 * Math.PI * f * i / 24000))); power += y[i] * y[i]; }
      return [y.length, error, Math.sqrt(power / 22000)]; }"""
    kept, lost = page.evaluate(f"[1000, 15000].map({tone})")
    assert kept[0] == 24000 and kept[1] < 1e-3 and lost[2] < 1e-3, (kept, lost)
    page.fill("#voice-name", "mic-voice")
    page.click("#voice-save")
    page.wait_for_selector("#voice-list li[data-voice='mic-voice']", timeout=30000)


def test_errors_are_shown(page, server):
    # an upload that is not audio: 415
    page.set_input_files(
        "#voice-file",
        files=[{"name": "notes.wav", "mimeType": "audio/wav", "buffer": b"not audio at all"}],
    )
    page.fill("#voice-name", "broken")
    page.click("#voice-save")
    page.wait_for_selector("#error:not([hidden])")
    assert "(415)" in page.inner_text("#error-title")
    assert "could not be decoded" in page.inner_text("#error-message")
    assert page.evaluate(FOCUSED) == "voice-save"  # not <body>: Save, enabled again
    page.click("#error-close")
    assert page.evaluate(FOCUSED) == "voice-save"  # × gives the focus back where it came from

    # a name that is taken: 409
    with server.client() as client:
        client.post(
            "/voices",
            data={"name": "taken", "prompt_text": "你好。"},
            files={"audio": ("p.wav", prompt_wav(1.5), "audio/wav")},
        )
    page.set_input_files(
        "#voice-file", files=[{"name": "p.wav", "mimeType": "audio/wav", "buffer": prompt_wav(1.5)}]
    )
    page.fill("#voice-name", "taken")
    page.click("#voice-save")
    page.wait_for_selector("#error:not([hidden])")
    assert "(409)" in page.inner_text("#error-title")
    # saved by another client since the list was read: listed now (there is something to delete)
    page.wait_for_selector("#voice-list li[data-voice='taken']", timeout=5000)
    assert page.input_value("#voice-name") == "taken"  # the form as it was
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
    # the lists are read again: the voice is offered no more (each Speak failed until a reload)
    offered = "[...document.getElementById('voice').options].map(o => o.value)"
    wait_js(page, f"!{offered}.includes('taken') && document.getElementById('voice').value", 5)
    assert not page.query_selector("#voice-list li[data-voice='taken']")
    assert page.is_visible("#error") and "(404)" in page.inner_text("#error-title")
    assert page.is_enabled("#speak")


@contextlib.contextmanager
def page_for(browser, engine, voices_dir: Path, settings: dict | Settings | None = None, **context):
    """The page of a server of its own for ``engine`` (``settings``: more of its Settings, or
    its Settings themselves), loaded and ready: (page, page errors)."""
    if not isinstance(settings, Settings):
        settings = Settings(voices_dir=voices_dir, **(settings or {}))
    with ServerThread(create_app(engine, settings)) as server:
        browser_context = browser.new_context(**context)
        browser_context.grant_permissions(["microphone"], origin=server.url)
        page = browser_context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='ready']", timeout=30000)
        try:
            yield page, errors
        finally:
            browser_context.close()


def test_instruction_field_with_an_instruct_model(browser, v1_variants, tmp_path):
    engine = tiny_engine(v1_variants["instruct"])
    with page_for(browser, engine, tmp_path) as (page, _):
        assert page.is_visible("#instruct-field")
        assert "preset" in page.inner_text("#instruct-hint")
        set_streaming(page, False)
        page.fill("#instruct", "用开心的语气说")
        speak(page)
        assert "用开心的语气说" in page.inner_text(".result .meta")
        # CosyVoice-300M-Instruct takes instructions with its presets only: a saved voice is
        # offered no instruction (the server refused every such request with a 400)
        save_voice(page, "mine")
        page.select_option("#voice", "mine")
        assert page.is_hidden("#instruct-field")
        speak(page)
        assert "用开心的语气说" not in page.inner_text(".result .meta")
        page.select_option("#voice", engine.voices()[0])
        assert page.is_visible("#instruct-field")


def save_voice(page, name: str) -> None:
    choose_file(page, "#voice-file", 2.0, f"{name}.wav")
    page.fill("#voice-name", name)
    page.click("#voice-save")
    page.wait_for_selector(f"#voice-list li[data-voice='{name}']", timeout=30000)


# ---------------------------------------------------------------------------------- issue 10


def mode_buttons(page) -> list[str]:
    return page.eval_on_selector_all(
        ".mode-btn", "bs => bs.filter(b => !b.hidden).map(b => b.dataset.mode)"
    )


def choose_file(page, selector: str, seconds: float = 2.0, name: str = "me.wav") -> None:
    page.set_input_files(
        selector, files=[{"name": name, "mimeType": "audio/wav", "buffer": prompt_wav(seconds)}]
    )


def test_no_mode_is_offered_before_the_model_is_known(browser, engine, tmp_path):
    """While the model loads, the page does not know its modes: it offered all five (an
    Instruction tab on CosyVoice-300M-SFT) until it was ready."""

    def slow_load():
        time.sleep(3)
        return engine

    with ServerThread(create_app(slow_load, Settings(voices_dir=tmp_path))) as server:
        context = browser.new_context()
        page = context.new_page()
        page.goto(server.url)
        page.wait_for_selector("#status")
        wait_js(page, "document.getElementById('status').textContent === 'loading'")
        assert mode_buttons(page) == []
        page.wait_for_selector("body[data-ready='ready']", timeout=30000)
        assert mode_buttons(page) == ["voice", "clone", "cross", "vc"]
        context.close()


def test_modes_shown_follow_the_model(page):
    assert mode_buttons(page) == ["voice", "clone", "cross", "vc"]  # -SFT: no instructions
    assert page.get_attribute(".mode-btn.active", "data-mode") == "voice"
    assert "0.5–30 s" in page.inner_text("#voice-hint")  # the server's own limits
    page.click(".mode-btn[data-mode='clone']")
    assert page.is_visible("#prompt-panel") and page.is_visible("#prompt-text-field")
    assert page.is_hidden("#voice-field")
    assert "0.5–30 s" in page.inner_text("#prompt-hint")
    page.click(".mode-btn[data-mode='cross']")
    assert page.is_visible("#prompt-panel") and page.is_hidden("#prompt-text-field")
    page.click(".mode-btn[data-mode='vc']")
    assert page.is_hidden("#text-box") and page.is_visible("#source-panel")
    page.reload()  # the chosen mode is remembered
    page.wait_for_selector("body[data-ready='ready']")
    assert page.get_attribute(".mode-btn.active", "data-mode") == "vc"


def test_one_off_clone_from_a_file_with_waveform(page):
    page.click(".mode-btn[data-mode='clone']")
    choose_file(page, "#prompt-file")
    set_streaming(page, False)
    page.fill("#text", TEXT)
    page.click("#speak")  # no transcript yet: told what is missing, nothing sent
    page.wait_for_selector("#error:not([hidden])")
    assert "transcript" in page.inner_text("#error-message")
    page.click("#error-close")
    page.fill("#prompt-text", "希望你以后能够做的比我还好呦。")
    speak(page)
    assert "cloned" in page.inner_text(".result .meta") and "me.wav" in page.inner_text(
        ".result .meta"
    )
    assert audio_duration(page) > 0
    drawn = wait_js(page, "document.querySelector('.result canvas.wave').dataset.drawn")
    assert drawn != "error" and float(drawn) > 0
    # the waveform has ink on it
    assert (
        page.evaluate("""() => { const c = document.querySelector('.result canvas.wave');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""")
        > 100
    )


def test_cross_lingual_from_the_microphone(page):
    page.click(".mode-btn[data-mode='cross']")
    page.click("#prompt-record")
    wait_js(
        page, "parseFloat(document.getElementById('prompt-record-time').textContent) >= 1.2", 10
    )
    page.click("#prompt-record")
    assert "recording" in page.inner_text("#prompt-source")
    set_streaming(page, True)
    speak(page, "Hello there.")
    assert "cross-lingual" in page.inner_text(".result .meta")


def test_voice_conversion_on_the_page(page):
    page.click(".mode-btn[data-mode='vc']")
    assert page.is_disabled("#speak") is False
    page.click("#speak")  # nothing chosen: a clear message
    page.wait_for_selector("#error:not([hidden])")
    assert "speech to convert" in page.inner_text("#error-message")
    page.click("#error-close")
    choose_file(page, "#source-file", 1.5, "speech.wav")
    choose_file(page, "#prompt-file", 2.0, "target.wav")
    set_streaming(page, False)
    count = page.locator(".result").count()
    page.click("#speak")
    wait_js(page, f"document.querySelectorAll('.result').length > {count}", timeout=60)
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert "voice conversion of speech.wav" in page.inner_text(".result .said")
    assert audio_duration(page) > 0


def test_a_recording_can_be_removed_and_a_voice_picked_later_wins(page):
    """Instruction and voice conversion take a recording or a saved voice: the one chosen last
    is used (a recording once won over any later pick, and could not be removed)."""
    page.click(".mode-btn[data-mode='vc']")
    choose_file(page, "#prompt-file", 2.0, "target.wav")
    assert page.is_visible("#prompt-clear")
    page.click("#prompt-clear")
    assert page.is_hidden("#prompt-clear") and page.is_hidden("#prompt-preview")
    assert page.evaluate(FOCUSED) == "prompt-record"  # not <body>: the panel's Record
    assert "No recording" in page.inner_text("#prompt-source")
    choose_file(page, "#prompt-file", 2.0, "target.wav")
    voice = page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")[-1]
    page.select_option("#voice", voice)
    assert "No recording" in page.inner_text("#prompt-source")
    choose_file(page, "#prompt-file", 2.0, "again.wav")  # and a recording after a voice
    assert page.input_value("#voice") == ""


def test_speed_has_a_name_and_a_phone_screen_has_no_sideways_scroll(page, server):
    assert page.get_by_label("Speed").get_attribute("type") == "range"
    page.set_viewport_size({"width": 375, "height": 740})
    wait_js(page, "document.documentElement.scrollWidth <= 375", timeout=10)
    # a saved voice with a long name: the picker sized itself to it and widened the page
    name = "grandma-reading-bedtime-stories-2024-v2-" + "x" * 24
    with server.client() as client:
        created = client.post(
            "/voices",
            data={"name": name, "prompt_text": "你好。"},
            files={"audio": ("p.wav", prompt_wav(1.5), "audio/wav")},
        )
        assert created.status_code == 201, created.text
    try:
        page.set_viewport_size({"width": 360, "height": 740})
        page.reload()
        page.wait_for_selector("body[data-ready='ready']")
        wait_js(
            page, f"[...document.getElementById('voice').options].some(o => o.value === '{name}')"
        )
        page.select_option("#voice", name)
        set_streaming(page, False)
        speak(page)
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        meta = page.eval_on_selector(".result .meta", "m => m.scrollWidth <= m.clientWidth")
        assert meta  # the name wraps in the result's line instead of running under Download
    finally:
        with server.client() as client:
            client.delete(f"/voices/{name}")


def test_the_microphone_opens_once_and_closes_with_its_tab(page):
    """A double click on Record opened two recordings, the first never closed (its timer then
    cut every later recording short); a recording went on behind a tab left meanwhile."""
    page.evaluate("""() => { window.streams = []; window.contexts = [];
      const open = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
      navigator.mediaDevices.getUserMedia = async (c) => {
        const s = await open(c); window.streams.push(s); return s; };
      const Context = window.AudioContext;
      window.AudioContext = class extends Context {
        constructor(...a) { super(...a); window.contexts.push(this); } }; }""")
    live = "streams.flatMap(s => s.getTracks()).filter(t => t.readyState === 'live').length"
    page.dblclick("#record")
    wait_js(page, "parseFloat(document.getElementById('record-time').textContent) >= 1.0", 10)
    page.click("#record")
    assert "recording" in page.inner_text("#voice-source")
    assert page.evaluate("streams.length") == 1 and page.evaluate(live) == 0
    wait_js(page, "contexts.every(c => c.state === 'closed')", 5)
    page.click(".mode-btn[data-mode='clone']")
    page.click("#prompt-record")
    wait_js(page, "document.getElementById('prompt-record').textContent.includes('Stop')", 10)
    page.click(".mode-btn[data-mode='voice']")
    assert page.evaluate(live) == 0  # ended (and kept) with its tab
    page.click(".mode-btn[data-mode='clone']")
    assert "recording" in page.inner_text("#prompt-source")


def test_a_recording_stopped_at_the_limit_is_taken(browser, engine, tmp_path):
    """The clock stops a recording at the server's longest prompt; its samples ran past it and
    the server refused every such recording as too long. Under a smaller upload limit (the
    recording at the device's rate, 44.1 or 48 kHz: ~90 KB a second) a recording the page
    allowed was refused as too large (413): it stops at that limit too."""
    settings = Settings(voices_dir=tmp_path, max_prompt_seconds=2.0)
    with page_for(browser, engine, tmp_path, settings) as (page, errors):
        for name, why in [
            ("at-the-limit", "the 2 s limit"),
            ("at-the-size", "the 60 KB upload limit"),
        ]:
            page.click("#record")
            wait_js(page, "document.getElementById('record').textContent.includes('Stop')", 10)
            wait_js(page, "document.getElementById('record').textContent.includes('Record')", 10)
            assert f"stopped at {why}" in page.inner_text("#voice-source")
            page.fill("#voice-name", name)
            page.click("#voice-save")
            page.wait_for_selector(f"#voice-list li[data-voice='{name}']", timeout=30000)
            assert page.is_hidden("#error") and not errors, errors
            # 60 KB: 1.28 s at 24 kHz (2 s of the device's rate was 172 KB or more)
            settings.max_upload_bytes = 60 * 1024
            page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")  # read again
            wait_js(page, "document.getElementById('limits').textContent.includes('60 KB')", 10)


def test_one_thing_plays_at_a_time_and_its_audio_is_let_go(page):
    """A result that played on went on under the next one and under Stop; and no object URL
    was ever revoked, so every result's audio stayed in memory after Clear all."""
    page.evaluate("""() => { window.made = 0; window.revoked = 0;
      const make = URL.createObjectURL, revoke = URL.revokeObjectURL;
      URL.createObjectURL = (x) => { window.made++; return make(x); };
      URL.revokeObjectURL = (u) => { window.revoked++; return revoke(u); }; }""")
    playing = "[...document.querySelectorAll('.result audio')].filter(a => !a.paused).length"
    set_streaming(page, False)
    speak(page, "今天天气很好，我们一起去公园散步吧。")
    wait_js(page, playing)  # it plays by itself, and can be stopped
    assert page.is_visible("#stop")
    speak(page, "谢谢你。")
    # the new result plays (the newest is first), the older one no longer
    wait_js(page, f"{playing} === 1 && !document.querySelector('.result audio').paused")
    page.click("#stop")
    assert page.evaluate(playing) == 0 and page.is_hidden("#stop")
    choose_file(page, "#voice-file", 2.0, "a.wav")
    choose_file(page, "#voice-file", 2.0, "b.wav")  # the first preview's URL goes
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#results-clear")
    wait_js(page, "document.querySelectorAll('.result').length === 0")
    assert page.evaluate("revoked") >= 3 and page.evaluate("made") >= 4


def test_the_voice_chosen_last_wins_across_tabs_and_a_stale_voice_leaves(page, server):
    """A recording chosen in one tab and a saved voice picked later in another: voice conversion
    showed both and used the older recording. A voice deleted elsewhere stayed listed after its
    Delete failed with 404."""
    with server.client() as client:
        for name in ("mine", "gone"):
            client.post(
                "/voices",
                data={"name": name, "prompt_text": "你好。"},
                files={"audio": ("p.wav", prompt_wav(1.5), "audio/wav")},
            )
    try:
        page.reload()
        page.wait_for_selector("body[data-ready='ready']")
        page.click(".mode-btn[data-mode='clone']")
        choose_file(page, "#prompt-file", 2.0, "old-recording.wav")
        page.click(".mode-btn[data-mode='voice']")
        page.select_option("#voice", "mine")
        page.click(".mode-btn[data-mode='vc']")
        assert page.input_value("#voice") == "mine"
        assert "No recording" in page.inner_text("#prompt-source")
        with server.client() as client:
            assert client.delete("/voices/gone").status_code == 200
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#voice-list li[data-voice='gone'] button:has-text('Delete')")
        page.wait_for_selector("#error:not([hidden])")
        assert "(404)" in page.inner_text("#error-title")
        wait_js(page, "!document.querySelector(\"#voice-list li[data-voice='gone']\")")
    finally:
        with server.client() as client:
            client.delete("/voices/mine")


def test_markup_help_inserts_tags(page):
    page.click("#markup-help summary")
    buttons = page.eval_on_selector_all(
        "#markup-body .insert", "bs => bs.map(b => b.dataset.insert)"
    )
    assert "[breath]" in buttons and "[laughter]" in buttons and "<strong>…</strong>" in buttons
    assert "<|en|>" in buttons  # v1 language tags
    assert "[M][AY0]" not in buttons  # phones are CosyVoice3's
    page.fill("#text", "你好")
    page.click("#markup-body .insert[data-insert='[breath]']")
    assert page.input_value("#text") == "你好[breath]"
    page.evaluate("() => { const t = document.getElementById('text'); t.setSelectionRange(0, 2); }")
    page.click("#markup-body .insert[data-insert='<strong>…</strong>']")
    assert page.input_value("#text") == "<strong>你好</strong>[breath]"
    speak(page, page.input_value("#text"))  # the server accepts what the buttons insert


def test_results_survive_a_reload_and_clear_all(page):
    set_streaming(page, False)
    speak(page)
    speak(page, "谢谢。")
    page.reload()
    page.wait_for_selector("body[data-ready='ready']")
    assert page.locator(".result").count() == 2
    assert page.inner_text(".result .said") == "谢谢。"  # newest first
    assert audio_duration(page) > 0  # the audio itself was kept (IndexedDB)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#results-clear")
    wait_js(page, "document.querySelectorAll('.result').length === 0")
    assert page.evaluate(FOCUSED) == "text"  # Clear all is hidden: not <body>, the text box
    page.reload()
    page.wait_for_selector("body[data-ready='ready']")
    assert page.locator(".result").count() == 0 and page.is_visible("#results-empty")


def test_cosyvoice3_instructions_presets_and_phones(browser, tmp_path):
    from cosyvoice_lite.engine import Engine

    engine = Engine.load(Path(__file__).resolve().parent / "data" / "models" / "v3-tiny")
    viewport = {"width": 1280, "height": 900}
    with page_for(browser, engine, tmp_path, viewport=viewport) as (page, errors):
        assert mode_buttons(page) == ["voice", "clone", "cross", "instruct", "vc"]
        assert page.get_attribute(".mode-btn.active", "data-mode") == "clone"  # no presets
        page.click("#markup-help summary")
        inserts = page.eval_on_selector_all(
            "#markup-body .insert", "bs => bs.map(b => b.dataset.insert)"
        )
        assert "[h][ào]" in inserts and "[M][AY0]" in inserts and "[breath]" in inserts
        assert "[a]" not in inserts  # pinyin finals are not sound tags
        page.click(".mode-btn[data-mode='instruct']")
        chips = page.eval_on_selector_all(
            "#instruct-presets .chip-btn", "bs => bs.map(b => b.dataset.instruction)"
        )
        assert "请用四川话表达。" in chips and "请用开心的语气说。" in chips
        page.click("#instruct-presets .chip-btn[data-instruction='请用四川话表达。']")
        assert page.input_value("#instruct") == "请用四川话表达。"
        page.fill(
            "#instruct", "请用四川话表达，慢一点。"
        )  # editable, and kept as the user's preset
        page.click("#instruct-presets button:has-text('+ save current')")
        assert (
            page.locator(
                "#instruct-presets .chip-btn[data-instruction='请用四川话表达，慢一点。']"
            ).count()
            == 1
        )
        choose_file(page, "#prompt-file")
        set_streaming(page, False)
        page.fill("#text", "今天天气真好。")
        page.click("#speak")
        wait_js(page, "document.querySelectorAll('.result').length > 0", timeout=60)
        assert page.is_hidden("#error"), page.inner_text("#error")
        assert "请用四川话表达，慢一点。" in page.inner_text(".result .meta")
        # a preset of one's own is removed from the keyboard too (a named button of its own)
        page.fill("#instruct", "请慢一点说。")
        page.click("#instruct-presets button:has-text('+ save current')")
        page.get_by_role("button", name="Remove the preset “请慢一点说。”").focus()
        page.keyboard.press("Enter")
        wait_js(page, "!document.querySelector(\"[data-instruction='请慢一点说。']\")", 5)
        wait_js(page, "document.querySelector('.result canvas.wave').dataset.drawn")
        page.click(".mode-btn[data-mode='clone']")
        page.screenshot(path=SCREENSHOT.replace(".png", "-v3.png"), full_page=True)
        assert not errors, errors


def test_api_docs_render_without_internet(browser, server):
    """Swagger UI comes from the server itself: with every other host blocked, /docs
    still renders the operations."""
    context = browser.new_context()
    outside: list[str] = []

    def only_local(route):
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)
    page = context.new_page()
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=30000)
    paths = page.eval_on_selector_all(".opblock-summary-path", "ps => ps.map(p => p.textContent)")
    assert "/v1/audio/speech" in "".join(paths) and "/tts/upload" in "".join(paths)
    assert not outside, outside
    page.goto(f"{server.url}/redoc")  # ReDoc renders too (only its decorative logo is remote)
    page.wait_for_selector(".api-content", timeout=30000)
    assert all("logo" in url for url in outside), outside
    context.close()


def test_cosyvoice2_cloned_voice_of_the_model_is_offered_as_a_cloned_voice(browser, tmp_path):
    """CosyVoice2's spk2info.pt holds a cloned voice (zero_shot_zh) beside its presets: the
    picker lists it in its own group, also where cloned voices go (instructions), and it speaks."""
    from cosyvoice_lite.engine import Engine

    engine = Engine.load(Path(__file__).resolve().parent / "data" / "models" / "v2-tiny")
    viewport = {"width": 1280, "height": 900}
    with page_for(browser, engine, tmp_path, viewport=viewport) as (page, errors):
        groups = "s => Object.fromEntries([...s.querySelectorAll('optgroup')].map(g => [g.label, [...g.children].map(o => o.value)]))"
        picker = page.eval_on_selector("#voice", groups)
        assert picker["Cloned voices of the model"] == ["zero_shot_zh"]
        assert "zero_shot_zh" not in picker["Preset voices"]
        page.click(".mode-btn[data-mode='instruct']")
        assert list(page.eval_on_selector("#voice", groups)) == ["Cloned voices of the model"]
        page.click(".mode-btn[data-mode='voice']")
        page.select_option("#voice", "zero_shot_zh")
        set_streaming(page, False)
        page.fill("#text", "你好。")
        page.click("#speak")
        wait_js(page, "document.querySelectorAll('.result').length > 0", timeout=60)
        assert page.is_hidden("#error"), page.inner_text("#error")
        assert not errors, errors


# ------------------------------------------------------------- prefix, key, storage, restart


class RoutePrefix:
    """Ray Serve's proxy in front of an app deployed with ``route_prefix=prefix``: a request
    under the prefix reaches the app with its whole path and the prefix as its ``root_path``
    (serve/_private/proxy.py); any other path is not the app's (404)."""

    def __init__(self, app, prefix: str) -> None:
        self.app, self.prefix = app, prefix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path != self.prefix and not path.startswith(self.prefix + "/"):
                await PlainTextResponse("not under the route prefix", 404)(scope, receive, send)
                return
            scope = {**scope, "root_path": scope.get("root_path", "") + self.prefix}
        await self.app(scope, receive, send)


def test_the_page_works_under_a_route_prefix(browser, engine, tmp_path):
    """Deployed under a route prefix (Ray Serve's route_prefix, the app's root_path), the page
    fetched /info, /speakers, /tts and its recorder from the host's root, outside the app, and
    the prefix without its slash was a 404. (/tts as the prefix: the API's /tts is /tts/tts.)"""
    app = RoutePrefix(create_app(engine, Settings(voices_dir=tmp_path)), "/tts")
    with ServerThread(app) as server:
        with server.client() as client:
            moved = client.get("/tts?lang=zh")
            assert moved.status_code == 307, moved.text
            assert moved.headers["location"] == "/tts/?lang=zh"  # root_path honoured, a path
            assert client.get("/tts/").status_code == 200
        context = browser.new_context()
        context.grant_permissions(["microphone"], origin=server.url)
        page = context.new_page()
        requested: list[str] = []
        refused: list[str] = []
        errors: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.on("response", lambda r: r.status >= 400 and refused.append(f"{r.status} {r.url}"))
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(f"{server.url}/tts")
            page.wait_for_selector("body[data-ready='ready']", timeout=30000)
            assert page.url == f"{server.url}/tts/"
            assert page.inner_text("#status") == "ready"
            options = page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")
            assert options == engine.voices()
            assert page.evaluate("getComputedStyle(document.body).fontFamily") != "Times New Roman"
            set_streaming(page, False)
            speak(page)
            assert audio_duration(page) > 0
            # a voice recorded with the microphone (the recorder's worklet), saved, played
            page.click("#record")
            wait_js(page, "parseFloat(document.getElementById('record-time').textContent) >= 1.2")
            page.click("#record")
            assert "recording" in page.inner_text("#voice-source")  # the worklet was found
            page.fill("#voice-name", "prefixed")
            page.click("#voice-save")
            page.wait_for_selector("#voice-list li[data-voice='prefixed']", timeout=30000)
            with page.expect_response(lambda r: r.url.endswith("/voices/prefixed/audio")) as got:
                page.click("#voice-list li[data-voice='prefixed'] button:has-text('▶')")
            assert got.value.ok
            links = page.eval_on_selector_all("a[href], link[href]", "ls => ls.map(l => l.href)")
            links = [link for link in links if not link.startswith("blob:")]  # results' audio
            assert links and all(link.startswith(f"{server.url}/tts/") for link in links), links
            assert page.is_hidden("#error"), page.inner_text("#error")
            http = [url for url in requested if url.startswith("http")]
            outside = [url for url in http if not url.startswith(f"{server.url}/tts/")]
            assert outside == [f"{server.url}/tts"], outside  # only the address typed
            assert not refused and not errors, (refused, errors)
        finally:
            context.close()


def test_the_api_docs_work_under_a_route_prefix(browser, engine, tmp_path):
    """/prefix/docs loaded /openapi.json and its scripts from the host's root, outside the app:
    a blank page. Both documentation pages render there with everything from under the prefix."""
    app = RoutePrefix(create_app(engine, Settings(voices_dir=tmp_path)), "/api")
    with ServerThread(app) as server:
        context = browser.new_context()
        page = context.new_page()
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        try:
            page.goto(f"{server.url}/api/docs")
            page.wait_for_selector(".swagger-ui .opblock", timeout=30000)
            paths = "".join(page.eval_on_selector_all(".opblock-summary-path", "ps => ps.map(p => p.textContent)"))  # fmt: skip
            assert "/v1/audio/speech" in paths
            page.goto(f"{server.url}/api/redoc")
            page.wait_for_selector(".api-content", timeout=30000)
            local = [url for url in requested if url.startswith(server.url)]
            assert local and all(url.startswith(f"{server.url}/api/") for url in local), local
        finally:
            context.close()


def test_a_server_with_an_api_key_asks_for_it_before_listing_voices(browser, engine, tmp_path):
    """The page's first /speakers got 401: an error to dismiss and "No voices yet" in the
    picker, when what is missing is the key."""
    with page_for(browser, engine, tmp_path, {"api_key": "page-key"}) as (page, errors):
        assert page.is_visible("#auth")
        assert page.is_hidden("#error")  # nothing failed: the key is asked for
        picker = page.inner_text("#voice")
        assert "API key" in picker and "No voices" not in picker, picker
        listed = page.inner_text("#voice-list")
        assert "API key" in listed and "No saved voices" not in listed, listed
        assert page.is_disabled("#speak")
        # a wrong key: refused, and asked for again
        page.fill("#api-key", "not-the-key")
        page.click("#api-key-save")
        page.wait_for_selector("#error:not([hidden])")
        assert "(401)" in page.inner_text("#error-title")
        assert page.is_visible("#auth") and "API key" in page.inner_text("#voice")
        assert page.evaluate(FOCUSED) == "api-key"  # asked again, where it is typed
        page.click("#error-close")
        page.fill("#api-key", "page-key")
        page.click("#api-key-save")
        wait_js(page, "document.getElementById('voice').value !== ''")
        assert page.evaluate(FOCUSED) == "text"  # the key form is gone: not <body>
        options = page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")
        assert options == engine.voices()
        assert "No saved voices" in page.inner_text("#voice-list")
        assert page.is_hidden("#auth") and page.is_hidden("#error")
        set_streaming(page, False)
        speak(page)
        # the key is remembered: after a reload the voices are listed at once
        page.reload()
        page.wait_for_selector("body[data-ready='ready']")
        wait_js(page, "document.getElementById('voice').value !== ''")
        assert page.is_hidden("#auth") and page.is_hidden("#error")
        assert not errors, errors


def speak_as_newest(page, text: str) -> None:
    """Speak ``text`` and wait until it is the newest result (the count may not grow: the
    oldest can go as it arrives)."""
    page.fill("#text", text)
    page.click("#speak")
    wait_js(page, f"document.querySelector('.result .said')?.textContent === {json.dumps(text)}")
    assert page.is_hidden("#error"), page.inner_text("#error")


def test_kept_results_are_capped_oldest_first(page):
    """Every result went into IndexedDB for good: the store grew without bound."""
    assert page.evaluate("KEEP.results") == 30
    assert page.evaluate("KEEP.bytes") == 200 * 1024 * 1024
    page.evaluate("""() => { window.revoked = 0; const revoke = URL.revokeObjectURL;
      URL.revokeObjectURL = (u) => { window.revoked++; return revoke(u); }; }""")
    page.evaluate("KEEP.results = 2")
    set_streaming(page, False)
    page.select_option("#format", "wav")
    for text in ("一。", "二。", "三。"):
        speak_as_newest(page, text)
    said = "[...document.querySelectorAll('.result .said')].map(s => s.textContent)"
    stored = "store.all().then(items => items.map(i => i.text).sort().join())"
    wait_js(page, f"{said}.length === 2")
    assert page.evaluate(said) == ["三。", "二。"]
    wait_js(page, f"{stored}.then(s => s === {json.dumps(','.join(sorted(['二。', '三。'])))})")
    assert page.evaluate("revoked") >= 1  # the audio of the one let go
    # the byte budget: the oldest go until the rest fit; the newest stays even alone
    page.evaluate("KEEP.results = 30; KEEP.bytes = 1")
    speak_as_newest(page, "四。")
    wait_js(page, f"{said}.length === 1")
    wait_js(page, f"{stored}.then(s => s === '四。')")
    page.reload()
    page.wait_for_selector("body[data-ready='ready']")
    assert page.evaluate(said) == ["四。"]


def test_a_store_grown_past_the_cap_is_cut_on_load(page):
    """Results kept before the cap (or by another tab) are cut to it when the page loads."""
    page.evaluate("""async () => {
      for (let i = 0; i < 35; i++) {
        await store.put({ id: `old-${i}`, created: 1000 + i, text: `old ${i}`, meta: "",
                          format: "wav", blob: wavBlob(new Float32Array(2400), 24000) });
      } }""")
    page.reload()
    page.wait_for_selector("body[data-ready='ready']")
    said = page.eval_on_selector_all(".result .said", "ss => ss.map(s => s.textContent)")
    assert said == [f"old {i}" for i in range(34, 4, -1)]  # the newest 30, newest first
    wait_js(page, "store.all().then(items => items.length === 30)")


def test_the_page_follows_a_server_restarted_with_another_model(
    browser, engine, v1_variants, tmp_path
):
    """A server restarted with another model while the page was in the background: the page
    kept the old model's modes and voices until reloaded by hand."""
    instruct = tiny_engine(v1_variants["instruct"])
    first = ServerThread(create_app(engine, Settings(voices_dir=tmp_path)))
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        with first:
            page.goto(first.url)
            page.wait_for_selector("body[data-ready='ready']", timeout=30000)
            assert mode_buttons(page) == ["voice", "clone", "cross", "vc"]
            assert instruct.model.name not in page.inner_text("#model-name")
        again = ServerThread(create_app(instruct, Settings(voices_dir=tmp_path)), first.port)
        with again:
            page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")  # shown again
            wait_js(
                page,
                f"document.getElementById('model-name').textContent.includes({json.dumps(instruct.model.name)})",
            )
            wait_js(page, "!document.querySelector(\".mode-btn[data-mode='instruct']\").hidden")
            page.select_option("#voice", instruct.voices()[0])
            assert page.is_visible("#instruct-field")  # the new model's instructions
            assert page.is_hidden("#error")
        assert not errors, errors
    finally:
        context.close()


def test_a_request_that_finds_the_server_gone_looks_again(browser, engine, v1_variants, tmp_path):
    """Speak while the server is down: the page says so, and once the server is back (here with
    another model) it rebuilds itself without a reload."""
    instruct = tiny_engine(v1_variants["instruct"])
    first = ServerThread(create_app(engine, Settings(voices_dir=tmp_path)))
    context = browser.new_context()
    page = context.new_page()
    try:
        with first:
            page.goto(first.url)
            page.wait_for_selector("body[data-ready='ready']", timeout=30000)
        set_streaming(page, False)
        page.fill("#text", TEXT)
        page.click("#speak")
        page.wait_for_selector("#error:not([hidden])")
        assert "Connection problem" in page.inner_text("#error-title")
        assert "cannot be reached" in page.inner_text("#error-message")
        with ServerThread(create_app(instruct, Settings(voices_dir=tmp_path)), first.port):
            wait_js(
                page,
                f"document.getElementById('model-name').textContent.includes({json.dumps(instruct.model.name)})",
            )
            wait_js(page, "!document.querySelector(\".mode-btn[data-mode='instruct']\").hidden")
            wait_js(page, "document.getElementById('error').hidden")  # the outage is over
            assert page.inner_text("#status") == "ready"
            speak(page)
    finally:
        context.close()


def test_a_server_restarted_with_the_same_model_is_followed_too(browser, engine, tmp_path):
    """Restarted with the same model while the page was in the background, the server may have
    other saved voices, another key or none: the page kept the old lists (a saved voice that
    was gone, 404), stayed locked with no key form, or stayed unlocked against a new key. And
    the key form did not take the focus from the text being typed."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = ServerThread(create_app(engine, Settings(voices_dir=tmp_path / "a", api_key="k1")))
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    shown = "document.dispatchEvent(new Event('visibilitychange'))"
    listed = "[...document.querySelectorAll('#voice option')].map(o => o.value).join(',')"
    try:
        with first:
            page.goto(first.url)
            wait_js(page, "!document.getElementById('auth').hidden")
            with first.client() as client:
                saved = client.post(
                    "/voices",
                    headers={"Authorization": "Bearer k1"},
                    data={"name": "old-voice", "prompt_text": "希望你以后能够做的比我还好呦。"},
                    files={"audio": ("p.wav", prompt_wav(2.0), "audio/wav")},
                )
                assert saved.status_code == 201, saved.text
        # restarted without a key: the page leaves its locked state and lists the voices
        with ServerThread(create_app(engine, Settings(voices_dir=tmp_path / "b")), first.port):
            page.evaluate(shown)
            wait_js(page, f"{listed} === {json.dumps(','.join(engine.voices()))}")
            assert page.is_hidden("#auth") and "old-voice" not in page.inner_text("#voice-list")
        # restarted with a key again: locked at once, asking for it, the text being typed kept
        with ServerThread(
            create_app(engine, Settings(voices_dir=tmp_path / "a", api_key="k2")), first.port
        ):
            page.click("#text")
            page.keyboard.type("你好")
            page.evaluate(shown)
            wait_js(page, "!document.getElementById('auth').hidden")
            assert page.is_disabled("#speak") and "API key" in page.inner_text("#voice")
            page.keyboard.type("。")
            assert page.input_value("#text").endswith("你好。")
            assert page.input_value("#api-key") == ""
            page.fill("#api-key", "k2")
            page.click("#api-key-save")
            wait_js(page, "document.querySelector(\"#voice-list li[data-voice='old-voice']\")")
        assert not errors, errors
    finally:
        context.close()


def test_the_page_file_itself_redirects_to_the_page(engine, tmp_path):
    """/static/index.html served the page, whose relative URLs then pointed into
    /static/static/: a page stuck at "loading"."""
    app = RoutePrefix(create_app(engine, Settings(voices_dir=tmp_path)), "/tts")
    plain = ServerThread(create_app(engine, Settings(voices_dir=tmp_path)))
    with plain, plain.client() as client:
        moved = client.get("/static/index.html?x=1")
        assert moved.status_code == 307 and moved.headers["location"] == "/?x=1"
    with ServerThread(app) as prefixed, prefixed.client() as client:
        moved = client.get("/tts/static/index.html")
        assert moved.status_code == 307 and moved.headers["location"] == "/tts/"


# ------------------------------------------------------------------------- review: keys, storage


def test_keys_as_pasted_and_a_browser_that_keeps_no_site_data(browser, engine, tmp_path):
    """A key pasted with a zero-width space made fetch() throw: "server cannot be reached", the
    key stored, and after a reload a page stuck at "connecting…". A 401 and a new key changed
    the voice picked. Site data blocked (reading localStorage throws) killed app.js at its top;
    the microphone on plain http from another name said "Connection problem" and a JS error."""
    settings = Settings(voices_dir=tmp_path, api_key="k1")
    stored = "localStorage.getItem('cosyvoice-lite-key')"
    with ServerThread(create_app(engine, settings)) as server:
        context = browser.new_context()
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        wait_js(page, "!document.getElementById('auth').hidden")
        # a key no header can carry: said so, not stored, the server not called gone
        page.fill("#api-key", "钥匙")
        page.click("#api-key-save")
        page.wait_for_selector("#error:not([hidden])")
        assert "API key not usable" in page.inner_text("#error-title")
        assert "printable ASCII" in page.inner_text("#error-message")
        assert page.evaluate(stored) is None and page.inner_text("#status") == "ready"
        # (were one sent: a 401 asking for the key again, not "server gone"; /info needs none)
        refused = "state.apiKey = '钥匙'; api('speakers').then(() => null, (e) => e.code)"
        assert page.evaluate(refused) == "invalid_key"
        assert page.evaluate("api('info').then((r) => r.status)") == 200
        assert page.inner_text("#status") == "ready"
        page.evaluate("state.apiKey = ''")
        page.click("#error-close")
        # pasted with spaces and a zero-width space: used, and kept, without them
        page.fill("#api-key", " k1\u200b")
        page.click("#api-key-save")
        wait_js(page, "document.getElementById('voice').value !== ''")
        assert page.evaluate(stored) == "k1" and page.is_hidden("#error")
        picked = engine.voices()[1]
        page.select_option("#voice", picked)
        # the server's key changes: 401, the new key, and the voice picked is picked still
        settings.api_key = "k2"
        page.fill("#text", TEXT)
        page.click("#speak")
        page.wait_for_selector("#error:not([hidden])")
        assert "(401)" in page.inner_text("#error-title")
        page.fill("#api-key", "k2")
        page.click("#api-key-save")
        wait_js(page, "document.getElementById('voice').options.length > 1")
        assert page.input_value("#voice") == picked
        # stored values that cannot be used: a key (dropped at start) and presets not JSON
        page.evaluate("localStorage.setItem('cosyvoice-lite-key', '钥匙\\u200b')")
        for value in ("{not json", '{"a": 1}'):
            page.evaluate(
                f"localStorage.setItem('cosyvoice-lite-instructions', {json.dumps(value)})"
            )
            assert page.evaluate("customInstructions()") == []
        page.reload()
        page.wait_for_selector("body[data-ready='ready']", timeout=30000)
        wait_js(page, "!document.getElementById('auth').hidden")
        assert page.evaluate(stored) is None and page.is_hidden("#error")
        assert not errors, errors
        context.close()
    # site data blocked, and plain http from another machine's name (no microphone offered)
    with ServerThread(create_app(engine, Settings(voices_dir=tmp_path))) as server:
        context = browser.new_context()
        context.add_init_script(
            """Object.defineProperty(window, "localStorage", { get() {
                 throw new DOMException("Access is denied for this document.", "SecurityError"); } });
               Object.defineProperty(window, "isSecureContext", { value: false });"""
        )
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='ready']", timeout=30000)
        assert page.evaluate(
            "(() => { try { localStorage; } catch (e) { return e.name; } })()"
        ) == ("SecurityError")
        page.click(".mode-btn[data-mode='clone']")
        assert page.evaluate("storage.get('cosyvoice-lite-mode')") == "clone"  # for this visit
        page.click("#prompt-record")
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error-title") == "Microphone unavailable:"
        assert "https" in page.inner_text("#error-message")
        assert not errors, errors
        context.close()


# --------------------------------------------------------------------- review: keyboard, stream cut


def test_keyboard_focus_voice_names_mode_tabs_and_a_stream_cut_by_a_server_gone(page, server):
    """Focus fell to <body> after Speak (the button is disabled meanwhile) and after Delete;
    a saved voice's buttons named no voice ("▶"); the mode tabs took no arrow keys. A server
    gone mid-stream was blamed on its time limit, the status still "ready"."""
    with server.client() as client:
        for name in ("kb-a", "kb-b"):
            client.post(
                "/voices",
                data={"name": name, "prompt_text": "你好。"},
                files={"audio": ("p.wav", prompt_wav(1.5), "audio/wav")},
            )
    page.reload()
    page.wait_for_selector("body[data-ready='ready']")
    focused = FOCUSED
    assert page.get_by_label("Text to speak").get_attribute("id") == "text"  # not a placeholder
    labels = page.eval_on_selector_all(
        "#voice-list li[data-voice='kb-a'] button",
        "bs => bs.map(b => b.getAttribute('aria-label'))",
    )
    assert labels == ["Play the recording of kb-a", "Use the voice kb-a", "Delete the voice kb-a"]
    # the mode tabs: one Tab stop, arrows (round), Home and End
    page.focus("#mode-voice")
    for key, mode in [("ArrowRight", "clone"), ("End", "vc"), ("ArrowRight", "voice"),
                      ("ArrowLeft", "vc"), ("Home", "voice")]:  # fmt: skip
        page.keyboard.press(key)
        assert page.evaluate("document.activeElement.dataset.mode") == mode, key
        assert page.get_attribute(".mode-btn.active", "data-mode") == mode
    stops = page.eval_on_selector_all(".mode-btn:not([hidden])", "bs => bs.map(b => b.tabIndex)")
    assert stops == [0, -1, -1, -1]
    assert page.get_attribute("#mode-voice", "aria-controls") == "mode-panel"
    assert page.get_attribute("#mode-panel", "aria-labelledby") == "mode-voice"
    # Speak from the keyboard: Stop takes the focus while busy, Speak has it back after
    set_streaming(page, False)
    count = page.locator(".result").count()
    page.fill("#text", TEXT)
    page.focus("#speak")
    page.keyboard.press("Enter")
    assert page.evaluate(focused) == "stop"
    wait_js(page, f"document.querySelectorAll('.result').length > {count}", timeout=60)
    page.keyboard.press("Enter")  # Stop (the result playing), or Speak again
    wait_js(page, f"{focused} === 'speak' && document.getElementById('stop').hidden", timeout=60)
    # Delete from the keyboard: the focus goes to the row now in its place
    page.once("dialog", lambda dialog: dialog.accept())
    page.focus("#voice-list li[data-voice='kb-a'] .danger")
    page.keyboard.press("Enter")
    wait_js(page, "!document.querySelector(\"#voice-list li[data-voice='kb-a']\")")
    assert page.evaluate(focused).startswith("Delete the voice ")
    # the server gone mid-stream (the stream errors, nothing answers): said so, status too
    page.evaluate("""() => {
      window.realFetch = window.fetch;
      window.fetch = async (url, init) => {
        if (url === "health" || url === "info") throw new TypeError("Failed to fetch");
        const response = await realFetch(url, init);
        if (url !== "tts") return response;
        const reader = response.body.getReader();
        const first = await reader.read();
        reader.cancel();
        return new Response(new ReadableStream({
          start(c) { c.enqueue(first.value); },
          pull(c) { c.error(new TypeError("network error")); },
        }), { headers: response.headers });
      };
    }""")
    set_streaming(page, True)
    page.fill("#text", "你好。今天天气很好。")
    page.click("#speak")
    page.wait_for_selector("#error:not([hidden])", timeout=60000)
    assert "Connection problem" in page.inner_text("#error-title")
    assert "connection to the server was lost" in page.inner_text("#error-message")
    assert "time limit" not in page.inner_text("#error-message")
    assert page.inner_text("#status") == "unreachable"
    assert "incomplete" in page.inner_text(".result .meta")  # what came is kept
    page.evaluate("window.fetch = window.realFetch")  # back: the page finds it again
    wait_js(page, "document.getElementById('status').textContent === 'ready'", timeout=30)
    wait_js(page, "document.getElementById('error').hidden")
