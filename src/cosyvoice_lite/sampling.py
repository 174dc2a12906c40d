"""Speech-token sampling with the official semantics (repetition-aware top-p/top-k, "RAS").

Every draw uses the request's own ``torch.Generator``; with a generator seeded like the official
global RNG the draws are identical to ``cosyvoice.utils.common.ras_sampling``. ``sample_rows``
chooses the tokens of many requests at once (the engine loop's decoding step), each exactly as its
own sampler alone would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ModelOutputError, non_finite_cause

Sampler = Callable[[torch.Tensor, Sequence[int]], int]


@dataclass(frozen=True)
class RasSampler:
    """Nucleus sampling with a repetition-aware fallback to the full distribution (VALL-E 2).

    ``__call__(scores, decoded)`` takes the 1-D log-probabilities of the next token and the tokens
    decoded so far and returns the chosen id. ``scores`` is modified in place, as the official does.
    """

    generator: torch.Generator
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1

    def __call__(self, scores: torch.Tensor, decoded: Sequence[int]) -> int:
        probs, order = scores.softmax(dim=0).sort(descending=True, stable=True)
        head = probs[: self.top_k].float().cpu().numpy()
        keep = self.nucleus_size(head)
        check_probabilities(head[:keep])
        token = int(order[self._draw(probs[:keep])])
        return self.unless_repeated(token, scores, decoded)

    def nucleus_size(self, head: np.ndarray) -> int:
        """How many of the most likely tokens (``head``: the top-k probabilities, descending)
        the nucleus keeps. The official loop adds float32 probabilities one at a time and keeps
        every token until the running sum reaches top_p (the crossing token included); replay
        it in float32 exactly."""
        top_p = np.float32(self.top_p)
        total, n_keep = np.float32(0.0), 0
        for p in head[: self.top_k]:
            if total >= top_p:
                break
            total = np.float32(total + p)
            n_keep += 1
        return n_keep

    def unless_repeated(self, token: int, scores: torch.Tensor, decoded: Sequence[int]) -> int:
        """``token`` (the nucleus draw), or, when it already fills ``tau_r`` of the last
        ``win_size`` tokens, a draw from the whole distribution without it."""
        window = decoded[-self.win_size :]
        repeats = sum(1 for t in window if t == token)
        if repeats >= self.win_size * self.tau_r:
            scores[token] = -float("inf")
            token = self._draw(scores.softmax(dim=0))
        return token

    def _draw(self, probs: torch.Tensor) -> int:
        # on the generator's device: a CPU generator draws the CPU's tokens on any device
        probs = probs.to(self.generator.device)
        return int(torch.multinomial(probs, 1, replacement=True, generator=self.generator))


def sample_rows(
    rows: Sequence[tuple[torch.Tensor, Sequence[int], Sampler]],
) -> list[int | BaseException]:
    """The token of each row (1-D scores, tokens decoded so far, its sampler), or the error its
    draw raised (that row alone fails).

    Rows of ``RasSampler``s have their softmax and sort computed as one batch and their top-k
    heads copied to the host at once, each draw queued on the device (``_draw_index``) and the
    chosen ids read back at once: two host synchronisations per step instead of ~5 per row (what
    a GPU waits for), plus one per repetition fallback (rare). Each row still draws from its own
    generator in its own order, over the same floats as alone (a row's softmax and stable sort
    do not depend on the other rows), so its tokens are those it gets alone. Other samplers are
    called as they are."""
    tokens: list[int | BaseException | None] = [None] * len(rows)
    ras: list[int] = []
    for i, (scores, decoded, sampler) in enumerate(rows):
        if isinstance(sampler, RasSampler):
            ras.append(i)
        else:
            tokens[i] = _call(sampler, scores, decoded)
    if ras:
        samplers: list[RasSampler] = [rows[i][2] for i in ras]  # type: ignore[misc]
        probs, order = (
            torch.stack([rows[i][0] for i in ras])
            .softmax(dim=-1)
            .sort(descending=True, stable=True)
        )
        heads = probs[:, : max(s.top_k for s in samplers)].float().cpu().numpy()
        drawn: list[tuple[int, torch.Tensor]] = []
        for row, (i, sampler) in enumerate(zip(ras, samplers, strict=True)):
            try:
                keep = sampler.nucleus_size(heads[row])
                drawn.append((row, _draw_index(probs[row, :keep], heads[row, :keep], sampler)))
            except Exception as exc:  # noqa: BLE001 - e.g. NaN scores: this row fails alone
                tokens[i] = exc
        if drawn:
            picks = torch.stack([pick for _, pick in drawn])  # [n, 1]
            ids = order[[row for row, _ in drawn]].gather(1, picks).flatten().tolist()
            for (row, _), token in zip(drawn, ids, strict=True):
                i = ras[row]
                scores, decoded, _ = rows[i]
                tokens[i] = _call(samplers[row].unless_repeated, token, scores, decoded)
    return tokens  # type: ignore[return-value]


def _draw_index(probs: torch.Tensor, host: np.ndarray, sampler: RasSampler) -> torch.Tensor:
    """``torch.multinomial(probs, 1, replacement=True, generator)`` as torch computes one draw
    (argmax of probs / q, q ~ Exp(1) drawn from the generator: the same values and the same use of
    the generator), without its two host synchronisations that check ``probs``: they are checked
    here on ``host``, the same values already on the host. Returns the index [1] on probs' device.
    q is drawn on the generator's device (a CPU generator gives the CPU's draws on any device).
    The sampling tests compare it with the sampler alone, so a change in torch's algorithm shows."""
    check_probabilities(host)
    generator = sampler.generator
    q = torch.empty(probs.shape, dtype=probs.dtype, device=generator.device)
    q = q.exponential_(1, generator=generator).to(probs.device)
    return torch.argmax(probs / q, dim=-1, keepdim=True)


def check_probabilities(head: np.ndarray) -> None:
    """ModelOutputError unless ``head`` (a row's most likely probabilities, on the host) are
    finite, not negative and not all zero: NaN or infinite log-probabilities make every
    probability of their row NaN (torch's multinomial raised a plain RuntimeError that named a
    probability tensor, which a server answered as an unexplained 500)."""
    if not (np.isfinite(head).all() and (head >= 0).all()) or head.sum() <= 0:
        raise ModelOutputError(
            "the model's speech-token probabilities are NaN, infinite or all zero: "
            + non_finite_cause()
        )


def _call(fn: Callable, *args) -> int | BaseException:  # noqa: ANN002
    try:
        return int(fn(*args))
    except Exception as exc:  # noqa: BLE001 - handed to its row
        return exc
