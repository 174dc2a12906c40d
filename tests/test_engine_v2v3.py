"""CosyVoice2/3 through the engine: modes, markup, streaming text in, independent flat-cost streams."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import cosyvoice_lite.networks.flow_v2 as flow_v2
from cosyvoice_lite import (
    Engine,
    InvalidRequestError,
    Mode,
    SynthesisRequest,
    UnknownVoiceError,
    UnsupportedModeError,
)
from cosyvoice_lite.engine import QueueSink
from cosyvoice_lite.networks.flow_matching import CFG_ROWS
from cosyvoice_lite.pipelines.v2 import MAX_TOKEN_HOP

DATA = Path(__file__).resolve().parent / "data"
PROMPT = DATA / "audio" / "zh_16k.wav"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
LONG_TEXT = "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐，笑容如花儿般绽放。"


@pytest.fixture(scope="module")
def v2() -> Engine:
    engine = Engine.load(DATA / "models" / "v2-tiny")
    engine.graphs_traced.result()  # some tests here count or time the flow's calls
    return engine


@pytest.fixture(scope="module")
def v3() -> Engine:
    return Engine.load(DATA / "models" / "v3-tiny")


def _audio(engine: Engine, request: SynthesisRequest) -> tuple[np.ndarray, int]:
    chunks = list(engine.synthesize(request))
    assert chunks[-1].final and {c.sample_rate for c in chunks} == {24000}
    return np.concatenate([c.samples for c in chunks]), len(chunks)


def test_modes(v2: Engine, v3: Engine) -> None:
    assert set(v2.modes) == set(Mode)  # the v2 directory has preset voices
    assert Mode.PRESET not in v3.modes and Mode.INSTRUCT in v3.modes
    with pytest.raises(UnsupportedModeError, match="supports: zero_shot"):
        list(v3.synthesize(SynthesisRequest(Mode.PRESET, "你好。", voice="中文女")))


def test_every_mode_speaks(v2: Engine, v3: Engine) -> None:
    for engine in (v2, v3):
        for request in (
            SynthesisRequest(
                Mode.ZERO_SHOT, "你好。", prompt_audio=PROMPT, prompt_text=PROMPT_TEXT, seed=1
            ),
            SynthesisRequest(Mode.CROSS_LINGUAL, "Hello there.", prompt_audio=PROMPT, seed=1),
            SynthesisRequest(
                Mode.INSTRUCT, "你好。", prompt_audio=PROMPT, instruct="用四川话说这句话", seed=1
            ),
            SynthesisRequest(
                Mode.VOICE_CONVERSION,
                source_audio=DATA / "audio" / "en_22k.wav",
                prompt_audio=PROMPT,
                seed=1,
            ),
        ):
            audio, _ = _audio(engine, request)
            assert len(audio) > 0 and np.isfinite(audio).all(), (engine.version, request.mode)


def test_instruction_gets_the_system_prompt_each_version_needs(v2: Engine, v3: Engine) -> None:
    assert v2._instruction("用四川话说这句话") == "用四川话说这句话<|endofprompt|>"
    assert (
        v3._instruction("speak happily")
        == "You are a helpful assistant. speak happily<|endofprompt|>"
    )
    assert v3._instruction("X<|endofprompt|>") == "X<|endofprompt|>"
    assert v3._with_system_prompt("", "你好") == (
        "",
        "You are a helpful assistant.<|endofprompt|>你好",
    )
    assert v3._with_system_prompt("转写", "你好")[0].endswith("<|endofprompt|>转写")


def test_pronunciation_markup(v2: Engine, v3: Engine) -> None:
    pinyin = SynthesisRequest(
        Mode.CROSS_LINGUAL, "对报道[j][ǐ]予好评，[M][AY0] name。", prompt_audio=PROMPT, seed=2
    )
    assert len(_audio(v3, pinyin)[0]) > 0
    with pytest.raises(InvalidRequestError, match=r"\[j\], \[ǐ\], \[M\], \[AY0\]"):
        list(v2.synthesize(pinyin))
    with pytest.raises(InvalidRequestError, match=r"\[giggle\]"):
        list(
            v3.synthesize(SynthesisRequest(Mode.CROSS_LINGUAL, "哈[giggle]哈", prompt_audio=PROMPT))
        )


def test_rl_checkpoint_is_selectable() -> None:
    plain = Engine.load(DATA / "models" / "v3-tiny")
    rl = Engine.load(DATA / "models" / "v3-tiny", llm_checkpoint="llm.rl.pt")
    a = next(iter(plain.pipeline.llm.parameters()))
    b = next(iter(rl.pipeline.llm.parameters()))
    assert not np.array_equal(a.detach().numpy(), b.detach().numpy())
    with pytest.raises(InvalidRequestError, match="file name"):
        Engine.load(DATA / "models" / "v3-tiny", llm_checkpoint="../llm.pt")


def test_streaming_text_in_starts_audio_before_the_text_ends(v2: Engine) -> None:
    pieces = [LONG_TEXT[i : i + 4] for i in range(0, len(LONG_TEXT), 4)] * 3
    consumed = []

    def text():
        for i, piece in enumerate(pieces):
            consumed.append(i)
            yield piece

    request = SynthesisRequest(
        Mode.ZERO_SHOT, text(), prompt_audio=PROMPT, prompt_text=PROMPT_TEXT, seed=3, stream=True
    )
    stream = v2.synthesize(request)
    first = next(stream)
    assert first.samples.size > 0 and first.sample_rate == 24000
    assert len(consumed) < len(pieces), "the first audio waited for the whole text"
    rest = list(stream)
    assert rest[-1].final and len(consumed) == len(pieces)


def test_concurrent_streams_are_independent(v2: Engine) -> None:
    def request(seed: int) -> SynthesisRequest:
        return SynthesisRequest(
            Mode.ZERO_SHOT,
            LONG_TEXT,
            prompt_audio=PROMPT,
            prompt_text=PROMPT_TEXT,
            seed=seed,
            stream=True,
        )

    alone = [_audio(v2, request(s))[0] for s in (1, 2)]
    together: dict[int, np.ndarray] = {}
    threads = [
        threading.Thread(target=lambda s=s: together.__setitem__(s, _audio(v2, request(s))[0]))
        for s in (1, 2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(together[1], alone[0])
    np.testing.assert_array_equal(together[2], alone[1])


def test_stream_and_whole_speak_the_same_tokens(v2: Engine) -> None:
    request = SynthesisRequest(
        Mode.ZERO_SHOT, LONG_TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT, seed=4
    )
    whole, _ = _audio(v2, request)
    streamed, n_chunks = _audio(v2, SynthesisRequest(**{**vars(request), "stream": True}))
    assert n_chunks > 1
    assert len(streamed) == len(whole)  # same tokens -> same mel length (2 frames per token)


def test_per_piece_flow_work_does_not_grow(v2: Engine, monkeypatch) -> None:
    """Each streaming flow call runs the U-Net over its piece's new frames only, however long the
    history."""
    frames: list[int] = []
    rows = [0]  # of the Euler step being computed (its rows may be computed apart)
    original = flow_v2._estimator_increment

    def counting(*args, **kwargs):
        x = next(a for a in args if hasattr(a, "shape") and a.dim() == 3)
        rows[0] += x.shape[0]
        if rows[0] == CFG_ROWS:  # one stream's Euler step done
            frames.append(int(x.shape[-1]))
            rows[0] = 0
        return original(*args, **kwargs)

    monkeypatch.setattr(flow_v2, "_estimator_increment", counting)
    text = LONG_TEXT * 2
    request = SynthesisRequest(
        Mode.ZERO_SHOT, text, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT, seed=5, stream=True
    )
    _, n_chunks = _audio(v2, request)
    print("U-Net frames per streaming step:", frames)
    steps = [frames[i : i + 10] for i in range(0, len(frames), 10)]  # 10 Euler steps per call
    assert n_chunks >= 3 and all(len(set(step)) == 1 for step in steps)
    # one call per audio piece (the official hops: 25 tokens + the prompt's pad, 50, then 100):
    # the prompt's whole chunks were computed once for the voice, so the first call is the
    # prompt's last, partial chunk and the first hop's; then each call is its hop's whole
    # chunks (2 frames per token), never the history, so the cost stays flat; the last call
    # is the rest
    chunk_frames = 2 * v2.pipeline.flow.encoder.static_chunk_size
    largest = 2 * (MAX_TOKEN_HOP + v2.pipeline.lookahead)
    calls = [step[0] for step in steps]
    assert calls[:3] == [2 * chunk_frames, 2 * chunk_frames, 4 * chunk_frames], calls
    assert all(n % chunk_frames == 0 and n <= largest for n in calls[:-1]), calls
    assert 0 < calls[-1] <= largest


def test_each_chunk_is_delivered_as_soon_as_it_is_computed(v2: Engine, monkeypatch) -> None:
    """The first chunk reaches the caller before the second one is computed."""
    calls: list[bool] = []
    vocode = v2.pipeline._vocode
    monkeypatch.setattr(
        v2.pipeline,
        "_vocode",
        lambda state, mel, *a, **k: (calls.append(k.get("finalize")), vocode(state, mel, *a, **k))[
            1
        ],
    )
    request = SynthesisRequest(
        Mode.ZERO_SHOT, LONG_TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT, seed=4, stream=True
    )
    stream = v2.synthesize(request)
    first = next(stream)
    assert len(calls) == 1 and not first.final
    rest = list(stream)
    assert len(calls) == 1 + len(rest) and rest[-1].final and not any(c.final for c in rest[:-1])


def test_streams_share_their_voice_and_a_stream_budget_keeps_the_audio(v2: Engine) -> None:
    """Streams of one voice reuse its prompt frames computed once; a stream bounded to no cache
    of its own (re-solving its frames every chunk, as the official) gives the same audio up to
    the vocoder's phase amplification of ~1e-6 mel rounding."""
    request = SynthesisRequest(
        Mode.ZERO_SHOT, LONG_TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT, seed=8, stream=True
    )
    flows = v2.pipeline.prompt_flows
    flows.clear()
    misses, hits = flows.misses, flows.hits
    unbounded, n_chunks = _audio(v2, request)
    assert n_chunks > 2 and (flows.misses, flows.hits) == (misses + 1, hits)
    assert v2.pipeline.stream_cache_bytes == 256 << 20  # the default bound, far above tiny's
    v2.pipeline.stream_cache_bytes = 0
    try:
        bounded, _ = _audio(v2, request)
    finally:
        v2.pipeline.stream_cache_bytes = 256 << 20
    assert flows.hits == hits + 1 and len(flows) == 1
    assert bounded.shape == unbounded.shape
    assert float(np.abs(bounded - unbounded).max()) < 5e-2


