"""Flow rows on threads (row_parallel.py): each row computed alone, or one share of the rows per
thread, in order, with one torch thread; the tiny v2/v3 flows give the same mel split as in one
batch, and streams together equal alone."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from cosyvoice_lite.device import resolve_placement
from cosyvoice_lite.modeldir import open_model_dir
from cosyvoice_lite.pipelines.factory import load_network
from cosyvoice_lite.row_parallel import SERIAL, RowSplit, at_most, call_on_threads, set_own_threads

MODELS = Path(__file__).resolve().parent / "data" / "models"


@pytest.fixture(scope="module")
def split() -> RowSplit:
    rows = RowSplit(2)
    yield rows
    rows.close()


@pytest.fixture(scope="module")
def shares() -> RowSplit:
    rows = RowSplit(2, shares=True)
    yield rows
    rows.close()


def test_an_idle_helper_keeps_nothing_of_its_last_call(split: RowSplit) -> None:
    """The row function reaches the caller's state (a stream's flow caches, ~1 GB for a
    CosyVoice2 float32 stream): once ``map`` returns, no helper thread may keep it alive."""

    class State:  # stands for a stream's caches
        pass

    state = State()
    alive = weakref.ref(state)

    def row_of(rows: slice, state: State = state) -> torch.Tensor:
        return torch.zeros(1)

    split.map(row_of, 2)
    del state, row_of
    deadline = time.monotonic() + 2.0  # a helper may still be between its result and its next get
    while alive() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert alive() is None


def test_rows_are_computed_alone_in_order(split: RowSplit) -> None:
    seen: list[tuple[int, int, str, int]] = []
    lock = threading.Lock()
    batch = torch.arange(10.0).view(5, 2)

    def double(rows: slice) -> torch.Tensor:
        with lock:
            name = threading.current_thread().name
            seen.append((rows.start, rows.stop, name, torch.get_num_threads()))
        return batch[rows] * 2

    with torch.inference_mode():
        out = split.map(double, 5)
    assert torch.equal(out, batch * 2) and out.is_inference()
    assert sorted((a, b) for a, b, _, _ in seen) == [(r, r + 1) for r in range(5)]
    assert {name for _, _, name, _ in seen} <= {"cosyvoice-rows-0", "cosyvoice-rows-1"}
    assert {threads for *_, threads in seen} == {1}  # no OpenMP wake-ups inside a row
    calls: list[slice] = []
    assert torch.equal(SERIAL.map(lambda rows: calls.append(rows) or batch[rows], 5), batch)
    assert calls == [slice(0, 5)]  # serially: one call with every row


def test_shares_are_one_contiguous_call_per_thread(shares: RowSplit) -> None:
    seen: list[tuple[int, int]] = []
    batch = torch.arange(14.0).view(7, 2)

    def double(rows: slice) -> torch.Tensor:
        seen.append((rows.start, rows.stop))
        return batch[rows] * 2

    assert torch.equal(shares.map(double, 7), batch * 2)
    assert sorted(seen) == [(0, 3), (3, 7)]
    seen.clear()
    assert torch.equal(shares.map(double, 1), batch[:1] * 2) and seen == [(0, 1)]


@pytest.mark.parametrize("kind", ["split", "shares"])
def test_at_most_narrows_the_calling_threads_small_calls_while_its_condition_holds(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Under ``at_most(1)`` a call of fewer than two rows per helper goes to one helper (its rows
    alone, or one share), in order; the condition is looked at each call; larger calls and other
    threads' calls keep every helper."""
    rows: RowSplit = request.getfixturevalue(kind)
    batch = torch.arange(10.0).view(5, 2)
    seen: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def double(part: slice) -> torch.Tensor:
        with lock:
            seen.append((part.start, part.stop, threading.current_thread().name))
        return batch[part] * 2

    def parts(count: int, thread: threading.Thread | None = None) -> list[tuple[int, int]]:
        seen.clear()
        if thread is None:
            assert torch.equal(rows.map(double, count), batch[:count] * 2)
        else:
            thread.start()
            thread.join()
        return sorted((a, b) for a, b, _ in seen)

    narrow = True
    alone = [(r, r + 1) for r in range(3)]
    with at_most(1, while_=lambda: narrow):
        assert parts(3) == ([(0, 3)] if rows.shares else alone)
        assert len({name for *_, name in seen}) == 1
        beside = threading.Thread(target=lambda: rows.map(double, 3))
        assert parts(3, beside) == ([(0, 1), (1, 3)] if rows.shares else alone)
        assert parts(4) == ([(0, 2), (2, 4)] if rows.shares else alone + [(3, 4)])
        narrow = False
        assert parts(3) == ([(0, 1), (1, 3)] if rows.shares else alone)
    with pytest.raises(ValueError, match="at least 1"), at_most(0):
        pass


def test_helpers_leave_the_thread_counts_of_others_alone() -> None:
    before = torch.get_num_threads()
    rows = RowSplit(2)
    counts: list[int] = []
    fresh = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    rows.close()
    assert torch.get_num_threads() == before and counts == [before]


def test_close_waits_for_the_helpers_to_end() -> None:
    # a helper still ending while the interpreter exits aborts the process (status 134)
    before = set(threading.enumerate())
    rows = RowSplit(2)
    x = torch.randn(4, 16, 16)
    rows.map(lambda r: x[r] @ x[r], 4)
    helpers = set(threading.enumerate()) - before
    assert len(helpers) == 2
    rows.close()
    assert not any(helper.is_alive() for helper in helpers)
    assert torch.equal(rows.map(lambda r: x[r], 4), x)  # closed: serially, on the caller


