"""Sampling many rows at once (the engine loop's step) equals each row's sampler alone."""

from __future__ import annotations

import torch

from cosyvoice_lite.sampling import RasSampler, sample_rows

VOCAB = 300


def _rows(seed: int, count: int) -> list[tuple[torch.Tensor, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for row in range(count):
        scores = (torch.randn(VOCAB, generator=g) * (1 + row)).log_softmax(dim=0)
        # every other row has just repeated its most likely token: the repetition fallback
        top = int(scores.argmax())
        rows.append((scores, [top] * 3 if row % 2 else []))
    return rows


def _sampler(seed: int, **kwargs) -> RasSampler:
    return RasSampler(torch.Generator().manual_seed(seed), **kwargs)


def test_rows_sampled_together_equal_each_alone() -> None:
    settings = [{}, {"top_k": 5}, {"top_p": 0.3}, {"top_k": 40, "top_p": 0.95}, {}]
    together = [_sampler(10 + i, **kw) for i, kw in enumerate(settings)]
    alone = [_sampler(10 + i, **kw) for i, kw in enumerate(settings)]
    for step in range(20):
        rows = _rows(step, len(settings))
        tokens = sample_rows(
            [(s.clone(), d, sampler) for (s, d), sampler in zip(rows, together, strict=True)]
        )
        expected = [sampler(s.clone(), d) for (s, d), sampler in zip(rows, alone, strict=True)]
        assert tokens == expected
    # the generators were consumed alike, the repetition fallback included
    for a, b in zip(together, alone, strict=True):
        assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_a_row_whose_draw_fails_fails_alone() -> None:
    (good, decoded), (bad, _) = _rows(0, 2)
    bad = torch.full_like(bad, float("nan"))
    ref = _sampler(1)(good.clone(), decoded)
    tokens = sample_rows([(bad, [], _sampler(2)), (good.clone(), decoded, _sampler(1))])
    assert isinstance(tokens[0], RuntimeError)
    assert tokens[1] == ref


def test_other_samplers_are_called_as_they_are() -> None:
    (scores, decoded), (other, _) = _rows(3, 2)
    tokens = sample_rows([(scores, decoded, lambda s, d: 7), (other, [], _sampler(4))])
    assert tokens == [7, _sampler(4)(other.clone(), [])]