def test_cache_budgets_must_not_be_negative() -> None:
    with pytest.raises(InvalidRequestError, match="stream_cache_mb"):
        Engine.load(DATA / "models" / "v2-tiny", stream_cache_mb=-1)


def test_load_options_are_checked_before_loading() -> None:
    # the networks' own checks raise ValueError; Engine.load names a bad option as the caller's
    with pytest.raises(InvalidRequestError, match="flow steps must be an integer from 1 to 100"):
        Engine.load(DATA / "models" / "v2-tiny", flow_steps=0)
    with pytest.raises(InvalidRequestError, match="max_batch"):
        Engine.load(DATA / "models" / "v2-tiny", max_batch=0)


def test_prepare_voice_computes_the_shared_prompt_frames_ahead(v3: Engine) -> None:
    flows = v3.pipeline.prompt_flows
    flows.clear()
    voice = v3.encode_prompt(PROMPT, PROMPT_TEXT)
    assert v3.prepare_voice(voice).result(timeout=120) is True
    misses, hits = flows.misses, flows.hits
    request = SynthesisRequest(Mode.ZERO_SHOT, "你好，今天天气很好。", seed=3, stream=True)
    chunks = list(v3.synthesize(request, prompt=voice))
    assert chunks and chunks[-1].final
    assert (flows.misses, flows.hits, len(flows)) == (misses, hits + 1, 1)