def test_a_failing_row_fails_the_call_after_every_row_is_done(split: RowSplit) -> None:
    done: list[int] = []

    def fail_row_0(rows: slice) -> torch.Tensor:
        if rows.start == 0:
            raise ValueError("row 0 is bad")
        done.append(rows.start)
        return torch.zeros(1)

    with pytest.raises(ValueError, match="row 0 is bad"):
        split.map(fail_row_0, 3)
    assert sorted(done) == [1, 2]
    assert torch.equal(split.map(lambda rows: torch.ones(1), 2), torch.ones(2))  # still serving


def _flow(version: int) -> torch.nn.Module:
    directory = open_model_dir(MODELS / f"v{version}-tiny")
    return load_network(directory, "flow", "flow.pt", resolve_placement("cpu", "float32"))


def _voice(flow: torch.nn.Module, prompt: int = 12, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    vocab = flow.input_embedding.num_embeddings
    tokens = torch.randint(0, vocab, (1, prompt + 40), generator=g)
    feat = torch.randn(1, 2 * prompt, 80, generator=g)
    embedding = torch.randn(1, flow.spk_embed_affine_layer.in_features, generator=g)
    return tokens[:, :prompt], tokens[:, prompt:], feat, embedding


def _stream(flow: torch.nn.Module, voices: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """The voices' new tokens streamed together (chunks of 7 tokens), each stream's mel."""
    states = [flow.new_stream(p, f, e) for p, _, f, e in voices]
    mels: list[list[torch.Tensor]] = [[] for _ in voices]
    for start in range(0, 40, 7):
        last = start + 7 >= 40
        steps = flow.stream_steps(
            states, [new[:, start : start + 7] for _, new, _, _ in voices], [last] * len(voices)
        )
        for mel, out in zip(steps, mels, strict=True):
            out.append(mel)
    return [torch.cat(out, dim=2) for out in mels]


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("kind", ["alone", "shares"])
def test_streams_split_equal_one_batch_and_together_equal_alone(
    version: int, kind: str, request: pytest.FixtureRequest
) -> None:
    """Split (each row alone, or in shares: the engine's choice past ``exact_float32``), a
    stream's mel is the same whichever streams are computed with it, to the bit."""
    flow = _flow(version)
    voices = [_voice(flow, 12, 0), _voice(flow, 17, 1), _voice(flow, 9, 2)]
    batch = [_stream(flow, [voice])[0] for voice in voices]
    flow.decoder.set_row_split(request.getfixturevalue("split" if kind == "alone" else kind))
    try:
        alone = [_stream(flow, [voice])[0] for voice in voices]
        together = _stream(flow, voices)
    finally:
        flow.decoder.set_row_split(SERIAL)
    for a, b, c in zip(batch, alone, together, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        assert torch.equal(c, b)


@pytest.mark.parametrize("version", [1, 2])
def test_whole_utterances_split_equal_one_batch(version: int, split: RowSplit) -> None:
    flow = _flow(version)
    prompt, new, feat, embedding = _voice(flow)
    length = torch.tensor([new.shape[1]])
    args = dict(
        token=new,
        token_len=length,
        prompt_token=prompt,
        prompt_token_len=torch.tensor([prompt.shape[1]]),
        prompt_feat=feat,
        prompt_feat_len=torch.tensor([feat.shape[1]]),
        embedding=embedding,
    )
    if version == 1:
        args.update(flow_cache=None, generator=torch.Generator().manual_seed(3))
    else:
        args.update(streaming=False, finalize=True)
    batch = flow.inference(**args)[0]
    if version == 1:
        args["generator"] = torch.Generator().manual_seed(3)
    flow.decoder.set_row_split(split, utterances=True)
    try:
        rows = flow.inference(**args)[0]
    finally:
        flow.decoder.set_row_split(SERIAL)
    torch.testing.assert_close(rows, batch, atol=1e-5, rtol=0)


@pytest.mark.parametrize("exact", [False, True])
def test_the_engine_shares_rows_unless_exact_float32(exact: bool) -> None:
    """On a CPU with 2 torch threads the engine splits the flow's rows: in shares (batched
    products, the floats of each row alone), or, with torch's default float32 products that may
    round a row differently in another batch, each row alone."""
    from cosyvoice_lite.engine import Engine

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = Engine.load(MODELS / "v2-tiny", exact_float32=exact)
    finally:
        torch.set_num_threads(before)
    try:
        rows = engine.pipeline.flow.decoder.stream_rows
        assert rows.threads == 2 and rows.shares is not exact
    finally:
        engine.close()


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs a process with 2 torch threads")
def test_a_threads_own_count_is_not_the_one_threads_starting_later_take() -> None:
    """A decoding thread runs on one torch thread and its products on all (``call_on_threads``).
    Switched with torch.set_num_threads, the count every thread starting later takes switched
    too: a thread started meanwhile (a second engine's load, a program's pool) kept one torch
    thread for its life."""
    process = torch.get_num_threads()
    seen: dict[str, int] = {}

    def started_now() -> int:
        counts: list[int] = []
        thread = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return counts[0]

    def decoding_thread() -> None:
        set_own_threads(1)
        seen["own"] = torch.get_num_threads()
        seen["started while at one"] = started_now()
        seen["in a product"] = call_on_threads(process, torch.get_num_threads)
        seen["started after a product"] = started_now()
        seen["own after"] = torch.get_num_threads()

    thread = threading.Thread(target=decoding_thread)
    thread.start()
    thread.join()
    assert seen == {
        "own": 1,
        "started while at one": process,
        "in a product": process,
        "started after a product": process,
        "own after": 1,
    }
    assert torch.get_num_threads() == process
