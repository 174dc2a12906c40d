"""Qwen2 decoder: the Qwen2.5-0.5B body of the CosyVoice2/3 LLMs, in plain torch.

The module tree mirrors transformers' `Qwen2ForCausalLM` inside the official `Qwen2Encoder`, so the
official `llm.pt` keys `llm.model.model.*` and `llm.model.lm_head.weight` load with `strict=True`:

    Qwen2Encoder.model                      (Qwen2ForCausalLM)
        .model.embed_tokens                 Embedding(vocab_size, hidden_size)
        .model.layers.N.self_attn.{q,k,v}_proj   Linear with bias
        .model.layers.N.self_attn.o_proj         Linear without bias
        .model.layers.N.mlp.{gate,up,down}_proj  SiLU-gated MLP, no biases
        .model.layers.N.{input,post_attention}_layernorm   RMSNorm
        .model.norm                         final RMSNorm
        .lm_head                            tied to embed_tokens when tie_word_embeddings (unused here)

Only `CosyVoice-BlankEN/config.json` is read; every weight comes from `llm.pt`. The key/value caches
are explicit `KVCache` values owned by the caller, never state on the module. A batch of B rows
takes B caches: the projections and the MLP run on all rows at once (one read of the weights),
attention runs per row over that row's own cache, so rows of different lengths need no padding and
a row's result does not depend on the other rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.networks.cache import KVCache, cache_lengths
from cosyvoice_lite.networks.graph_capture import (
    CAPTURED_STEP_ROWS,
    CapturedGraphs,
    StepSlots,
    flat_slots,
    nested_slots,
    trace_step_graphs,
)
from cosyvoice_lite.networks.linear import grouped

Caches = KVCache | list[KVCache] | None
"""One cache (a batch of one), one cache per batch row, or None (a fresh sequence)."""

__all__ = [
    "Caches",
    "KVCache",
    "Qwen2Attention",
    "Qwen2Config",
    "Qwen2DecoderLayer",
    "Qwen2Encoder",
    "Qwen2ForCausalLM",
    "Qwen2MLP",
    "Qwen2Model",
    "Qwen2RMSNorm",
]


@dataclass(frozen=True)
class Qwen2Config:
    """The fields of an HF Qwen2 `config.json` that inference needs (defaults as transformers')."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, cfg: dict) -> Qwen2Config:
        """Validate an HF Qwen2 config dict; features this decoder does not implement are errors."""
        try:
            config = cls(
                hidden_size=int(cfg["hidden_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=int(cfg["num_attention_heads"]),
                num_key_value_heads=int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])),
                intermediate_size=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelDirError(f"Qwen2 config.json is missing or has a bad value for {e}") from e
        unsupported = []
        if cfg.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={cfg['hidden_act']!r}")
        if cfg.get("rope_scaling"):
            unsupported.append(f"rope_scaling={cfg['rope_scaling']!r}")
        if cfg.get("use_sliding_window", False):
            unsupported.append("use_sliding_window=true")
        if cfg.get("head_dim", config.head_dim) != config.head_dim:
            unsupported.append(f"head_dim={cfg['head_dim']}")
        if config.hidden_size % config.num_attention_heads or (
            config.num_attention_heads % config.num_key_value_heads
        ):
            unsupported.append("heads that do not divide hidden_size / each other")
        if unsupported:
            raise ModelDirError(f"unsupported Qwen2 config: {', '.join(unsupported)}")
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Qwen2Config:
        """Read `config.json` (e.g. `<model_dir>/CosyVoice-BlankEN/config.json`)."""
        path = Path(path)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelDirError(f"cannot read the Qwen2 config {path}: {e}") from e
        return cls.from_dict(cfg)


class Qwen2RMSNorm(nn.Module):
    """RMSNorm computed in float32, then cast back, as transformers' Qwen2RMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (len(positions), head_dim) of the default (unscaled) RoPE, computed in float32.

    Computed per call instead of held in a buffer, so that casting the model to half precision
    cannot degrade the frequencies.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (exponent / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Qwen2Attention(nn.Module):
    """Grouped-query self-attention with RoPE; q/k/v projections have biases, o_proj has none."""

    linear_groups = {"qkv": ("q_proj", "k_proj", "v_proj")}
    attention_dtype: torch.dtype | None = None  # cache + attention dtype; None: the weights'

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        inner, kv_inner = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_inner, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_inner, bias=True)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: Sequence[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``slots``: each row's cached keys and values [kv_heads, T, head_dim] with room for its
        ``n`` new positions last (``KVCache.reserve``), which this call fills in place."""
        b, n, _ = x.shape
        q, k, v = grouped(self, "qkv", x)
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        # Grouped-query attention without copying the cache per query head: query head h uses KV
        # head h // group, so fold each group of query heads into the query-length axis (rows
        # r * n + i) and let every KV head attend for its whole group at once.
        group = self.num_heads // self.num_kv_heads
        dtype = self.attention_dtype or x.dtype
        rows = []
        for row, (keys, values) in enumerate(slots):
            keys[:, -n:].copy_(k[row])  # (a copy casts to the cache's dtype)
            values[:, -n:].copy_(v[row])
            q_row = q[row : row + 1].reshape(1, self.num_kv_heads, group * n, self.head_dim)
            rows.append(
                F.scaled_dot_product_attention(
                    q_row.to(dtype), keys[None], values[None], attn_mask=mask
                )
            )
        out = (rows[0] if b == 1 else torch.cat(rows)).to(x.dtype)
        out = out.reshape(b, self.num_heads, n, self.head_dim).transpose(1, 2)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.head_dim))