def _voices(engine: Engine, count: int) -> list:
    """``count`` distinct voices (their prompt cache keys differ) of one recording's size."""
    base = engine.encode_prompt(PROMPT, PROMPT_TEXT)
    return [replace(base, embedding=base.embedding * (1 + k / 16)) for k in range(1, count + 1)]


def test_preparing_a_voice_computes_nothing_it_could_not_keep(v2: Engine) -> None:
    """prompt_cache_mb=0 ("computed per stream") prepares nothing; neither does a budget below a
    voice's estimated size (at most a probe of a few chunks, once, before any size is known);
    the voice's streams compute its prompt frames themselves."""
    flows = v2.pipeline.prompt_flows
    budget = flows.budget_bytes
    voice, other = _voices(v2, 2)
    try:
        flows.clear()
        flows.budget_bytes = 0
        misses = flows.misses
        assert v2.prepare_voice(voice).result(timeout=60) is False
        assert v2.prepare_voice(voice, evict=False).result(timeout=60) is False
        assert (flows.misses, len(flows)) == (misses, 0)
        probes = flows.probes
        flows.budget_bytes = 1  # smaller than any voice
        for prompt in (voice, other, voice):
            assert v2.prepare_voice(prompt).result(timeout=60) is False
        assert flows.misses == misses and flows.probes <= probes + 1 and len(flows) == 0
        request = SynthesisRequest(Mode.ZERO_SHOT, "你好。", seed=3, stream=True)
        assert list(v2.synthesize(request, prompt=voice))[-1].final
        assert flows.misses == misses + 1 and len(flows) == 0  # computed by its stream
    finally:
        flows.budget_bytes = budget
        flows.clear()


def test_preparing_voices_never_holds_up_a_request_and_is_bounded(v2: Engine) -> None:
    """Voices prepared ahead (each save queues one) are background work of the audio workers: none
    starts while the engine has a request, at most one per worker waits (a newer one drops the
    oldest: its future is cancelled), and a stream started behind a burst of them gets its first
    audio before they are done. (Before: every one was queued and computed, between the stream's
    chunks: 40 saves of 30 s voices made another voice's first audio 152.7 s, not 0.20 s.)"""
    flows = v2.pipeline.prompt_flows
    flows.clear()
    workers = v2.loop.limits.audio_workers
    voices = _voices(v2, 2 * workers + 4)
    speaker = _voices(v2, 1)[0]
    # a request waiting for its text keeps the engine busy: nothing prepared starts meanwhile
    typing = threading.Event()

    def text():
        yield "你好，"
        typing.wait(60)
        yield "今天天气很好。"

    busy = QueueSink()
    job = v2.submit(SynthesisRequest(Mode.ZERO_SHOT, text(), seed=1, stream=True), busy,
                    prompt=speaker)  # fmt: skip
    try:
        waiting = [v2.prepare_voice(voice) for voice in voices]
        dropped = len(voices) - workers
        assert [f.cancelled() for f in waiting] == [True] * dropped + [False] * workers
        time.sleep(0.5)
        assert not any(f.running() or f.done() for f in waiting[dropped:])
    finally:
        typing.set()
    assert list(busy)[-1].final and not job.cancelled.is_set()
    assert [f.result(timeout=60) for f in waiting[-workers:]] == [True] * workers  # the newest

    # a burst while the engine is idle: those started run on, and a stream behind them waits
    # for none of the others
    flows.clear()
    burst = [v2.prepare_voice(voice) for voice in voices]
    assert sum(f.cancelled() for f in burst) >= len(voices) - 2 * workers
    request = SynthesisRequest(Mode.ZERO_SHOT, "你好，今天天气很好。", seed=3, stream=True)
    stream = v2.synthesize(request, prompt=speaker)
    assert next(stream).samples.size > 0
    assert not all(f.done() for f in burst), "the stream's first audio waited for them all"
    assert list(stream)[-1].final
    for future in burst:
        assert future.cancelled() or future.result(timeout=60) is True


