"""LLM graphs: a prefill graph and a one-step decode graph, the key/value cache explicit.

Sampling stays on the host: both graphs return the log-probabilities of the next speech token
(`log_softmax(llm_decoder(h))`, before any EOS masking). Embedding lookups are inside the graphs.

v1 `TransformerLM` (relative-position Transformer): the cache is three tensors
[layers, heads, positions, head_dim]: keys, values, and each layer's projected positional rows
for relative distances 0 .. positions - 1 (the torch layers read these from one table shared
by every sequence, ``conformer.ProjectedPositions``; a graph keeps them in its cache).
v2/v3 `Qwen2LM` / `CosyVoice3LM` (Qwen2, RoPE, grouped-query attention): keys and values
[layers, kv_heads, positions, head_dim], keys stored after RoPE.

The layer math is written here from the networks' own parameters (official names); the torch
modules append to their caches in place, which an exported graph cannot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..networks.qwen2_lm import Qwen2LM
from ..networks.transformer_lm import TransformerLM


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[1, T, heads * d] -> [1, heads, T, d]."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


# ---------------------------------------------------------------------------------------- v1


def _rel_sinusoids(distances: torch.Tensor, d_model: int) -> torch.Tensor:
    """EspnetRelPositionalEncoding.sinusoids without strided writes: [n, d_model]."""
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model)
    )
    angles = distances.to(torch.float32).unsqueeze(1) * div_term
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(-1, d_model)


class _TransformerLMCached(nn.Module):
    """Runs new positions through the v1 `llm` encoder after cached ones."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def layers(
        self, xs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        llm = self.lm.llm
        past = keys.shape[2]
        chunk = xs.shape[1]
        xs = llm.embed.out(xs) * llm.embed.pos_enc.xscale
        start = torch.zeros((), dtype=torch.int64) + past
        pe_new = _rel_sinusoids(torch.arange(start, start + chunk), llm.embed.pos_enc.d_model)
        query_pos = torch.arange(start, start + chunk).unsqueeze(1)
        key_pos = torch.arange(start + chunk).unsqueeze(0)
        distance = query_pos - key_pos
        drop = distance < 0  # causal
        new_k, new_v, new_p = [], [], []
        for index, layer in enumerate(llm.encoders):
            attn = layer.self_attn
            x = layer.norm1(xs)
            q = _heads(attn.linear_q(x), attn.h)
            k = torch.cat([keys[index : index + 1], _heads(attn.linear_k(x), attn.h)], dim=2)
            v = torch.cat([values[index : index + 1], _heads(attn.linear_v(x), attn.h)], dim=2)
            p_new = _heads(attn.linear_pos(pe_new.unsqueeze(0).to(x.dtype)), attn.h)
            p = torch.cat([positions[index : index + 1], p_new], dim=2)
            new_k.append(k)
            new_v.append(v)
            new_p.append(p)
            matrix_ac = torch.matmul(q + attn.pos_bias_u.unsqueeze(1), k.transpose(-2, -1))
            bd_by_distance = torch.matmul(q + attn.pos_bias_v.unsqueeze(1), p.transpose(-2, -1))
            index_ = distance.clamp(min=0).expand(1, attn.h, -1, -1)
            bd = torch.gather(bd_by_distance, -1, index_)
            scores = (matrix_ac + bd) / math.sqrt(attn.d_k)
            weights = torch.softmax(scores.masked_fill(drop, -float("inf")), dim=-1)
            out = torch.matmul(weights.masked_fill(drop, 0.0), v)
            out = out.transpose(1, 2).reshape(1, -1, attn.h * attn.d_k)
            xs = xs + attn.linear_out(out)
            xs = xs + layer.feed_forward(layer.norm2(xs))
        logp = self.lm.llm_decoder(llm.after_norm(xs)[:, -1]).log_softmax(dim=-1)
        return logp, torch.cat(new_k), torch.cat(new_v), torch.cat(new_p)

    def empty_cache(self, like: torch.Tensor) -> torch.Tensor:
        attn = self.lm.llm.encoders[0].self_attn
        return like.new_zeros(len(self.lm.llm.encoders), attn.h, 0, attn.d_k)


class TransformerLMPrefill(_TransformerLMCached):
    """text [1, T] (prompt text + text, T >= 1), embedding [E, 192] (E = 1: the speaker x-vector;
    E = 0: no speaker row, v1 instruct), prompt_speech_token [1, S] (S >= 0)
    -> logp [1, V], keys, values, positions [L, H, P, d], P = 1 + E + T + 1 + S."""

    inputs = ("text", "embedding", "prompt_speech_token")
    caches = ("keys", "values", "positions")  # relative-position rows are cached too

    def forward(self, text, embedding, prompt_speech_token):  # noqa: ANN001, ANN201
        lm = self.lm
        lengths = torch.ones_like(text).sum(dim=1)
        encoded, _ = lm.text_encoder(lm.text_embedding(text), lengths, decoding_chunk_size=1)
        text_emb = lm.text_encoder_affine_layer(encoded)
        speaker = lm.spk_embed_affine_layer(F.normalize(embedding.to(text_emb.dtype), dim=1))
        lm_input = torch.cat(
            [
                lm.llm_embedding.weight[0].reshape(1, 1, -1),
                speaker.unsqueeze(0),
                text_emb,
                lm.llm_embedding.weight[1].reshape(1, 1, -1),
                lm.speech_embedding(prompt_speech_token),
            ],
            dim=1,
        )
        empty = self.empty_cache(lm_input)
        return self.layers(lm_input, empty, empty, empty)


