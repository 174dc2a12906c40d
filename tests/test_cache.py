"""GrowingBuffer: the rows a stream's caches hold, their growth and their shared prefix."""

from __future__ import annotations

import torch

from cosyvoice_lite.networks.cache import (
    MAPPED_BYTES,
    MIN_CAPACITY,
    AttentionHistory,
    GrowingBuffer,
    joined,
)


def test_chunk_appends_reallocate_at_most_every_other_chunk() -> None:
    """Appending a streamed flow's chunks (50, 50, 100, 100, ... frames) keeps every row and
    reallocates at most every other append, with at most a quarter or one append of slack."""
    buffer, rows, moved, data = GrowingBuffer(), [], [], None
    for size in [50, 50, 100, 100, 100, 100, 100, 100, 100, 100]:
        new = torch.randn(1, 2, size, 4)
        rows.append(new)
        seen = buffer.append(new)
        assert torch.equal(seen, torch.cat(rows, dim=-2))
        capacity = buffer.data.size(-2)
        assert capacity <= max(buffer.length * 5 // 4, buffer.length + max(size, MIN_CAPACITY))
        moved.append(buffer.data is not data)
        data = buffer.data
    assert not any(a and b for a, b in zip(moved[1:], moved[2:], strict=False))
    assert sum(moved) <= 5


def test_a_fork_reads_the_shared_prefix_and_stores_only_its_own_rows() -> None:
    prompt = torch.randn(1, 2, 30, 4)
    template = GrowingBuffer()
    template.append(prompt)
    fork = template.fork()
    own = torch.randn(1, 2, 5, 4)
    assert torch.equal(fork.append(own), own)
    assert [torch.equal(p, prompt) for p in fork.parts()] == [True]
    assert fork.length == 35 and fork.valid().size(-2) == 5


def test_a_first_write_is_exact_and_a_primed_prompt_forks_without_a_copy() -> None:
    """A whole prompt written at once takes exactly its rows, so its forks share that storage
    (a primed voice's ~1 GB of CosyVoice2 caches is not copied when it is kept); a small first
    write reserves MIN_CAPACITY more rows, and the next append grows the buffer as usual."""
    template = GrowingBuffer()
    prompt = torch.randn(1, 2, 245, 4)
    template.append(prompt)
    assert template.data.size(-2) == 245
    fork = template.fork()
    assert fork.shared.data_ptr() == template.data.data_ptr()
    assert torch.equal(fork.parts()[0], prompt)
    template.append(torch.randn(1, 2, 1, 4))
    assert template.data.size(-2) == 246 + 246 // 4
    small = GrowingBuffer()
    small.append(torch.randn(1, 2, 3, 4))
    assert small.data.size(-2) == 3 + MIN_CAPACITY


def test_float16_rows_come_back_in_the_dtype_written() -> None:
    buffer = GrowingBuffer(torch.float16)
    rows = torch.randn(1, 2, 10, 4)
    seen = buffer.append(rows)
    assert buffer.data.dtype == torch.float16 and seen.dtype == torch.float32
    torch.testing.assert_close(seen, rows, rtol=1e-3, atol=1e-3)
    fork = buffer.fork()
    assert fork.dtype == torch.float16 and fork.parts()[0].dtype == torch.float16


def test_large_buffers_on_a_cpu_keep_their_rows_through_regrowth() -> None:
    """Buffers of MAPPED_BYTES or more are mappings of their own (freed straight to the OS):
    the same rows through first writes, regrowth, rewrites and a float16 store."""
    g = torch.Generator().manual_seed(0)
    first = torch.randn(8, 100, 64, generator=g)  # 200 KB: past MAPPED_BYTES
    more = [torch.randn(8, 50, 64, generator=g) for _ in range(4)]
    assert first.numel() * first.element_size() >= MAPPED_BYTES
    for dtype in (None, torch.float16):
        buffer = GrowingBuffer(dtype)
        buffer.write(0, first)
        for rows in more:
            seen = buffer.append(rows)
        expected = torch.cat([first, *more], dim=1)
        if dtype is not None:
            expected = expected.to(dtype).float()
        assert torch.equal(seen, expected)
        again = buffer.write(120, more[0])  # a rewrite drops what followed
        rewritten = more[0] if dtype is None else more[0].to(dtype).float()
        assert torch.equal(again, torch.cat([expected[:, :120], rewritten], dim=1))


def test_mapped_buffers_are_counted_until_freed() -> None:
    """Each mapped buffer counts against half the kernel's mapping limit until its last tensor
    is freed (past the budget, buffers come from the heap)."""
    import gc

    from cosyvoice_lite.networks.cache import _Mappings

    gc.collect()  # earlier tests' unreachable engines hold mapped buffers until collected
    before = _Mappings.live
    buffer = GrowingBuffer()
    buffer.write(0, torch.zeros(8, 100, 64))
    assert _Mappings.live == before + (1 if _Mappings.budget else 0)
    del buffer
    gc.collect()
    assert _Mappings.live == before


def test_an_increment_reads_a_history_as_the_attention_would() -> None:
    """What a traced increment call reads of a forked history (the shared prompt, its own rows,
    the chunk mask over them and the new frames), in any float dtype: -1e10 overflows float16
    to -inf, as the official's mask does."""
    prompt = AttentionHistory(torch.float16, granule=10)
    prompt.append(torch.randn(1, 2, 20, 4), torch.randn(1, 2, 20, 4))  # two whole chunks
    stream = prompt.fork()
    stream.append(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))  # half of the next chunk
    empty = torch.zeros(1, 2, 0, 4)
    keys, values = stream.before(empty)
    assert [k.shape[-2] for k in keys] == [20, 5] and [v.shape[-2] for v in values] == [20, 5]
    assert (
        stream.rounds_to(torch.float32) == torch.float16 and stream.rounds_to(torch.float16) is None
    )
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        bias = stream.chunk_bias(25, 10, 10, torch.zeros(1, dtype=dtype), -1.0e10)
        assert bias.shape == (10, 35) and bias.dtype == dtype
        # frames 25-29 see up to frame 29, frames 30-34 all 35
        assert (
            (bias[:5, 30:].float() < -1e9).all()
            and (bias[:5, :30] == 0).all()
            and (bias[5:] == 0).all()
        )
    assert torch.isinf(
        stream.chunk_bias(25, 10, 10, torch.zeros(1, dtype=torch.float16), -1e10)
    ).any()
    # whole chunks: no mask at all (zeros)
    assert not stream.chunk_bias(25, 5, 10, torch.zeros(1), -torch.inf).any()
    stream.freeze()
    keys, _ = stream.before(empty)
    assert [k.shape[-2] for k in keys] == [20, 5] and stream.rounds_to(torch.float32) is None