def test_a_segment_without_speech_tokens_is_silent_not_an_error(v3: Engine, tmp_path) -> None:
    """CosyVoice3 masks only its sos before min_len (as the official), so it can draw its eos
    first: with this tiny model, a 192 kHz prompt and seed 1 it does. The segment has no audio
    and the request ends normally, streamed or not."""
    import soundfile as sf

    samples, _ = sf.read(str(PROMPT), dtype="float32")
    prompt = tmp_path / "r192k.wav"
    sf.write(str(prompt), np.repeat(samples, 12)[: 192000 * 2], 192000)
    for stream in (False, True):
        request = SynthesisRequest(
            Mode.ZERO_SHOT, "你好，世界。", prompt_audio=prompt, prompt_text=PROMPT_TEXT, seed=1,
            stream=stream,
        )  # fmt: skip
        chunks = list(v3.synthesize(request))
        assert chunks[-1].final and sum(c.samples.size for c in chunks) == 0


def test_streamed_text_is_checked_as_text_is(v2: Engine, v3: Engine) -> None:
    def run(engine: Engine, pieces, mode=Mode.ZERO_SHOT, **fields):
        fields = {"prompt_audio": PROMPT, "prompt_text": PROMPT_TEXT, "seed": 1, **fields}
        return list(engine.synthesize(SynthesisRequest(mode, iter(pieces), **fields)))

    with pytest.raises(InvalidRequestError, match="empty"):
        run(v2, [])
    with pytest.raises(InvalidRequestError, match="empty"):
        run(v2, ["", "  ", "。", "\u200b"])
    with pytest.raises(InvalidRequestError, match="must be str"):
        run(v2, ["你好", 12])
    with pytest.raises(InvalidRequestError, match="markup"):
        run(v2, ["你好", "[zz9]"])
    with pytest.raises(InvalidRequestError, match="Unicode"):
        run(v2, ["你好 \ud800"])
    for unordered in ({"你好": 1}, {"你好", "世界"}):  # not pieces in an order
        with pytest.raises(InvalidRequestError, match="in order"):
            list(
                v2.synthesize(SynthesisRequest(Mode.CROSS_LINGUAL, unordered, prompt_audio=PROMPT))
            )
    # the bound of a segment holds for streamed text too
    chunks = run(v2, [LONG_TEXT] * 4, max_speech_tokens=30, stream=True)
    assert sum(c.samples.size for c in chunks) <= 30 * 2 * 480


def test_a_slow_text_stream_wakes_the_loop_as_its_pieces_come(v2: Engine) -> None:
    """A row waiting for streamed text sleeps until a piece arrives: the loop looked again every
    5 ms (200 wake-ups a second while a chat model typed). The audio is the same."""

    def slowly(pieces):
        for piece in pieces:
            time.sleep(0.25)
            yield piece

    pieces = ["今天天气", "真好，", "我们出去", "走走吧。"]
    request = SynthesisRequest(
        Mode.ZERO_SHOT, slowly(pieces), prompt_audio=PROMPT, prompt_text=PROMPT_TEXT, seed=3,
        max_speech_tokens=12, ignore_eos=True,
    )  # fmt: skip
    waits, start = v2.loop.waits, time.monotonic()
    audio = np.concatenate([c.samples for c in v2.synthesize(request)])
    slept, took = v2.loop.waits - waits, time.monotonic() - start
    quick = replace(request, text=iter(pieces))
    np.testing.assert_array_equal(audio, np.concatenate([c.samples for c in v2.synthesize(quick)]))
    assert 0 < slept <= 3 * len(pieces), slept  # about once per piece
    # woken by each piece, not by the wait's 1 s bound (it took 24.6 s with wake-ups lost)
    assert took < 0.25 * len(pieces) + 5.0, took


def test_tags_and_escapes_split_between_streamed_pieces_read_as_written(v2: Engine) -> None:
    """A piece's end that may open a tag or its escape waits for the next piece: the audio is
    that of the pieces cut before the tag."""

    def audio(pieces) -> np.ndarray:
        request = SynthesisRequest(
            Mode.ZERO_SHOT, iter(pieces), prompt_audio=PROMPT, prompt_text=PROMPT_TEXT, seed=3,
            max_speech_tokens=12, ignore_eos=True,
        )  # fmt: skip
        return np.concatenate([c.samples for c in v2.synthesize(request)])

    np.testing.assert_array_equal(audio(["你好\\", "[sic]。"]), audio(["你好", "\\[sic]。"]))
    np.testing.assert_array_equal(audio(["你好[bre", "ath]。"]), audio(["你好", "[breath]。"]))
    np.testing.assert_array_equal(
        audio(["你好<stro", "ng>好</str", "ong>。"]), audio(["你好", "<strong>好</strong>。"])
    )
    with pytest.raises(InvalidRequestError, match="<strongx>"):  # checked whole
        audio(["你好<stro", "ngx>好。"])
    with pytest.raises(InvalidRequestError, match=r"\[breath\] is .* own markup"):
        audio(["你好\\", "[breath]。"])
    with pytest.raises(InvalidRequestError, match=r"\[si\]"):  # an open tag's end: checked
        audio(["你好", "[si]"])


