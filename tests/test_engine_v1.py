"""The v1 engine end to end on the tiny official-format directory: modes, errors, streaming."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cosyvoice_lite import (
    AudioError,
    Engine,
    EngineClosedError,
    InvalidRequestError,
    Mode,
    SynthesisRequest,
    UnknownVoiceError,
    UnsupportedModeError,
)
from cosyvoice_lite.cli import main as cli_main

AUDIO = Path(__file__).resolve().parent / "data" / "audio"


@pytest.fixture(scope="module")
def engines(v1_variants: dict[str, Path]) -> dict[str, Engine]:
    return {name: Engine.load(path) for name, path in v1_variants.items()}


@pytest.fixture(scope="module")
def prompt_wav() -> Path:
    return sorted(AUDIO.glob("*16k*.wav"))[0]


def _run(engine: Engine, request: SynthesisRequest) -> tuple[np.ndarray, list]:
    chunks = list(engine.synthesize(request))
    assert chunks and chunks[-1].final and not any(c.final for c in chunks[:-1])
    assert {c.sample_rate for c in chunks} == {22050}
    return np.concatenate([c.samples for c in chunks]), chunks


def test_modes_per_release(engines: dict[str, Engine]) -> None:
    assert Mode.PRESET not in engines["base"].modes
    assert Mode.INSTRUCT not in engines["sft"].modes
    assert {Mode.PRESET, Mode.INSTRUCT} <= set(engines["instruct"].modes)
    assert engines["sft"].voices() == sorted(engines["sft"].voices()) and engines["sft"].voices()


def test_preset_voice_is_reproducible_with_a_seed(engines: dict[str, Engine]) -> None:
    engine = engines["sft"]
    voice = engine.voices()[0]
    a, _ = _run(engine, SynthesisRequest(Mode.PRESET, "你好，世界。", voice=voice, seed=7))
    b, _ = _run(engine, SynthesisRequest(Mode.PRESET, "你好，世界。", voice=voice, seed=7))
    c, _ = _run(engine, SynthesisRequest(Mode.PRESET, "你好，世界。", voice=voice, seed=8))
    assert a.dtype == np.float32 and len(a) > 0 and np.abs(a).max() <= 0.99 + 1e-6
    np.testing.assert_array_equal(a, b)
    assert len(a) != len(c) or not np.array_equal(a, c)


def test_every_mode_produces_audio(engines: dict[str, Engine], prompt_wav: Path) -> None:
    base, instruct = engines["base"], engines["instruct"]
    requests = [
        (
            base,
            SynthesisRequest(
                Mode.ZERO_SHOT,
                "Hello there.",
                prompt_audio=prompt_wav,
                prompt_text="This is a prompt.",
                seed=1,
            ),
        ),
        (
            base,
            SynthesisRequest(
                Mode.CROSS_LINGUAL, "<|en|>Hello there.", prompt_audio=prompt_wav, seed=1
            ),
        ),
        (
            base,
            SynthesisRequest(
                Mode.VOICE_CONVERSION, source_audio=prompt_wav, prompt_audio=prompt_wav, seed=1
            ),
        ),
        (
            instruct,
            SynthesisRequest(
                Mode.INSTRUCT,
                "今天天气很好。",
                voice=instruct.voices()[0],
                instruct="A calm narrator.<|endofprompt|>",
                seed=1,
            ),
        ),
        (
            instruct,
            SynthesisRequest(
                Mode.PRESET, "Speed change.", voice=instruct.voices()[0], speed=1.5, seed=1
            ),
        ),
    ]
    for engine, request in requests:
        audio, _ = _run(engine, request)
        assert len(audio) > 0, request.mode


def test_speed_shortens_the_audio(engines: dict[str, Engine]) -> None:
    engine = engines["sft"]
    voice = engine.voices()[0]
    normal, _ = _run(engine, SynthesisRequest(Mode.PRESET, "一二三四五。", voice=voice, seed=3))
    fast, _ = _run(
        engine, SynthesisRequest(Mode.PRESET, "一二三四五。", voice=voice, seed=3, speed=2.0)
    )
    assert abs(len(fast) - len(normal) / 2) <= 256 * 2


def test_streaming_yields_about_the_same_audio_in_several_chunks(
    engines: dict[str, Engine],
) -> None:
    engine = engines["sft"]
    voice = engine.voices()[0]
    # min_len is twice the text tokens, so ~70 tokens of text guarantee a multi-chunk stream
    text = (
        "这是一个比较长的句子，用来测试流式合成是否正常工作，以及每一块音频是否连续，" * 2
        + "好的。"
    )
    whole, _ = _run(engine, SynthesisRequest(Mode.PRESET, text, voice=voice, seed=5))
    streamed, chunks = _run(
        engine, SynthesisRequest(Mode.PRESET, text, voice=voice, seed=5, stream=True)
    )
    assert len(chunks) > 1
    # chunk-wise length regulation rounds per chunk (as the official), so lengths differ slightly
    assert abs(len(streamed) - len(whole)) <= 0.05 * len(whole)


def test_concurrent_requests_do_not_affect_each_other(engines: dict[str, Engine]) -> None:
    engine = engines["sft"]
    voice = engine.voices()[0]
    texts = ["第一个请求。", "Second request here.", "第三个。"]

    def request(i: int) -> SynthesisRequest:
        return SynthesisRequest(Mode.PRESET, texts[i], voice=voice, seed=i, stream=True)

    alone = [_run(engine, request(i))[0] for i in range(len(texts))]
    together: dict[int, np.ndarray] = {}
    threads = [
        threading.Thread(target=lambda i=i: together.__setitem__(i, _run(engine, request(i))[0]))
        for i in range(len(texts))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, audio in enumerate(alone):
        np.testing.assert_array_equal(together[i], audio)


@pytest.mark.parametrize(
    ("variant", "request_kwargs", "error", "match"),
    [
        (
            "sft",
            dict(mode=Mode.INSTRUCT, text="hi", voice="x", instruct="sad"),
            UnsupportedModeError,
            "supports: preset",
        ),
        ("base", dict(mode=Mode.PRESET, text="hi", voice="x"), UnsupportedModeError, "zero_shot"),
        ("sft", dict(mode=Mode.PRESET, text="hi", voice="nobody"), UnknownVoiceError, "nobody"),
        ("sft", dict(mode=Mode.PRESET, text="   ", voice=None), InvalidRequestError, "empty"),
        (
            "sft",
            dict(mode=Mode.PRESET, text="。。！", voice=None),
            InvalidRequestError,
            "nothing to speak",
        ),
        (  # a language tag and nothing after it
            "sft",
            dict(mode=Mode.PRESET, text="<|en|> 。", voice=None),
            InvalidRequestError,
            "nothing to speak",
        ),
        ("sft", dict(mode=Mode.PRESET, text="hi", speed=5.0), InvalidRequestError, "speed"),
        ("base", dict(mode=Mode.ZERO_SHOT, text="hi"), InvalidRequestError, "prompt audio"),
        ("base", dict(mode=Mode.VOICE_CONVERSION), InvalidRequestError, "source audio"),
        (
            "sft",
            dict(mode=Mode.PRESET, text="hi", voice=None, max_speech_tokens=6001),
            InvalidRequestError,
            "max_speech_tokens must be from 1 to 6000",
        ),
    ],
)
def test_bad_requests_get_clear_errors(engines, variant, request_kwargs, error, match) -> None:
    engine = engines[variant]
    if request_kwargs.get("voice") is None and request_kwargs["mode"] == Mode.PRESET:
        request_kwargs = {
            **request_kwargs,
            "voice": engine.voices()[0] if engine.voices() else None,
        }
    with pytest.raises(error, match=match):
        list(engine.synthesize(SynthesisRequest(**request_kwargs)))


def test_bad_prompt_audio(engines: dict[str, Engine], tmp_path: Path) -> None:
    engine = engines["base"]
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000 * 2, dtype=np.float32), 16000)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF....not really a wav file")
    too_long = tmp_path / "long.wav"
    sf.write(
        too_long,
        (np.random.default_rng(0).standard_normal(16000 * 31) * 0.1).astype(np.float32),
        16000,
    )
    for path, match in (
        (silent, "silent"),
        (garbage, "could not be decoded"),
        (too_long, "too long"),
    ):
        request = SynthesisRequest(Mode.CROSS_LINGUAL, "hello", prompt_audio=path)
        with pytest.raises(AudioError, match=match):
            list(engine.synthesize(request))


def test_a_request_bounds_its_audio(
    engines: dict[str, Engine], prompt_wav: Path, tmp_path: Path
) -> None:
    """``max_audio_seconds`` (a server's limit) holds for the prompt and the source as they are
    decoded, up to the tokenizer's 30 s."""
    engine = engines["base"]
    samples, rate = sf.read(prompt_wav, dtype="float32")
    longer = tmp_path / "twice.wav"
    sf.write(longer, np.concatenate([samples, samples]), rate)
    limit = samples.size / rate + 0.5  # the prompt within it, twice the prompt not
    for kwargs, field in (
        (dict(mode=Mode.CROSS_LINGUAL, text="hello", prompt_audio=longer), "prompt_audio"),
        (dict(mode=Mode.VOICE_CONVERSION, source_audio=longer, prompt_audio=prompt_wav),
         "source_audio"),
    ):  # fmt: skip
        with pytest.raises(AudioError, match="too long") as refused:
            list(engine.synthesize(SynthesisRequest(**kwargs, max_audio_seconds=limit, seed=1)))
        assert refused.value.param == field
        within = SynthesisRequest(**kwargs, max_audio_seconds=2 * limit, max_speech_tokens=5)
        assert _run(engine, within)[0].size > 0
    for bad in (0, -1.0, 30.5, float("nan"), "10", True):
        request = SynthesisRequest(Mode.PRESET, "hi", voice=None, max_audio_seconds=bad)
        with pytest.raises(InvalidRequestError, match="max_audio_seconds must be"):
            list(engine.synthesize(request))


def test_a_field_the_mode_does_not_read_is_refused(
    engines: dict[str, Engine], prompt_wav: Path, tmp_path: Path, capsys
) -> None:
    """An instruction in a preset request, a transcript in a cross-lingual one, text or an
    instruction with a source to convert: each was dropped without a word (the same audio)."""
    engine, voice = engines["sft"], engines["sft"].voices()[0]
    cases = [
        (engine, dict(mode=Mode.PRESET, text="hi", voice=voice, instruct="sad"), "instruct"),
        (engines["base"], dict(mode=Mode.CROSS_LINGUAL, text="hi", prompt_audio=prompt_wav,
                               prompt_text="what it says"), "prompt_text"),
        (engines["base"], dict(mode=Mode.VOICE_CONVERSION, text="hi", source_audio=prompt_wav,
                               prompt_audio=prompt_wav), "text"),
        (engine, dict(mode=Mode.PRESET, text="hi", voice=voice, source_audio=prompt_wav),
         "source_audio"),
    ]  # fmt: skip
    for model, kwargs, field in cases:
        with pytest.raises(InvalidRequestError) as refused:
            list(model.synthesize(SynthesisRequest(**kwargs)))
        assert refused.value.param == field and "not" in str(refused.value)
    model = str(engines["base"].model.path)
    out = str(tmp_path / "x.wav")
    for argv, option in (
        (["", "--source-wav", str(prompt_wav), "--prompt-wav", str(prompt_wav),
          "--instruct", "happily"], "--instruct"),
        (["hi", "--prompt-wav", str(prompt_wav), "--prompt-text", "words",
          "--mode", "cross_lingual"], "--prompt-text"),
        (["hi", "--source-wav", str(prompt_wav), "--prompt-wav", str(prompt_wav)], "not text"),
    ):  # fmt: skip
        assert cli_main(["say", *argv, "--model", model, "-o", out]) == 2
        assert option in capsys.readouterr().err
    assert not Path(out).exists()


def test_cli_say_writes_a_playable_wav(
    v1_variants: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "hello.wav"
    engine_dir = v1_variants["sft"]
    assert cli_main(["voices", "--model", str(engine_dir)]) == 0
    voice = capsys.readouterr().out.splitlines()[1]
    assert (
        cli_main(
            [
                "say",
                "你好。",
                "--model",
                str(engine_dir),
                "--voice",
                voice,
                "--seed",
                "1",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    data, rate = sf.read(out)
    assert rate == 22050 and len(data) > 0
    assert (
        cli_main(["say", "hi", "--model", str(engine_dir), "--voice", "nobody", "-o", str(out)])
        == 2
    )
    assert "unknown voice" in capsys.readouterr().err


def test_the_api_refuses_what_it_would_misread(engines: dict[str, Engine], v1_dir: Path) -> None:
    """stream="no" streamed; a misspelt option of check_load_options was passed over;
    idle_release_seconds="5" was a raw TypeError; iter_text, in the docs, was not exported; an
    engine could not be closed by a with block."""
    import cosyvoice_lite

    engine, voice = engines["sft"], engines["sft"].voices()[0]
    for flag in ("stream", "text_frontend", "ignore_eos"):
        request = SynthesisRequest(Mode.PRESET, "hi", voice=voice, **{flag: "no"})
        with pytest.raises(InvalidRequestError, match=f"{flag} must be True or False"):
            list(engine.synthesize(request))
    with pytest.raises(TypeError, match="no option 'devic'"):
        Engine.check_load_options(devic="cuda:7")
    with pytest.raises(InvalidRequestError, match="idle_release_seconds must be a number"):
        Engine.check_load_options(idle_release_seconds="5")
    assert cosyvoice_lite.iter_text is not None
    with Engine.load(v1_dir, capture_graphs=False) as scoped:
        assert scoped.voices()
    with pytest.raises(EngineClosedError):
        list(scoped.synthesize(SynthesisRequest(Mode.PRESET, "hi", voice=voice)))


def test_synthesize_to_file_writes_the_format_its_name_says(
    engines: dict[str, Engine], tmp_path: Path
) -> None:
    """It wrote WAV into out.mp3, and found a bad path only after the synthesis."""
    from cosyvoice_lite import synthesize_to_file

    engine = engines["sft"]
    request = SynthesisRequest(Mode.PRESET, "你好。", voice=engine.voices()[0], seed=1)
    seconds = synthesize_to_file(engine, request, tmp_path / "out.mp3")
    assert sf.info(str(tmp_path / "out.mp3")).format == "MP3" and seconds > 0
    for bad in (tmp_path / "out.xyz", tmp_path / "missing" / "out.wav"):
        with pytest.raises(InvalidRequestError, match="cannot"):
            synthesize_to_file(engine, request, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp3"]


def test_a_text_where_the_request_goes_is_a_clear_error(engines: dict[str, Engine]) -> None:
    """synthesize("...") and synthesize({...}) failed inside the engine with an AttributeError."""
    engine = engines["sft"]
    for wrong in ("你好。", {"mode": "preset", "text": "你好。", "voice": "中文女"}):
        with pytest.raises(InvalidRequestError, match="must be a SynthesisRequest"):
            list(engine.synthesize(wrong))
        with pytest.raises(InvalidRequestError, match="must be a SynthesisRequest"):
            engine.submit(wrong, sink=None)


@pytest.mark.parametrize(
    "option",
    ["exact_float32", "download", "share_onnx_threads", "capture_graphs", "batch_utterances"],
)
def test_load_flags_are_true_or_false(option: str, tmp_path: Path) -> None:
    """exact_float32="false" turned exact mode on (any truthy value did)."""
    with pytest.raises(InvalidRequestError, match=f"{option} must be True"):
        Engine.check_load_options(**{option: "false"})
    with pytest.raises(InvalidRequestError, match=f"{option} must be True"):
        Engine.load(tmp_path, **{option: "false"})  # before any file is read
    Engine.check_load_options(**{option: False})


def test_an_engine_dropped_without_close_ends_its_threads(v1_dir: Path) -> None:
    """Its threads kept it (the preparing thread held the last request's run, and through it the
    engine), its weights and six threads, for the life of the process."""
    import gc
    import time
    import weakref

    before = threading.active_count()
    engine = Engine.load(v1_dir, capture_graphs=False)
    request = SynthesisRequest(Mode.PRESET, "你好。", voice=engine.voices()[0], max_speech_tokens=5)
    assert list(engine.synthesize(request)) and threading.active_count() > before
    dropped = weakref.ref(engine)
    del engine
    deadline = time.monotonic() + 30
    while (dropped() is not None or threading.active_count() > before) and (
        time.monotonic() < deadline
    ):
        gc.collect()
        time.sleep(0.1)
    assert dropped() is None and threading.active_count() <= before


def test_an_instruction_gets_the_end_of_instruction_mark_v1_instruct_expects(
    engines: dict[str, Engine],
) -> None:
    """CosyVoice-300M-Instruct reads an instruction up to <|endofprompt|> (BPE text to whisper;
    the official example writes it): it was added for v2/v3 only, so a v1 instruction ran on
    into the text. Added where the user wrote none; then, as upstream, not normalised."""
    engine = engines["instruct"]
    assert engine._instruction(" A calm narrator. ") == "A calm narrator.<|endofprompt|>"
    assert (
        engine._instruction("A calm narrator.<|endofprompt|>") == "A calm narrator.<|endofprompt|>"
    )
    assert engine._instruction("Speak 3 times faster") == "Speak 3 times faster<|endofprompt|>"
    request = SynthesisRequest(
        Mode.INSTRUCT, "今天天气很好。", voice=engine.voices()[0], instruct="A calm narrator."
    )
    inputs = engine._inputs(request, "今天天气很好。", engine._prompt(request, None))
    assert inputs.prompt_text[0].tolist() == engine.tokenizer.encode(
        "A calm narrator.<|endofprompt|>"
    )
