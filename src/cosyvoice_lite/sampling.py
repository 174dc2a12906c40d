"""Speech-token sampling with the official semantics (repetition-aware top-p/top-k, "RAS").

Every draw uses the request's own ``torch.Generator``; with a generator seeded like the official
global RNG the draws are identical to ``cosyvoice.utils.common.ras_sampling``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


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
        token = self._nucleus(scores)
        window = decoded[-self.win_size :]
        repeats = sum(1 for t in window if t == token)
        if repeats >= self.win_size * self.tau_r:
            scores[token] = -float("inf")
            token = self._draw(scores.softmax(dim=0))
        return token

    def _nucleus(self, scores: torch.Tensor) -> int:
        probs, order = scores.softmax(dim=0).sort(descending=True, stable=True)
        # The official loop adds float32 probabilities one at a time and keeps every token until the
        # running sum reaches top_p (the crossing token included); replay it in float32 exactly.
        head = probs[: self.top_k].float().cpu().numpy()
        top_p = np.float32(self.top_p)
        total, n_keep = np.float32(0.0), 0
        for p in head:
            if total >= top_p:
                break
            total = np.float32(total + p)
            n_keep += 1
        return int(order[self._draw(probs[:n_keep])])

    def _draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, replacement=True, generator=self.generator))