def test_cross_lingual_streamed_text_gets_cosyvoice3_system_prompt(v3: Engine) -> None:
    """CosyVoice3 needs <|endofprompt|> before streamed text (in the prompt text, where its
    bistream looks): added for the user as for a whole text (it once failed inside the LLM)."""

    def audio(pieces: list[str]) -> np.ndarray:
        request = SynthesisRequest(Mode.CROSS_LINGUAL, iter(pieces), prompt_audio=PROMPT, seed=2,
                                   max_speech_tokens=20)  # fmt: skip
        return np.concatenate([c.samples for c in v3.synthesize(request)])

    added = audio(["你好，", "世界。"])
    assert added.size > 0
    # written by the user too (as the official examples do): not spoken after the added one
    own = audio(["You are a helpful assistant.<|endofprompt|>你好，", "世界。"])
    assert np.array_equal(own, added)


def test_an_unknown_voice_is_named_in_every_mode(v3: Engine) -> None:
    for mode, text in ((Mode.ZERO_SHOT, "你好。"), (Mode.CROSS_LINGUAL, None)):
        request = SynthesisRequest(mode, "你好。", voice="no_such_voice", prompt_text=text)
        with pytest.raises(UnknownVoiceError, match="no_such_voice"):
            list(v3.synthesize(request))


def test_ignore_eos_decodes_exactly_n_tokens_with_streamed_text_too(v3: Engine) -> None:
    """ignore_eos masked the stop ids only after the text ended: while text was still mixed in,
    random weights could sample one (v3: 11 seeds in 20 failed 'stop token ... in the middle of
    streaming text input')."""
    pieces = ["Hello ", "there, ", "how are ", "you doing ", "today?"]
    for seed in range(6):
        request = SynthesisRequest(Mode.CROSS_LINGUAL, iter(pieces), prompt_audio=PROMPT,
                                   seed=seed, max_speech_tokens=30, ignore_eos=True)  # fmt: skip
        audio = np.concatenate([c.samples for c in v3.synthesize(request)])
        assert audio.size == 30 * 2 * 480, seed


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("seed", 2**64, "seed"),
        ("seed", -1, "seed"),
        ("seed", 1.5, "seed"),
        ("speed", "1", "speed"),
        ("speed", float("nan"), "speed"),
        ("max_speech_tokens", 2.5, "max_speech_tokens"),
        ("mode", "zero-shot", "mode"),
        ("text", b"bytes", "text"),
        ("text", None, "text"),
        ("text", "Hello \ud800 world.", "Unicode"),
        ("text", "\u200b\u200c\ufeff\x1b", "nothing to speak"),
        ("text", "<|endofprompt|>", "nothing to speak"),  # a control tag alone
        ("text", "- - -", "nothing to speak"),  # (blanks between marks were spoken)
        ("text", "\u200b \u200b。 。", "nothing to speak"),
        ("prompt_text", "a \udcff b", "Unicode"),
        ("instruct", 5, "instruct"),
    ],
)
def test_malformed_fields_are_request_errors(v2: Engine, field, value, words) -> None:
    fields = {"mode": Mode.ZERO_SHOT, "text": "你好。", "prompt_audio": PROMPT,
              "prompt_text": PROMPT_TEXT, field: value}  # fmt: skip
    with pytest.raises(InvalidRequestError, match=words):
        list(v2.synthesize(SynthesisRequest(**fields)))


def test_the_largest_seed_is_accepted(v2: Engine) -> None:
    request = SynthesisRequest(Mode.CROSS_LINGUAL, "你好。", prompt_audio=PROMPT, seed=2**64 - 1,
                               max_speech_tokens=4)  # fmt: skip
    assert sum(c.samples.size for c in v2.synthesize(request)) > 0


def test_values_that_stand_for_a_field_are_taken(v2: Engine) -> None:
    """A mode's name and numpy numbers are what the fields mean: converted, not refused."""
    request = SynthesisRequest("cross_lingual", "你好。", prompt_audio=PROMPT, seed=np.int64(3),
                               speed=np.float32(1.0), max_speech_tokens=np.int32(4))  # fmt: skip
    chunks = list(v2.synthesize(request))
    alone = SynthesisRequest(Mode.CROSS_LINGUAL, "你好。", prompt_audio=PROMPT, seed=3,
                             max_speech_tokens=4)  # fmt: skip
    assert np.array_equal(np.concatenate([c.samples for c in chunks]),
                          np.concatenate([c.samples for c in v2.synthesize(alone)]))  # fmt: skip


def test_prompt_features_that_do_not_fit_the_model_are_refused(v2: Engine, v1_dir) -> None:
    """Features of another model's encode_prompt (CosyVoice2 tokens on a v1 model) failed in
    a network; a non-finite x-vector gave NaN audio."""
    import dataclasses

    import torch

    features = v2.encode_prompt(PROMPT, PROMPT_TEXT)
    request = SynthesisRequest(Mode.ZERO_SHOT, "你好。", seed=1, max_speech_tokens=3)
    assert int(features.speech_tokens.max()) >= 4096  # past v1's vocabulary
    v1 = Engine.load(v1_dir)
    try:
        with pytest.raises(InvalidRequestError, match="speech tokens"):
            list(v1.synthesize(request, prompt=features))
    finally:
        v1.close()
    nan = dataclasses.replace(features, embedding=torch.full_like(features.embedding, float("nan")))
    with pytest.raises(InvalidRequestError, match="x-vector"):
        list(v2.synthesize(request, prompt=nan))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tokens", [1, 2])