class Qwen2MLP(nn.Module):
    linear_groups = {"gate_up": ("gate_proj", "up_proj")}

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = grouped(self, "gate_up", x)
        return self.down_proj(F.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(config)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: Sequence[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, slots, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Embeddings, decoder layers and the final norm (`llm.model.model.*`)."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.graphs: CapturedGraphs | None = None  # decoding steps as traced graphs
        self.step_threads: int | None = None  # torch threads of a captured step

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def capture_graphs(self, threads: int | None = None) -> None:
        """Run decoding steps of up to ``CAPTURED_STEP_ROWS`` rows (one new position each) as
        traced graphs from now on (graph_capture.py), one per row count, on ``threads`` torch
        threads (None: the caller's): a load-time choice for CPUs. A step is ~1,100 small
        operations around its products: eager, each paid Python and the interpreter lock, and on
        a loop thread of one torch thread each product switched the thread count for its call
        and back (``precision.PackedLinear``); a graph runs them from C++ on the products'
        threads (the small ones stay on one thread: too small for torch to split). The same
        floats. Full-size CosyVoice2 float32, one row, alternating processes on a 2-core AVX2
        CPU: median step 88.5-90.8 ms against 96.5-102.4 ms eager (benchmarks/README.md)."""
        self.graphs = CapturedGraphs(self)
        self.step_threads = threads

    @torch.inference_mode()
    def warm_graphs(self) -> None:
        """Trace the step graphs now (each ~0.5-0.8 s at full size, and its first runs slower
        still), rather than in the first requests' steps: two steps of each captured row count
        on one-position caches."""
        if self.graphs is not None:
            inputs = self.norm.weight.new_zeros(CAPTURED_STEP_ROWS, 1, self.config.hidden_size)
            trace_step_graphs(self, self.new_cache, inputs)

    def forward(
        self, inputs_embeds: torch.Tensor, cache: Caches = None
    ) -> tuple[torch.Tensor, KVCache | list[KVCache]]:
        """Causal forward of `inputs_embeds` (batch, time, hidden) after what the caches hold.

        Returns the final-norm hidden states (transformers' `hidden_states[-1]`) and the cache(s),
        extended in place by the new positions. Several rows (one cache each) must each bring one
        new position (a decoding step); a prefill is a batch of one.
        """
        single = not isinstance(cache, list)
        caches = [self.new_cache() if cache is None else cache] if single else cache
        b, n = inputs_embeds.shape[:2]
        if len(caches) != b or (b > 1 and n != 1):
            raise ValueError(
                f"{b} rows of {n} positions need {b} caches and one position per row "
                f"when batched; got {len(caches)} caches"
            )
        device = inputs_embeds.device
        past = cache_lengths(caches, device)
        positions = past[:, None] + torch.arange(n, device=device)  # (batch, time)
        cos, sin = rotary_cos_sin(
            positions.reshape(-1), self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype
        )
        cos, sin = cos.view(b, 1, n, -1), sin.view(b, 1, n, -1)  # broadcast over heads
        group = self.config.num_attention_heads // self.config.num_key_value_heads
        mask = None
        if (
            n > 1
        ):  # a single new position sees the whole cache; otherwise causal, repeated per group
            keys = torch.arange(caches[0].length + n, device=device)
            mask = (keys[None, :] <= positions[0][:, None]).repeat(group, 1)
        # every layer's keys and values with room for the new positions, filled by the layers
        dtype = self.layers[0].self_attn.attention_dtype or inputs_embeds.dtype
        like = inputs_embeds.new_empty(
            self.config.num_key_value_heads, n, self.config.head_dim, dtype=dtype
        )
        slots = [[c.reserve(index, like) for c in caches] for index in range(len(self.layers))]
        for c in caches:
            c.advance(n)
        captured = n == 1 and b <= CAPTURED_STEP_ROWS and self.graphs is not None
        if captured and not torch.jit.is_tracing():
            hidden = self._captured_step(inputs_embeds, cos, sin, slots)
        else:
            hidden = self._layers(inputs_embeds, cos, sin, slots, mask)
        return hidden, (caches[0] if single else caches)

    def _layers(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: StepSlots,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        for layer, layer_slots in zip(self.layers, slots, strict=True):
            x = layer(x, cos, sin, layer_slots, mask)
        return self.norm(x)

    def _captured_step(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: StepSlots,
    ) -> torch.Tensor:
        """``_layers`` of a decoding step through the graph of its row count: the rows' cached
        keys and values are inputs (their lengths vary; the graph writes the new position in
        place), so one graph serves every step of that many rows."""
        rows, layers = x.shape[0], len(slots)

        def traced(x, cos, sin, *flat):  # noqa: ANN001, ANN202 - graph inputs
            return self._layers(x, cos, sin, nested_slots(flat, layers, rows), None)

        key = ("step", rows, x.dtype, x.device)
        args = (x, cos, sin, *flat_slots(slots))
        return self.graphs.run(key, traced, args, self.step_threads)


class Qwen2ForCausalLM(nn.Module):
    """`Qwen2Model` plus `lm_head`; CosyVoice never uses `lm_head`, but `llm.pt` stores it."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, inputs_embeds: torch.Tensor, cache: Caches = None
    ) -> tuple[torch.Tensor, KVCache | list[KVCache]]:
        return self.model(inputs_embeds, cache)


class Qwen2Encoder(nn.Module):
    """The official `cosyvoice.llm.llm.Qwen2Encoder`: built from `<pretrain_path>/config.json`
    (the yaml's `pretrain_path`, i.e. `<model_dir>/CosyVoice-BlankEN`), weights from `llm.pt`."""

    def __init__(
        self, pretrain_path: str | os.PathLike[str] | None = None, config: Qwen2Config | None = None
    ) -> None:
        super().__init__()
        if config is None:
            if pretrain_path is None:
                raise ModelDirError(
                    "Qwen2Encoder needs pretrain_path (the CosyVoice-BlankEN dir) or a config"
                )
            config = Qwen2Config.from_json(Path(pretrain_path) / "config.json")
        self.config = config
        self.model = Qwen2ForCausalLM(config)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    def new_cache(self) -> KVCache:
        return self.model.model.new_cache()

    def forward_one_step(
        self, xs: torch.Tensor, cache: Caches = None
    ) -> tuple[torch.Tensor, KVCache | list[KVCache]]:
        """Feed `xs` (batch, time, hidden) after the cached positions; returns the post-norm
        hidden states of the new positions and the (extended) cache(s)."""
        return self.model(xs, cache)

    def forward(
        self, xs: torch.Tensor, cache: Caches = None
    ) -> tuple[torch.Tensor, KVCache | list[KVCache]]:
        return self.model(xs, cache)
