"""The CosyVoice v1 speech-token language model (official ``cosyvoice/llm/llm.py:TransformerLM``).

Input layout of one request (all rows are llm_input_size wide):

    [sos, speaker?, TextEncoder(prompt_text + text), task_id, speech_embedding(prompt_speech)]

then speech tokens are decoded one at a time through the ``llm`` encoder's KV cache, so every step
runs the layers over one new position only. The module computes (``prefix``, ``log_probs`` for a
batch of rows, ``speech_input``); the decoding loop is ``cosyvoice_lite.decoding``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.networks.cache import KVCache
from cosyvoice_lite.networks.conformer import ConformerEncoder, TransformerEncoder


class TransformerLM(nn.Module):
    """v1 LLM. Constructor kwargs are the official yaml ones; ``text_encoder`` and ``llm`` come built.

    ``sampling``, ``length_normalized_loss`` and ``lsm_weight`` are accepted and ignored: requests
    bring their own sampler.
    """

    mapped_tables = {
        "text_embedding": "the 51,866-token text vocabulary (106 MB in float32): a request "
        "reads its text's rows"
    }

    def __init__(
        self,
        text_encoder_input_size: int,
        llm_input_size: int,
        llm_output_size: int,
        text_token_size: int,
        speech_token_size: int,
        text_encoder: ConformerEncoder,
        llm: TransformerEncoder,
        sampling: object = None,
        length_normalized_loss: bool = True,
        lsm_weight: float = 0.0,
        spk_embed_dim: int = 192,
    ):
        super().__init__()
        self.llm_input_size = llm_input_size
        self.speech_token_size = speech_token_size
        self.eos_token = speech_token_size
        self.sos = 0  # llm_embedding rows
        self.task_id = 1
        self.text_embedding = nn.Embedding(text_token_size, text_encoder_input_size)
        self.text_encoder = text_encoder
        self.text_encoder_affine_layer = nn.Linear(text_encoder.output_size(), llm_input_size)
        self.llm_embedding = nn.Embedding(2, llm_input_size)  # row 0: sos, row 1: task_id
        self.llm = llm
        self.llm_decoder = nn.Linear(llm_output_size, speech_token_size + 1)  # last id = eos
        self.speech_embedding = nn.Embedding(speech_token_size, llm_input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, llm_input_size)

    # ---------------------------------------------------------------------------------------
    # Prefix
    # ---------------------------------------------------------------------------------------

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids [1, T] -> [1, T, llm_input_size] (causal Conformer, then affine)."""
        lengths = torch.tensor([text.size(1)], device=text.device)
        encoded, _ = self.text_encoder(self.text_embedding(text), lengths, decoding_chunk_size=1)
        return self.text_encoder_affine_layer(encoded)

    def prefix(
        self,
        text: torch.Tensor,
        prompt_text: torch.Tensor,
        prompt_speech_token: torch.Tensor,
        embedding: torch.Tensor,
    ) -> torch.Tensor:
        """The LLM input before the first decoded token, [1, P, llm_input_size]."""
        for name, tokens in (
            ("text", text),
            ("prompt_text", prompt_text),
            ("prompt_speech_token", prompt_speech_token),
        ):
            if tokens.dim() != 2 or tokens.size(0) != 1:
                raise ValueError(
                    f"{name} must be token ids shaped [1, T], got {tuple(tokens.shape)}"
                )
        if embedding.dim() != 2 or embedding.size(0) > 1:
            raise ValueError(
                f"embedding must be shaped [1, dim] or [0, dim], got {tuple(embedding.shape)}"
            )
        if text.size(1) == 0:
            raise ValueError("text to synthesize has no tokens")
        text_emb = self.encode_text(torch.cat([prompt_text, text], dim=1))
        parts = [self.llm_embedding.weight[0].reshape(1, 1, -1)]
        if embedding.size(0) != 0:  # no speaker row at all for instruct mode
            speaker = self.spk_embed_affine_layer(F.normalize(embedding.to(text_emb.dtype), dim=1))
            parts.append(speaker.unsqueeze(1))
        parts += [text_emb, self.llm_embedding.weight[1].reshape(1, 1, -1)]
        if prompt_speech_token.size(1) != 0:
            parts.append(self.speech_embedding(prompt_speech_token))
        return torch.cat(parts, dim=1)

    # ---------------------------------------------------------------------------------------
    # Decoding
    # ---------------------------------------------------------------------------------------

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        # float32 whatever the weights' dtype (as the official's autocast gives): the sampler's
        # sort and top-p cut need more than bfloat16's 8 bits to tell probabilities apart
        return self.llm_decoder(hidden).float().log_softmax(dim=-1)

    def new_cache(self) -> KVCache:
        return self.llm.new_cache()

    def capture_graphs(self, threads: int | None = None) -> None:
        """Decoding steps as traced graphs on ``threads`` torch threads
        (``TransformerEncoder.capture_graphs``); the prefill stays eager."""
        self.llm.capture_graphs(threads)

    def warm_graphs(self) -> None:
        """Trace the captured step graphs now (``TransformerEncoder.warm_graphs``)."""
        self.llm.warm_graphs()

    def speech_input(self, token: int) -> torch.Tensor:
        """The input [1, 1, D] that feeds a decoded speech token back."""
        return self.speech_embedding.weight[token].reshape(1, 1, -1)

    def log_probs(self, inputs: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Next-token log-probabilities [B, V] after feeding ``inputs`` [B, T, D] to B rows, each
        extending its own cache (B > 1 takes one position per row)."""
        hidden, _ = self.llm.forward_chunk(inputs, caches)
        if hidden.size(0) == 1:  # a vector product, exactly as the official computes one row
            return self._log_probs(hidden[0, -1]).unsqueeze(0)
        return self._log_probs(hidden[:, -1])

    @torch.inference_mode()
    def teacher_forced_logits(
        self,
        text: torch.Tensor,
        prompt_text: torch.Tensor,
        prompt_speech_token: torch.Tensor,
        embedding: torch.Tensor,
        speech_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Log-probabilities [T, speech_token_size + 1] that decoding would see for speech_tokens [1, T].

        Row i is the distribution token i is drawn from, given the prefix and speech_tokens[:, :i]
        (no EOS masking applied). Computed in one causal pass through the same cached code path
        decoding uses.
        """
        lm_input = self.prefix(text, prompt_text, prompt_speech_token, embedding)
        n_prefix, n_tokens = lm_input.size(1), speech_tokens.size(1)
        fed = self.speech_embedding(speech_tokens[:, : max(n_tokens - 1, 0)])
        hidden, _ = self.llm.forward_chunk(torch.cat([lm_input, fed], dim=1))
        return self._log_probs(hidden[0, n_prefix - 1 : n_prefix - 1 + n_tokens])