def test_a_request_of_one_or_two_speech_tokens(v2: Engine, v3: Engine, tokens, stream) -> None:
    """The shortest requests (a streamed one with no prompt: the flow's first call has one new
    frame and no earlier ones) give their 960 samples per token."""
    fixed = dict(seed=1, stream=stream, max_speech_tokens=tokens, ignore_eos=True)
    requests = {  # v3 has no preset voices: a prompt's (its flow's first call has frames before)
        v2: SynthesisRequest(Mode.PRESET, "你好。", voice="中文女", **fixed),
        v3: SynthesisRequest(Mode.CROSS_LINGUAL, "你好。", prompt_audio=PROMPT, **fixed),
    }
    for engine, request in requests.items():
        audio = np.concatenate([c.samples for c in engine.synthesize(request)])
        assert audio.size == 960 * tokens and np.isfinite(audio).all()


def test_one_token_at_double_speed_is_still_a_frame_of_audio() -> None:
    engine = Engine.load(DATA / "models" / "v1-tiny")
    try:
        request = SynthesisRequest(
            Mode.PRESET, "你好。", voice="中文女", seed=1, speed=2.0, max_speech_tokens=1,
            ignore_eos=True,
        )  # fmt: skip
        assert sum(c.samples.size for c in engine.synthesize(request)) >= 256
    finally:
        engine.close()


def test_slow_speech_is_bounded_by_what_the_v3_vocoder_makes_in_one_call(v3: Engine) -> None:
    """At speed 0.5 the v3 vocoder's 300 s per call hold 3,750 tokens: more is refused when the
    request is made, not after minutes of decoding."""
    request = SynthesisRequest(
        Mode.CROSS_LINGUAL, "你好。", prompt_audio=PROMPT, speed=0.5, max_speech_tokens=3800,
        ignore_eos=True,
    )  # fmt: skip
    with pytest.raises(InvalidRequestError, match="at most 3750 speech tokens") as info:
        v3.submit(request, QueueSink())
    assert info.value.param == "max_speech_tokens"


def test_api_inputs_of_the_wrong_kind_get_clear_errors(v2: Engine, tmp_path) -> None:
    """A prompt file opened as text, a voice's name given as ``prompt=``, a transcript that is
    not text or carries unknown markup, a cache size that is not a whole number: each a clear
    error naming what is wrong, not an internal one from deep inside."""
    from cosyvoice_lite.errors import AudioError

    with open(PROMPT) as text_file:  # noqa: PTH123 - a file opened in text mode on purpose
        request = SynthesisRequest(Mode.CROSS_LINGUAL, "你好。", prompt_audio=text_file)
        with pytest.raises(AudioError, match="binary mode"):
            list(v2.synthesize(request))
    with pytest.raises(InvalidRequestError, match="voice="):
        list(v2.synthesize(SynthesisRequest(Mode.ZERO_SHOT, "你好。"), prompt="a_voice"))
    # the same from a voice store's callable (it had been an AttributeError: a server's 500)
    for wrong in ("a_voice", {"speech_tokens": []}):
        with pytest.raises(InvalidRequestError, match="not PromptFeatures"):
            request = SynthesisRequest(Mode.ZERO_SHOT, "你好。")
            list(v2.synthesize(request, prompt=lambda wrong=wrong: wrong))
    with pytest.raises(InvalidRequestError, match="PromptFeatures"):
        v2.prepare_voice("a_voice")
    assert v2.encode_prompt(PROMPT, None).speech_tokens.numel() > 0
    with pytest.raises(InvalidRequestError, match="prompt_text must be text"):
        v2.encode_prompt(PROMPT, b"hi")
    with pytest.raises(InvalidRequestError, match="markup"):
        v2.encode_prompt(PROMPT, "hi <|xx|>")
    for lone in ("我有3\udc80个苹果", "no digit \udc80 here"):  # TypeError deep in wetext, or
        with pytest.raises(InvalidRequestError, match="Unicode") as info:  # at every use
            v2.encode_prompt(PROMPT, lone)
        assert info.value.param == "prompt_text"
    # an instruction and a transcript enter every segment's prompt whole: they are bounded
    long = "speak slowly " * 400
    with pytest.raises(InvalidRequestError, match="at most 4096"):
        v2.encode_prompt(PROMPT, long)
    for field in ("instruct", "prompt_text"):
        request = SynthesisRequest(Mode.INSTRUCT, "你好。", prompt_audio=PROMPT, **{field: long})
        with pytest.raises(InvalidRequestError, match=f"{field} is 5200 characters"):
            list(v2.synthesize(request))
    for option in (dict(prompt_cache_mb=1.5), dict(max_batch="4")):
        with pytest.raises(InvalidRequestError, match="whole number"):
            Engine.check_load_options(**option)


def _llm_text(engine: Engine, request: SynthesisRequest, prompt=None) -> list[str]:
    """What the LLM reads for each segment of a request: its prompt text ‖ its text."""
    prompt = engine._prompt(request, prompt)
    decode = engine.tokenizer._tokenizer.decode
    texts = []
    for segment in engine._segments(request):
        inputs = engine._inputs(request, segment, prompt)
        if hasattr(inputs.text, "shape"):
            ids = inputs.text[0].tolist()
        else:  # streamed: the pieces' tokens one by one
            ids = [int(token[0]) for token in inputs.text]
        prompt_ids = inputs.prompt_text[0].tolist()
        texts.append(
            f"{decode(prompt_ids, skip_special_tokens=False)} ‖ {decode(ids, skip_special_tokens=False)}"
        )
    return texts


