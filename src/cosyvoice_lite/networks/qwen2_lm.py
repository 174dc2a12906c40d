"""CosyVoice2 `Qwen2LM` and CosyVoice3 `CosyVoice3LM`: text + prompt speech -> speech tokens.

Official parameter names (`llm_embedding` (v2 only), `llm`, `llm_decoder`, `speech_embedding`) so
that `llm.pt` loads with `strict=True`, and the official decoding (`cosyvoice/llm/llm.py`), including
its quirks:

* input layout `[sos, embed_tokens(prompt_text + text), task_id, speech_embedding(prompt_speech)]`;
  the x-vector is not used by these LLMs;
* v2 takes sos/task_id from `llm_embedding` rows 0/1, v3 from `speech_embedding` rows
  speech_token_size + 0 / + 2;
* logits come from `llm_decoder` on the final-norm hidden state (not `lm_head`), then log_softmax;
* "ignore eos" masks index `speech_token_size`, which is the eos for v2 but the sos for v3, so v3
  never actually suppresses its eos (speech_token_size + 1);
* generation stops on any id >= speech_token_size; a stop id is never yielded.

Every random draw happens in the `sampler` (e.g. `cosyvoice_lite.sampling.RasSampler`, which owns
the request's `torch.Generator`); the key/value cache lives in the generator frames, not on the module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from cosyvoice_lite.errors import CosyVoiceError, InvalidRequestError
from cosyvoice_lite.networks.qwen2 import KVCache, Qwen2Encoder

__all__ = ["CosyVoice3LM", "Qwen2LM", "Sampler", "TokenIds"]

# `sampler(log_probs_1d, decoded_so_far) -> token id`; it may modify log_probs in place.
Sampler = Callable[[torch.Tensor, Sequence[int]], int]
TokenIds = Sequence[int] | torch.Tensor


class Qwen2LM(nn.Module):
    """CosyVoice2 LLM (yaml `llm: !new:cosyvoice.llm.llm.Qwen2LM`).

    Speech ids: 0..speech_token_size-1 are speech tokens, speech_token_size is eos,
    speech_token_size + 2 the bistream fill token.
    """

    def __init__(
        self,
        llm_input_size: int,
        llm_output_size: int,
        speech_token_size: int,
        llm: Qwen2Encoder,
        sampling: object = None,  # the yaml's sampling function; requests pass a sampler instead
        length_normalized_loss: bool = True,  # training only
        lsm_weight: float = 0.0,  # training only
        mix_ratio: Sequence[int] = (5, 15),
    ) -> None:
        super().__init__()
        self.llm_input_size = llm_input_size
        self.llm_output_size = llm_output_size
        self.speech_token_size = speech_token_size
        self.mix_ratio = list(mix_ratio)
        self.sos = 0
        self.task_id = 1
        self.eos_token = speech_token_size
        self.fill_token = speech_token_size + 2
        self.llm_embedding = nn.Embedding(2, llm_input_size)
        self.llm = llm
        self.llm_decoder = nn.Linear(llm_output_size, speech_token_size + 3)
        self.speech_embedding = nn.Embedding(speech_token_size + 3, llm_input_size)

    # -- version-specific pieces -------------------------------------------------------------

    def _sos_emb(self) -> torch.Tensor:
        return self.llm_embedding.weight[self.sos].reshape(1, 1, -1)

    def _task_id_emb(self) -> torch.Tensor:
        return self.llm_embedding.weight[self.task_id].reshape(1, 1, -1)

    def _check_text(self, text: torch.Tensor, what: str) -> None:
        """v3 rejects text without <|endofprompt|>; v2 accepts anything."""

    def _bistream_start(self, prompt_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First bistream input and the prompt text left to interleave: v2 starts from sos alone."""
        return self._sos_emb(), prompt_text

    # -- helpers -----------------------------------------------------------------------------

    def _ids(self, ids: TokenIds) -> torch.Tensor:
        """Token ids as a (1, T) int64 tensor on the parameters' device."""
        device = self.speech_embedding.weight.device
        return torch.as_tensor(ids, dtype=torch.int64, device=device).reshape(1, -1)

    def _embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.model.model.embed_tokens(ids)

    def _embed_speech(self, ids: torch.Tensor) -> torch.Tensor:
        return self.speech_embedding(ids)

    def _speech_emb(self, token: int) -> torch.Tensor:
        return self.speech_embedding.weight[token].reshape(1, 1, -1)

    def _step(self, lm_input: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """One backbone call; returns the next-token log-probabilities (1-D) and the cache."""
        hidden, cache = self.llm.forward_one_step(lm_input, cache)
        return self.llm_decoder(hidden[:, -1]).log_softmax(dim=-1).squeeze(0), cache

    def _sample(self, logp: torch.Tensor, decoded: list[int], sampler: Sampler, ignore_eos: bool) -> int:
        if ignore_eos:
            # Official `sampling_ids`: masks index speech_token_size (v2 eos, v3 sos).
            logp[self.speech_token_size] = -float("inf")
        return int(sampler(logp, decoded))

    def _prefix(self, text: torch.Tensor, prompt_speech_token: torch.Tensor) -> torch.Tensor:
        """`[sos, embed(text), task_id, speech_emb(prompt_speech)]`, shape (1, T, D)."""
        return torch.cat([self._sos_emb(), self._embed_text(text), self._task_id_emb(),
                          self._embed_speech(prompt_speech_token)], dim=1)

    # -- inference ---------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        text: TokenIds,
        prompt_text: TokenIds,
        prompt_speech_token: TokenIds,
        sampler: Sampler,
        min_token_text_ratio: float = 2.0,
        max_token_text_ratio: float = 20.0,
    ) -> Iterator[int]:
        """Official `inference` (HF path): yield speech tokens until a stop id or max_len.

        min_len/max_len are the ratios times the number of `text` tokens (prompt text excluded);
        while fewer than min_len tokens were generated the eos index is masked.
        """
        text, prompt_text = self._ids(text), self._ids(prompt_text)
        all_text = torch.cat([prompt_text, text], dim=1)
        self._check_text(all_text, "text or prompt_text")
        lm_input = self._prefix(all_text, self._ids(prompt_speech_token))
        # The official multiplies an int32 length tensor by a Python float: float32 arithmetic.
        n_text = np.float32(text.size(1))
        min_len = int(n_text * np.float32(min_token_text_ratio))
        max_len = int(n_text * np.float32(max_token_text_ratio))

        decoded: list[int] = []
        cache: KVCache | None = None
        for i in range(max_len):
            logp, cache = self._step(lm_input, cache)
            token = self._sample(logp, decoded, sampler, ignore_eos=i < min_len)
            if token >= self.speech_token_size:
                return
            yield token
            decoded.append(token)
            lm_input = self._speech_emb(token)

    @torch.inference_mode()
    def generate_bistream(
        self,
        text_pieces: Iterable[TokenIds],
        prompt_text: TokenIds,
        prompt_speech_token: TokenIds,
        sampler: Sampler,
        max_final_tokens: int | None = None,
    ) -> Iterator[int]:
        """Official `inference_bistream`: text arrives as an iterable of token-id pieces.

        Text and prompt speech are interleaved `mix_ratio` = 5 text : 15 speech. Once the prompt
        speech is used up, speech tokens are decoded; after every 15 of them a fill token is forced
        and decoding waits for 5 more text tokens. When the text ends, the remaining text and
        task_id are fed and decoding runs to eos. Reproduced quirks:

        * the fill schedule starts at `(P // 15 + 1) * 15 - P` generated tokens (P = prompt speech
          length), even though the prompt speech is consumed 15 at a time from the start;
        * prompt speech still unconsumed when the text ends is dropped;
        * if the text ends right after a fill token, `lm_input` still holds the last speech
          embedding, which was already fed, and it is fed again in front of the remaining text;
        * a sampled stop id other than the fill (interleaved phase) or eos (final phase) is an error.

        `max_final_tokens` optionally bounds the final decode (the official has no bound).
        """
        n_text, n_speech = self.mix_ratio
        prompt_text = self._ids(prompt_text)
        prompt_speech = self._embed_speech(self._ids(prompt_speech_token))
        lm_input, prompt_text = self._bistream_start(prompt_text)
        text_cache = self._embed_text(prompt_text)
        n_prompt = prompt_speech.size(1)
        next_fill_index = (n_prompt // n_speech + 1) * n_speech - n_prompt

        decoded: list[int] = []
        cache: KVCache | None = None
        for piece in text_pieces:
            text_cache = torch.cat([text_cache, self._embed_text(self._ids(piece))], dim=1)
            # Interleave 5 text + 15 prompt-speech embeddings while both are available.
            while prompt_speech.size(1) != 0 and text_cache.size(1) >= n_text:
                lm_input = torch.cat([lm_input, text_cache[:, :n_text], prompt_speech[:, :n_speech]], dim=1)
                text_cache, prompt_speech = text_cache[:, n_text:], prompt_speech[:, n_speech:]
            if prompt_speech.size(1) != 0:
                continue
            after_fill = bool(decoded) and decoded[-1] == self.fill_token
            if after_fill or (not decoded and lm_input.size(1) == 1):
                if text_cache.size(1) < n_text:
                    continue  # wait for more text
                new_text = text_cache[:, :n_text]
                lm_input = new_text if after_fill else torch.cat([lm_input, new_text], dim=1)
                text_cache = text_cache[:, n_text:]
            while True:
                logp, cache = self._step(lm_input, cache)
                if len(decoded) == next_fill_index:
                    token = self.fill_token
                    next_fill_index += n_speech + 1
                else:
                    token = self._sample(logp, decoded, sampler, ignore_eos=True)
                if token == self.fill_token:
                    next_fill_index = len(decoded) + n_speech + 1
                decoded.append(token)
                if token >= self.speech_token_size:
                    if token == self.fill_token:
                        break
                    raise CosyVoiceError(
                        f"the LLM produced stop token {token} in the middle of streaming text input")
                yield token
                lm_input = self._speech_emb(token)

        # Text finished: feed what is left of it plus task_id, then decode to eos.
        lm_input = torch.cat([lm_input, text_cache, self._task_id_emb()], dim=1)
        n_final = 0
        while max_final_tokens is None or n_final < max_final_tokens:
            logp, cache = self._step(lm_input, cache)
            token = self._sample(logp, decoded, sampler, ignore_eos=False)
            decoded.append(token)
            if token >= self.speech_token_size:
                if token == self.eos_token:
                    return
                raise CosyVoiceError(f"the LLM produced stop token {token} instead of eos")
            yield token
            n_final += 1
            lm_input = self._speech_emb(token)

    @torch.inference_mode()
    def teacher_forced_logits(
        self,
        text: TokenIds,
        prompt_text: TokenIds,
        prompt_speech_token: TokenIds,
        speech_token: TokenIds,
    ) -> torch.Tensor:
        """`llm_decoder` logits (T, V) for the whole input `[sos, prompt_text + text, task_id,
        prompt_speech + speech_token]` in one causal pass; row t scores the token after position t."""
        all_text = torch.cat([self._ids(prompt_text), self._ids(text)], dim=1)
        speech = torch.cat([self._ids(prompt_speech_token), self._ids(speech_token)], dim=1)
        hidden, _ = self.llm(self._prefix(all_text, speech))
        return self.llm_decoder(hidden)[0]


class CosyVoice3LM(Qwen2LM):
    """CosyVoice3 LLM (yaml `llm: !new:cosyvoice.llm.llm.CosyVoice3LM`).

    No `llm_embedding`; `llm_decoder` has no bias and 200 extra rows. Ids: speech_token_size + 0 sos,
    + 1 eos, + 2 task_id, + 3 fill, + 4..199 reserved. Every input must contain <|endofprompt|>.
    """

    # Hard-coded in the official code ("temporary hardcode, 151646 is <|endofprompt|> token").
    END_OF_PROMPT_ID = 151646

    def __init__(
        self,
        llm_input_size: int,
        llm_output_size: int,
        speech_token_size: int,
        llm: Qwen2Encoder,
        sampling: object = None,
        length_normalized_loss: bool = True,
        lsm_weight: float = 0.0,
        mix_ratio: Sequence[int] = (5, 15),
    ) -> None:
        nn.Module.__init__(self)
        self.llm_input_size = llm_input_size
        self.llm_output_size = llm_output_size
        self.speech_token_size = speech_token_size
        self.mix_ratio = list(mix_ratio)
        self.sos = speech_token_size + 0
        self.eos_token = speech_token_size + 1
        self.task_id = speech_token_size + 2
        self.fill_token = speech_token_size + 3
        self.llm = llm
        self.llm_decoder = nn.Linear(llm_output_size, speech_token_size + 200, bias=False)
        self.speech_embedding = nn.Embedding(speech_token_size + 200, llm_input_size)

    def _sos_emb(self) -> torch.Tensor:
        return self.speech_embedding.weight[self.sos].reshape(1, 1, -1)

    def _task_id_emb(self) -> torch.Tensor:
        return self.speech_embedding.weight[self.task_id].reshape(1, 1, -1)

    def _bistream_start(self, prompt_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # v3 feeds the system prompt up to and including <|endofprompt|> whole; only the rest of
        # the prompt text is interleaved with the prompt speech.
        self._check_text(prompt_text, "prompt_text")
        eop = prompt_text[0].tolist().index(self.END_OF_PROMPT_ID) + 1
        lm_input = torch.cat([self._sos_emb(), self._embed_text(prompt_text[:, :eop])], dim=1)
        return lm_input, prompt_text[:, eop:]

    def _check_text(self, text: torch.Tensor, what: str) -> None:
        if not bool((text == self.END_OF_PROMPT_ID).any()):
            raise InvalidRequestError(
                f"CosyVoice3 needs <|endofprompt|> (token {self.END_OF_PROMPT_ID}) in the {what}, "
                "e.g. a prompt text that starts with 'You are a helpful assistant.<|endofprompt|>'")