def test_an_increment_joins_its_history_as_casting_each_part_would() -> None:
    """``joined``: the stored parts converted as they are copied, the new rows read back through
    the stored dtype, all in the new rows' dtype: the floats of casting every part first; a
    stored dtype the new one does not hold (float16 parts of a bfloat16 run) is cast first."""
    history = AttentionHistory(torch.float16)
    history.append(torch.randn(1, 2, 20, 4), torch.randn(1, 2, 20, 4))
    stream = history.fork()
    stream.append(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    keys, _ = stream.before(torch.zeros(1, 2, 0, 4))
    for dtype in (torch.float32, torch.bfloat16):
        new = torch.randn(1, 2, 3, 4).to(dtype)
        stored = stream.rounds_to(dtype)
        assert stored == torch.float16
        expected = torch.cat([*(k.to(dtype) for k in keys), new.to(stored).to(dtype)], dim=-2)
        seen = joined(keys, new, stored)
        assert seen.dtype == dtype and torch.equal(seen, expected)
    new = torch.randn(1, 2, 3, 4)
    assert torch.equal(joined([new[..., :2, :]], new[..., 2:, :], None), new)
    # appending stores without reading back; the stored rows come back through ``before``
    stream.append(new, new)
    keys, _ = stream.before(torch.zeros(1, 2, 0, 4))
    assert torch.equal(keys[1][..., 5:, :], new.half())