INSTRUCTION = "用粤语说这句话<|endofprompt|>"
CANONICAL = "You are a helpful assistant.<|endofprompt|>"


def test_a_cosyvoice3_texts_own_instruction_is_obeyed_never_spoken(v3: Engine) -> None:
    """Whole text: cross-lingual reads it as written (upstream, issue #1472); zero-shot had the
    added system prompt + transcript followed by the instruction, spoken: it takes the
    transcript's system prompt's place instead (where upstream's zero-shot prompts carry it)."""
    text = INSTRUCTION + "我最近迷上一部经典港剧。"

    def llm(mode: Mode, text: str, **fields: str) -> list[str]:
        request = SynthesisRequest(mode, text, prompt_audio=PROMPT, **fields)
        return _llm_text(v3, request)

    assert llm(Mode.CROSS_LINGUAL, text) == [f" ‖ {text}"]
    moved = [f"{INSTRUCTION}{PROMPT_TEXT} ‖ 我最近迷上一部经典港剧。"]
    assert llm(Mode.ZERO_SHOT, text, prompt_text=PROMPT_TEXT) == moved
    assert llm(Mode.ZERO_SHOT, text, prompt_text=CANONICAL + PROMPT_TEXT) == moved
    canonical = [f"{CANONICAL}{PROMPT_TEXT} ‖ 我最近。"]
    assert llm(Mode.ZERO_SHOT, CANONICAL + "我最近。", prompt_text=PROMPT_TEXT) == canonical
    instructed = ["You are a helpful assistant. 请用广东话表达。<|endofprompt|> ‖ 我最近。"]
    assert llm(Mode.INSTRUCT, CANONICAL + "我最近。", instruct="请用广东话表达。") == instructed
    # two instructions, or a second mark (never valid mid-text): errors, not spoken
    with pytest.raises(InvalidRequestError, match="own instruction.*as instruct"):
        llm(Mode.INSTRUCT, text, instruct="请用广东话表达。")
    with pytest.raises(InvalidRequestError, match="second <.endofprompt.>.*instruct"):
        llm(Mode.CROSS_LINGUAL, text + "然后<|endofprompt|>再说。")
    # a saved voice's transcript stored as tokens (official spk2info), with its system prompt
    voice = v3.encode_prompt(PROMPT, CANONICAL + PROMPT_TEXT)
    voice = replace(voice, prompt_tokens=v3._tokens(voice.prompt_text))
    request = SynthesisRequest(Mode.ZERO_SHOT, CANONICAL + "我最近。")
    assert _llm_text(v3, request, voice) == canonical
    with pytest.raises(InvalidRequestError, match="own instruction"):
        _llm_text(v3, SynthesisRequest(Mode.ZERO_SHOT, text), voice)


@pytest.mark.parametrize(
    ("pieces", "words"),
    [
        ([INSTRUCTION + "我最近迷上", "一部经典港剧。"], "own instruction.*as instruct"),
        (["用粤语", "说这句话", "<|endofprompt|>我最近迷上", "一部经典港剧。"], "after words"),
        (["You are a helpful assistant. 请用广东话表达。", "<|endofprompt|>我最近。"], "own"),
    ],
)
def test_a_cosyvoice3_streamed_instruction_is_refused_not_dropped_or_spoken(
    v3: Engine, pieces: list[str], words: str
) -> None:
    """Streamed, the instruction had been replaced by the canonical prompt (in the first piece
    or opening as it does) or spoken with a second <|endofprompt|> mid-text (split): the LLM
    reads a stream's system prompt before the stream, so it is refused, naming instruct."""
    for mode, fields in ((Mode.CROSS_LINGUAL, {}), (Mode.ZERO_SHOT, {"prompt_text": PROMPT_TEXT})):
        request = SynthesisRequest(mode, iter(pieces), prompt_audio=PROMPT, **fields)
        with pytest.raises(InvalidRequestError, match=words) as error:
            _llm_text(v3, request)
        assert error.value.param == "text" and "instruct" in str(error.value)
    # through synthesize too (from the text's feeder thread)
    request = SynthesisRequest(Mode.CROSS_LINGUAL, iter(pieces), prompt_audio=PROMPT, seed=2,
                               max_speech_tokens=20, ignore_eos=True)  # fmt: skip
    if words != "after words":  # (a bounded segment stops reading before the mark's piece)
        with pytest.raises(InvalidRequestError, match=words):
            list(v3.synthesize(request))
    # the canonical one is the prompt the engine puts before the stream: dropped
    canonical = ["You are a helpful assistant.", "<|endofprompt|>我最近。"]
    request = SynthesisRequest(Mode.ZERO_SHOT, iter(canonical), prompt_audio=PROMPT,
                               prompt_text=PROMPT_TEXT)  # fmt: skip
    assert _llm_text(v3, request) == [f"{CANONICAL}{PROMPT_TEXT} ‖ 我最近。"]