class TransformerLMDecode(_TransformerLMCached):
    """token [1, 1] (the last sampled speech token), keys, values, positions [L, H, P, d]
    -> logp [1, V] and the caches with P + 1 positions."""

    def forward(self, token, keys, values, positions):  # noqa: ANN001, ANN201
        return self.layers(self.lm.speech_embedding(token), keys, values, positions)


# ------------------------------------------------------------------------------------- v2/v3


class _Qwen2LMCached(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.model = lm.llm.model.model  # Qwen2Model

    def layers(
        self, xs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        from cosyvoice_lite.networks.qwen2 import rotary_cos_sin

        config = self.model.config
        heads, kv_heads, head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        group = heads // kv_heads
        past, chunk = keys.shape[2], xs.shape[1]
        start = torch.zeros((), dtype=torch.int64) + past
        query_pos = torch.arange(start, start + chunk)
        cos, sin = rotary_cos_sin(query_pos, head_dim, config.rope_theta, xs.dtype)
        # row r * chunk + i of the folded queries is query i of head r within a kv group
        drop = (torch.arange(start + chunk).unsqueeze(0) > query_pos.unsqueeze(1)).repeat(group, 1)
        new_k, new_v = [], []
        for index, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(xs)
            q = _rotary(_heads(attn.q_proj(x), heads), cos, sin)
            k = torch.cat(
                [keys[index : index + 1], _rotary(_heads(attn.k_proj(x), kv_heads), cos, sin)], 2
            )
            v = torch.cat([values[index : index + 1], _heads(attn.v_proj(x), kv_heads)], dim=2)
            new_k.append(k)
            new_v.append(v)
            q = q.reshape(1, kv_heads, group * chunk, head_dim)
            scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(head_dim)
            out = torch.matmul(torch.softmax(scores.masked_fill(drop, -float("inf")), dim=-1), v)
            out = out.reshape(1, heads, chunk, head_dim).transpose(1, 2).reshape(1, chunk, -1)
            xs = xs + attn.o_proj(out)
            xs = xs + layer.mlp(layer.post_attention_layernorm(xs))
        hidden = self.model.norm(xs)
        logp = self.lm.llm_decoder(hidden[:, -1]).log_softmax(dim=-1)
        return logp, torch.cat(new_k), torch.cat(new_v)

    def special(self, index: int) -> torch.Tensor:
        """sos / task_id rows: llm_embedding in v2, speech_embedding in v3."""
        table = getattr(self.lm, "llm_embedding", None) or self.lm.speech_embedding
        return table.weight[index].reshape(1, 1, -1)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Qwen2LMPrefill(_Qwen2LMCached):
    """text [1, T] (prompt text + text), prompt_speech_token [1, S] (S >= 0)
    -> logp [1, V], keys, values [L, KV, P, d], P = 1 + T + 1 + S."""

    inputs = ("text", "prompt_speech_token")
    caches = ("keys", "values")

    def forward(self, text, prompt_speech_token):  # noqa: ANN001, ANN201
        lm = self.lm
        lm_input = torch.cat(
            [
                self.special(lm.sos),
                self.model.embed_tokens(text),
                self.special(lm.task_id),
                lm.speech_embedding(prompt_speech_token),
            ],
            1,
        )
        config = self.model.config
        empty = lm_input.new_zeros(
            config.num_hidden_layers, config.num_key_value_heads, 0, config.head_dim
        )
        return self.layers(lm_input, empty, empty)


class Qwen2LMDecode(_Qwen2LMCached):
    """token [1, 1], keys, values [L, KV, P, d] -> logp [1, V], caches with P + 1 positions."""

    def forward(self, token, keys, values):  # noqa: ANN001, ANN201
        return self.layers(self.lm.speech_embedding(token), keys, values)


# the graph wrappers of each LLM network family (subclasses such as CosyVoice3LM included)
WRAPPERS = {
    TransformerLM: (TransformerLMPrefill, TransformerLMDecode),
    Qwen2LM: (Qwen2LMPrefill, Qwen2LMDecode),
}


def llm_graphs(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(prefill, decode) wrappers for a loaded LLM; the prefill's ``inputs`` and ``caches``
    name its graph's inputs and cache outputs."""
    family = next((c for c in type(lm).__mro__ if c in WRAPPERS), None)
    if family is None:
        raise TypeError(f"no ONNX graphs for the LLM {type(lm).__name__}")
    prefill, decode = WRAPPERS[family]
    return prefill(lm).eval(), decode(lm).eval()
