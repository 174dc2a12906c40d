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

The module computes; it does not decode. `prefix` builds a request's input, `log_probs` scores the
next token for a batch of rows (one `KVCache` each), `speech_input` embeds a decoded token; the
decoding loops (plain and bistream, with the official length bounds and sampling) live in
`cosyvoice_lite.decoding`, where the engine steps many requests together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cosyvoice_lite.networks.cache import KVCache
from cosyvoice_lite.networks.qwen2 import Qwen2Encoder

__all__ = ["CosyVoice3LM", "Qwen2LM", "TokenIds"]

TokenIds = Sequence[int] | torch.Tensor


class Qwen2LM(nn.Module):
    """CosyVoice2 LLM (yaml `llm: !new:cosyvoice.llm.llm.Qwen2LM`).

    Speech ids: 0..speech_token_size-1 are speech tokens, speech_token_size is eos,
    speech_token_size + 2 the bistream fill token.
    """

    mapped_tables = {
        "llm.model.model.embed_tokens": "Qwen2's 151,936-token text vocabulary (545 MB in "
        "float32): a request reads its text's rows"
    }

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

    def sos_input(self) -> torch.Tensor:
        return self.llm_embedding.weight[self.sos].reshape(1, 1, -1)

    def task_input(self) -> torch.Tensor:
        return self.llm_embedding.weight[self.task_id].reshape(1, 1, -1)

    def check_text(self, text: torch.Tensor, what: str) -> None:
        """v3 rejects text without <|endofprompt|>; v2 accepts anything."""

    def bistream_start(self, prompt_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First bistream input and the prompt text left to interleave: v2 starts from sos alone."""
        return self.sos_input(), prompt_text

    # -- inputs ------------------------------------------------------------------------------

    def ids(self, ids: TokenIds) -> torch.Tensor:
        """Token ids as a (1, T) int64 tensor on the parameters' device."""
        device = self.speech_embedding.weight.device
        return torch.as_tensor(ids, dtype=torch.int64, device=device).reshape(1, -1)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.model.model.embed_tokens(ids)

    def embed_speech(self, ids: torch.Tensor) -> torch.Tensor:
        return self.speech_embedding(ids)

    def speech_input(self, token: int) -> torch.Tensor:
        """The input (1, 1, D) that feeds a decoded speech token back."""
        return self.speech_embedding.weight[token].reshape(1, 1, -1)

    def prefix(
        self,
        text: TokenIds,
        prompt_text: TokenIds,
        prompt_speech_token: TokenIds,
        embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`[sos, embed(prompt_text + text), task_id, speech_emb(prompt_speech)]`, (1, T, D).
        The x-vector (`embedding`) is not an input of these LLMs."""
        all_text = torch.cat([self.ids(prompt_text), self.ids(text)], dim=1)
        self.check_text(all_text, "text or prompt_text")
        return self._layout(all_text, self.ids(prompt_speech_token))

    def _layout(self, all_text: torch.Tensor, speech: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.sos_input(),
                self.embed_text(all_text),
                self.task_input(),
                self.embed_speech(speech),
            ],
            dim=1,
        )

    # -- compute -----------------------------------------------------------------------------

    def new_cache(self) -> KVCache:
        return self.llm.new_cache()

    def capture_graphs(self, threads: int | None = None) -> None:
        """Decoding steps as traced graphs on ``threads`` torch threads
        (``Qwen2Model.capture_graphs``); the prefill stays eager."""
        self.llm.model.model.capture_graphs(threads)

    def warm_graphs(self) -> None:
        """Trace the captured step graphs now (``Qwen2Model.warm_graphs``)."""
        self.llm.model.model.warm_graphs()

    def log_probs(self, inputs: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Next-token log-probabilities (B, V) after feeding `inputs` (B, T, D) to B rows, each
        extending its own cache (B > 1 takes one position per row)."""
        hidden, _ = self.llm.forward_one_step(inputs, caches)
        # float32 whatever the weights' dtype (as the official's autocast gives): the sampler's
        # sort and top-p cut need more than bfloat16's 8 bits to tell probabilities apart
        return self.llm_decoder(hidden[:, -1]).float().log_softmax(dim=-1)

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
        all_text = torch.cat([self.ids(prompt_text), self.ids(text)], dim=1)
        speech = torch.cat([self.ids(prompt_speech_token), self.ids(speech_token)], dim=1)
        hidden, _ = self.llm(self._layout(all_text, speech))
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

    def sos_input(self) -> torch.Tensor:
        return self.speech_embedding.weight[self.sos].reshape(1, 1, -1)

    def task_input(self) -> torch.Tensor:
        return self.speech_embedding.weight[self.task_id].reshape(1, 1, -1)

    def bistream_start(self, prompt_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # v3 feeds the system prompt up to and including <|endofprompt|> whole; only the rest of
        # the prompt text is interleaved with the prompt speech.
        self.check_text(prompt_text, "prompt_text")
        eop = prompt_text[0].tolist().index(self.END_OF_PROMPT_ID) + 1
        lm_input = torch.cat([self.sos_input(), self.embed_text(prompt_text[:, :eop])], dim=1)
        return lm_input, prompt_text[:, eop:]

    def check_text(self, text: torch.Tensor, what: str) -> None:
        if not bool((text == self.END_OF_PROMPT_ID).any()):
            raise ValueError(
                f"CosyVoice3 needs <|endofprompt|> (token {self.END_OF_PROMPT_ID}) in the {what}, "
                "e.g. a prompt text that starts with 'You are a helpful assistant.<|endofprompt|>'"
            )