def test_a_pinyin_tone_typed_as_a_combining_mark_reaches_the_model_as_the_tag(v3: Engine) -> None:
    """[h][a\u0300o] (NFD) was refused as unknown markup: request texts are composed (NFC)."""
    import unicodedata

    composed = "他[h][ào]学。"
    audio = {}
    for form in ("NFC", "NFD"):
        request = SynthesisRequest(Mode.CROSS_LINGUAL, unicodedata.normalize(form, composed),
                                   prompt_audio=PROMPT, seed=4, max_speech_tokens=20)  # fmt: skip
        audio[form] = _audio(v3, request)[0]
    np.testing.assert_array_equal(audio["NFD"], audio["NFC"])


def _short(seed: int, text: str = "今天天气真好。") -> SynthesisRequest:
    return SynthesisRequest(Mode.PRESET, text, voice="中文女", seed=seed, max_speech_tokens=20,
                            ignore_eos=True, stream=True)  # fmt: skip


def test_a_slow_progress_callback_holds_up_no_other_request(v2: Engine) -> None:
    """A progress callback runs on its caller's side (synthesize: the thread iterating it;
    submit: a thread of the request's own), never on an engine thread: callbacks that block
    hold up no other request. They had run on the audio workers every request shares: two
    callbacks sleeping 5 s made another request's first audio 4.8 s late instead of 0.2 s."""
    release = threading.Event()
    calls: list[tuple[str, int, int]] = []

    def blocking(done: int, total: int) -> None:
        calls.append((threading.current_thread().name, done, total))
        release.wait(60)

    iterated: list = []
    reader = threading.Thread(
        target=lambda: iterated.extend(v2.synthesize(_short(10), blocking)), name="reader"
    )
    submitted = QueueSink()
    try:
        reader.start()
        v2.submit(_short(11), submitted, blocking)
        # both requests' audio is out and their callbacks block (on the two audio workers, each
        # on its own, before)
        deadline = time.monotonic() + 60
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 2, calls
        other: list = []
        start = time.monotonic()
        unrelated = threading.Thread(target=lambda: other.extend(v2.synthesize(_short(2))))
        unrelated.start()
        unrelated.join(30)
        assert other and other[-1].final, f"held up {time.monotonic() - start:.1f} s"
        names = {name for name, _, _ in calls}
        assert "reader" in names and not any(name.startswith("engine") for name in names), names
    finally:
        release.set()
        reader.join(60)
    assert iterated and iterated[-1].final
    chunks = list(submitted)  # the submitted request's sink ends after its progress
    assert chunks and chunks[-1].final
    assert sorted((done, total) for _, done, total in calls) == [(1, 1), (1, 1)]


def test_progress_comes_in_order_with_the_chunks_on_the_iterating_thread(v2: Engine) -> None:
    """synthesize: progress(k, n) is called in the iterating thread once segment k's last chunk
    has been yielded, before any chunk of a later segment and before the iteration ends; a
    callback's error ends the iteration. submit: the same order on the request's own thread,
    which then calls the sink."""
    request = _short(5, "第一句话在这里。" * 12 + "最后一句。")
    assert len(v2._segments(request)) == 2
    events: list = []
    me = threading.current_thread()

    def note(done: int, total: int) -> None:
        assert threading.current_thread() is me
        events.append(("progress", done, total))

    for chunk in v2.synthesize(request, note):
        events.append(("chunk", chunk.segment, chunk.final))
    assert events[-1] == ("progress", 2, 2)
    seen = [e for e in events if e[0] == "progress"]
    assert seen == [("progress", 1, 2), ("progress", 2, 2)]
    first = events.index(("progress", 1, 2))
    assert all(e[1] == 0 for e in events[:first]) and all(e[1] == 1 for e in events[first + 1 : -1])

    class Noting(QueueSink):
        def chunk(self, chunk) -> None:  # noqa: ANN001
            relayed.append(("chunk", chunk.segment, chunk.final))
            super().chunk(chunk)

    relayed: list = []
    sink = Noting()
    v2.submit(request, sink, lambda done, total: relayed.append(("progress", done, total)))
    list(sink)
    assert relayed == events

    def failing(done: int, total: int) -> None:
        raise ZeroDivisionError("the caller's callback")

    with pytest.raises(ZeroDivisionError):
        list(v2.synthesize(request, failing))
    sink = QueueSink()
    v2.submit(request, sink, failing)
    with pytest.raises(ZeroDivisionError):
        list(sink)


def test_a_progress_that_is_not_callable_is_refused_before_any_work(
    v2: Engine, monkeypatch, tmp_path
) -> None:
    """progress=5 had been taken: the first segment was computed, then a bare TypeError."""
    from cosyvoice_lite.engine import synthesize_to_file

    def no_work(job) -> None:  # noqa: ANN001
        raise AssertionError("the request was queued")

    monkeypatch.setattr(v2.loop, "submit", no_work)
    for wrong in (5, "progress"):
        with pytest.raises(InvalidRequestError, match="progress must be") as info:
            v2.submit(_short(1), QueueSink(), wrong)
        assert info.value.param == "progress"
        with pytest.raises(InvalidRequestError, match="progress must be"):
            next(v2.synthesize(_short(1), wrong))
        with pytest.raises(InvalidRequestError, match="progress must be"):
            synthesize_to_file(v2, _short(1), tmp_path / "out.wav", wrong)
    assert not list(tmp_path.iterdir())
