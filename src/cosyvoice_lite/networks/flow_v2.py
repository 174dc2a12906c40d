"""CosyVoice2 flow: speech tokens -> mel (official `CausalMaskedDiffWithXvec`, `cosyvoice/flow/flow.py`).

tokens -> `input_embedding` -> `UpsampleConformerEncoder` (25 Hz -> 50 Hz) -> `encoder_proj` = mu,
then the conditional flow matching decoder (a `CausalConditionalCFM` around the causal U-Net)
turns (mu, speaker, prompt mel) into the mel.

The encoder (official `cosyvoice/transformer/upsample_encoder.py`), in order:

    embed            Linear -> LayerNorm -> x sqrt(d)           (token rate)
    pre_lookahead    conv sees 3 future tokens: zeros, or real look-ahead tokens while streaming
    encoders.N       pre-norm Conformer layers, static chunk mask when streaming
    up_layer         nearest x2, left pad 4, conv k5            (token rate -> mel rate)
    up_embed         Linear -> LayerNorm -> x sqrt(d)
    up_encoders.N    4 Conformer layers, chunk mask twice as long when streaming
    after_norm

With `streaming=True` every stage is chunk-causal (see tests/test_v2_flow.py): a frame depends only
on its own chunk, the chunks before it and the 3 look-ahead tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.networks.abort import check
from cosyvoice_lite.networks.attention import attention, chunk_keep
from cosyvoice_lite.networks.cache import BEFORE_PARTS, AttentionHistory, joined
from cosyvoice_lite.networks.conformer import (
    ACTIVATIONS,
    INPUT_LAYERS,
    ConformerEncoderLayer,
    EspnetRelPositionalEncoding,
    PositionwiseFeedForward,
    RelPositionMultiHeadedAttention,
    encoder_attention_mask,
)
from cosyvoice_lite.networks.flow_matching import (
    CFG_ROWS,
    StreamSolve,
    TimeConditioning,
    TokenChunks,
    conv1d_by_row,
    keeps_history,
    per_row,
    stack_rows,
    step_streams,
    stream_estimator,
)
from cosyvoice_lite.networks.flow_v3 import PreLookaheadLayer
from cosyvoice_lite.networks.linear import grouped
from cosyvoice_lite.networks.unet import CausalConv1d
from cosyvoice_lite.networks.utterances import UtteranceFlow

__all__ = [
    "Upsample1D",
    "UpsampleConformerEncoder",
    "CausalMaskedDiffWithXvec",
    "FlowV2StreamState",
]

# The official encoder hard-codes these sizes instead of taking them from its arguments.
_HARD_CODED_CHANNELS = 512
_PRE_LOOKAHEAD_LEN = 3
_UPSAMPLE_STRIDE = 2
_NUM_UP_BLOCKS = 4


class Upsample1D(nn.Module):
    """Official encoder `Upsample1D`: nearest-neighbour x stride, then a causal conv.

    The conv (kernel 2 * stride + 1) is made causal by padding 2 * stride zeros on the left only.
    """

    def __init__(self, channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels
        self.stride = stride
        self.conv = nn.Conv1d(channels, out_channels, stride * 2 + 1, stride=1, padding=0)

    def forward(
        self, inputs: torch.Tensor, input_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [B, C, T] -> ([B, C_out, stride * T], input_lengths * stride)."""
        outputs = F.interpolate(inputs, scale_factor=float(self.stride), mode="nearest")
        outputs = F.pad(outputs, (self.stride * 2, 0), value=0.0)
        return self.conv(outputs), input_lengths * self.stride


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ModelDirError(f"unsupported UpsampleConformerEncoder configuration: {message}")


class UpsampleConformerEncoder(nn.Module):
    """The v2 flow encoder. Constructor keywords are the official ones.

    Only the options the official yamls use are supported (linear input layer, ESPnet relative
    positions, pre-norm, no macaron FF, no convolution module); training-only ones are ignored.
    As in the official class, the pre-look-ahead layer and the upsampler are 512 channels wide
    whatever `output_size` says, and there are always 4 `up_encoders`.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        input_layer: str = "conv2d",
        pos_enc_layer_type: str = "rel_pos",
        normalize_before: bool = True,
        static_chunk_size: int = 0,
        use_dynamic_chunk: bool = False,
        global_cmvn: nn.Module | None = None,
        use_dynamic_left_chunk: bool = False,
        positionwise_conv_kernel_size: int = 1,
        macaron_style: bool = True,
        selfattention_layer_type: str = "rel_selfattn",
        activation_type: str = "swish",
        use_cnn_module: bool = True,
        cnn_module_kernel: int = 15,
        causal: bool = False,
        cnn_module_norm: str = "batch_norm",
        key_bias: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        _require(input_layer in INPUT_LAYERS, f"input_layer {input_layer!r} (use 'linear')")
        _require(
            pos_enc_layer_type == "rel_pos_espnet", f"pos_enc_layer_type {pos_enc_layer_type!r}"
        )
        _require(
            selfattention_layer_type == "rel_selfattn",
            f"selfattention_layer_type {selfattention_layer_type!r}",
        )
        _require(normalize_before, "normalize_before=False")
        _require(not use_dynamic_chunk, "use_dynamic_chunk=True")
        _require(global_cmvn is None, "global_cmvn")
        _require(not macaron_style, "macaron_style=True")
        _require(not use_cnn_module, "use_cnn_module=True")
        _require(activation_type in ACTIVATIONS, f"activation_type {activation_type!r}")
        # The hard-coded 512-channel layers sit between the Conformer stacks.
        _require(
            input_size == output_size == _HARD_CODED_CHANNELS,
            f"input_size and output_size must be {_HARD_CODED_CHANNELS} "
            f"(got {input_size} and {output_size})",
        )
        self._output_size = output_size
        self.static_chunk_size = static_chunk_size

        def embed() -> nn.Module:
            return INPUT_LAYERS[input_layer](
                input_size, output_size, 0.0, EspnetRelPositionalEncoding(output_size)
            )

        def conformer_layers(count: int) -> nn.ModuleList:
            return nn.ModuleList(
                ConformerEncoderLayer(
                    output_size,
                    RelPositionMultiHeadedAttention(
                        attention_heads, output_size, key_bias=key_bias
                    ),
                    PositionwiseFeedForward(
                        output_size, linear_units, 0.0, ACTIVATIONS[activation_type]()
                    ),
                )
                for _ in range(count)
            )

        # Registration order follows the official module, so state_dict() lists keys alike.
        self.embed = embed()
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)
        self.pre_lookahead_layer = PreLookaheadLayer(
            in_channels=_HARD_CODED_CHANNELS,
            channels=_HARD_CODED_CHANNELS,
            pre_lookahead_len=_PRE_LOOKAHEAD_LEN,
        )
        self.encoders = conformer_layers(num_blocks)
        self.up_layer = Upsample1D(
            channels=_HARD_CODED_CHANNELS,
            out_channels=_HARD_CODED_CHANNELS,
            stride=_UPSAMPLE_STRIDE,
        )
        self.up_embed = embed()
        self.up_encoders = conformer_layers(_NUM_UP_BLOCKS)

    def output_size(self) -> int:
        return self._output_size

    def forward(
        self,
        xs: torch.Tensor,
        xs_lens: torch.Tensor,
        context: torch.Tensor | None = None,
        decoding_chunk_size: int = 0,
        num_decoding_left_chunks: int = -1,
        streaming: bool = False,
        rows_alone: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """xs [B, T, 512] token features -> (out [B, 2T, 512], mel-rate padding mask [B, 1, 2T]).

        `context` [B, <=3, 512]: the features of the look-ahead tokens that follow xs (streaming);
        without it the look-ahead sees zeros (end of utterance). `streaming=True` limits attention
        to static chunks (`static_chunk_size` tokens, twice that after upsampling), each frame
        seeing its own chunk and every earlier one. As in the official code,
        `decoding_chunk_size` and `num_decoding_left_chunks` have no effect. `rows_alone`: the
        frames past each row's length are zeroed before the look-ahead layer, so that every row of
        a padded batch gives what it gives alone (the official training batch lets a row's last
        frames look ahead into the padding).
        """
        chunk = self.static_chunk_size if streaming else 0
        pad_mask, att_mask = encoder_attention_mask(xs_lens, xs.size(1), chunk)
        xs, pos_emb = self.embed(xs)
        if rows_alone:
            xs = xs * pad_mask.transpose(1, 2).to(xs.dtype)
        if context is not None and context.size(1) > 0:
            # Same embedding as xs; the official passes offset=T, which only moves the unused
            # positional rows (relative positions do not depend on it).
            context, _ = self.embed(context)
        xs = self.pre_lookahead_layer(xs, context=context)
        for index, layer in enumerate(self.encoders):
            check(f"encoder layer {index}")
            xs = layer(xs, att_mask, pos_emb)

        # .contiguous() as the official: the Linear of up_embed rounds differently on a strided input
        xs, xs_lens = self.up_layer(xs.transpose(1, 2).contiguous(), xs_lens)
        xs = xs.transpose(1, 2).contiguous()
        up_chunk = chunk * self.up_layer.stride
        pad_mask, att_mask = encoder_attention_mask(xs_lens, xs.size(1), up_chunk)
        xs, pos_emb = self.up_embed(xs)
        for index, layer in enumerate(self.up_encoders):
            check(f"up-encoder layer {index}")
            xs = layer(xs, att_mask, pos_emb)
        return self.after_norm(xs), pad_mask


class CausalMaskedDiffWithXvec(UtteranceFlow, nn.Module):
    """The v2 flow. Constructor keywords are the official ones; training-only ones are ignored.

    `encoder` is a built `UpsampleConformerEncoder`, `decoder` a built `CausalConditionalCFM`
    (see `flow_matching.py`) holding the `CausalConditionalDecoder` U-Net (see `unet.py`).
    """

    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        output_type: str = "mel",
        vocab_size: int = 4096,
        input_frame_rate: int = 50,
        only_mask_loss: bool = True,
        token_mel_ratio: int = 2,
        pre_lookahead_len: int = 3,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        decoder_conf: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if encoder is None or decoder is None:
            raise ModelDirError("CausalMaskedDiffWithXvec needs its encoder and decoder modules")
        self.input_size = input_size
        self.output_size = output_size
        self.vocab_size = vocab_size
        self.output_type = output_type
        self.input_frame_rate = input_frame_rate
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size(), output_size)
        self.decoder = decoder
        self.token_mel_ratio = token_mel_ratio
        self.pre_lookahead_len = pre_lookahead_len

    def _mel_rate_mu(
        self, token: torch.Tensor, token_len: torch.Tensor, finalize: bool, streaming: bool
    ) -> torch.Tensor:
        """The encoder at twice the token rate, projected to the mel size (UtteranceFlow)."""
        rows_alone = token.shape[0] > 1  # padded rows: each as it is alone
        if finalize:
            h, _ = self.encoder(token, token_len, streaming=streaming, rows_alone=rows_alone)
        else:
            # The official keeps token_len at the full length here; lengths beyond the
            # sequence just mean "no padding".
            look = self.pre_lookahead_len
            h, _ = self.encoder(
                token[:, :-look], token_len, context=token[:, -look:], streaming=streaming
            )
        return self.encoder_proj(h)

    # ---------------------------------------------------------------------------------------
    # incremental streaming (see the section at the end of this file)

    def new_stream(
        self,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        cache_dtype: torch.dtype | None = None,
    ) -> FlowV2StreamState:
        """Start a stream: prompt_token [1, P], prompt_feat [1, 2P, 80], embedding [1, 192].

        cache_dtype: dtype of the U-Net's cached keys/values (None: as computed); float16 or
        bfloat16 halve a float32 stream's caches at the cost of rounding its history."""
        self._check_streamable()
        if prompt_token.shape[0] != 1 or prompt_feat.shape[0] != 1 or embedding.shape[0] != 1:
            raise ValueError("a flow stream takes one utterance (batch 1)")
        with torch.inference_mode():
            embedding = embedding.to(self.input_embedding.weight.dtype)
            spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        return FlowV2StreamState(
            embedding=spks,
            prompt_feat=prompt_feat.to(spks.dtype),
            pending=prompt_token,
            cache_dtype=cache_dtype,
        )

    def stream_step(
        self, state: FlowV2StreamState, token: torch.Tensor, finalize: bool = False
    ) -> torch.Tensor:
        """Feed new speech tokens [1, k] (k >= 0); returns the mel [1, 80, m] now complete.

        Without finalize, the last `pre_lookahead_len` tokens received are look-ahead only and
        tokens are encoded in whole encoder chunks (`static_chunk_size`, counted from the
        prompt's first token); the rest waits for the next call. With finalize the remaining
        tokens are encoded with zero look-ahead and the stream ends. Each call costs the new
        frames against cached history, never a re-run of the history, until the stream passes
        its `cache_budget` (then the frames after the frozen caches are re-solved each call, see
        `solve_within_budget`).

        The mel matches `inference(all tokens so far, streaming=True, finalize=False)` frame for
        frame. The final chunk uses chunk attention too; the official stream computes its last
        call with full attention (streaming=False), so only that chunk can differ from it.
        """
        return self.stream_steps([state], [token], [finalize])[0]

    @torch.inference_mode()
    def stream_steps(
        self,
        states: Sequence[FlowV2StreamState],
        tokens: Sequence[torch.Tensor],
        finalize: Sequence[bool],
    ) -> list[torch.Tensor]:
        """`stream_step` for several streams at once, each at its own position: each stream
        encodes its new tokens alone (small), and the U-Net solves of the streams with as many
        new frames run as one batch (stream i's CFG rows are rows 2i, 2i + 1). A stream's mel
        equals its `stream_step` alone up to float rounding. Every call is checked before any
        stream changes: a ValueError leaves all of them as they were."""
        return step_streams(
            self.decoder,
            states,
            tokens,
            finalize,
            self._chunks(),
            self._encode_increment,
            self._stream_solve,
            self._velocity,
        )

    def stream_tokens_needed(self, state: FlowV2StreamState, new_tokens: int) -> int:
        """How many more tokens, after `new_tokens` more, the stream needs before `stream_step`
        (not final) computes mel: 0 when those would already complete a chunk."""
        return self._chunks().needed(state, new_tokens)

    def _chunks(self) -> TokenChunks:
        """Whole encoder chunks, counted from the prompt's first token."""
        return TokenChunks(
            self.encoder.static_chunk_size, self.pre_lookahead_len, self.token_mel_ratio
        )

    def _check_streamable(self) -> None:
        encoder, estimator = self.encoder, stream_estimator(self.decoder)
        chunk = getattr(encoder, "static_chunk_size", 0)
        if not isinstance(encoder, UpsampleConformerEncoder) or chunk <= 0:
            raise ModelDirError(
                "incremental streaming needs an UpsampleConformerEncoder with chunks"
            )
        if not getattr(estimator, "causal", False) or len(estimator.down_blocks) != 1:
            raise ModelDirError("incremental streaming needs the one-level causal U-Net estimator")
        mel_chunk = chunk * self.token_mel_ratio
        if estimator.static_chunk_size <= 0 or mel_chunk % estimator.static_chunk_size != 0:
            raise ModelDirError(
                f"estimator chunk {estimator.static_chunk_size} does not divide the encoder's "
                f"{mel_chunk}-frame chunks"
            )

    def _encode_increment(
        self, state: FlowV2StreamState, token: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        """mu [1, 80, 2n] of n new tokens (the chunk-causal encoder, run on new frames only)."""
        enc = self.encoder
        start = state.tokens_done
        xs = enc.embed(self.input_embedding(torch.clamp(token, min=0)))[0]

        # pre-look-ahead: conv1 sees the next 3 tokens (context or zeros), conv2 the last 2
        # conv1 outputs of the previous chunk
        pre = enc.pre_lookahead_layer
        h = xs.transpose(1, 2)
        if context is not None:
            ctx = enc.embed(self.input_embedding(torch.clamp(context, min=0)))[0]
            h = torch.cat([h, ctx.transpose(1, 2)], dim=2)
        h = F.pad(h, (0, pre.pre_lookahead_len - (h.shape[2] - xs.shape[1])))
        h = F.leaky_relu(pre.conv1(h))
        left = pre.conv2.kernel_size[0] - 1
        tail = state.pre_lookahead_tail
        h = torch.cat([tail if tail is not None else h.new_zeros(1, h.shape[1], left), h], dim=2)
        state.pre_lookahead_tail = h[:, :, h.shape[2] - left :]
        xs = pre.conv2(h).transpose(1, 2) + xs

        xs = _conformer_increment(
            enc.encoders, xs, state.encoder, start, enc.static_chunk_size, enc.embed.pos_enc
        )

        # upsample: nearest x stride, then a conv that sees 2 * stride earlier frames, i.e.
        # the last 2 token frames of the previous chunk
        up = enc.up_layer
        keep = (up.conv.kernel_size[0] - 1) // up.stride
        h = xs.transpose(1, 2)
        tail = state.up_tail
        h = torch.cat([tail if tail is not None else h.new_zeros(1, h.shape[1], keep), h], dim=2)
        state.up_tail = h[:, :, h.shape[2] - keep :]
        h = up.conv(F.interpolate(h, scale_factor=float(up.stride), mode="nearest"))

        xs = enc.up_embed(h.transpose(1, 2).contiguous())[0]
        xs = _conformer_increment(
            enc.up_encoders,
            xs,
            state.up_encoder,
            start * up.stride,
            enc.static_chunk_size * up.stride,
            enc.up_embed.pos_enc,
        )
        return self.encoder_proj(enc.after_norm(xs)).transpose(1, 2)

    def _stream_solve(self, state: FlowV2StreamState, mu: torch.Tensor, start: int) -> StreamSolve:
        """The U-Net's share of a stream's call: new frames mu [1, 80, n] at mel frame `start`."""
        while len(state.estimator) < self.decoder.steps:
            state.estimator.append([_LayerCaches(state.cache_dtype) for _ in range(CFG_ROWS)])
        own = sum(row.nbytes() for step in state.estimator for row in step)
        return StreamSolve(state, mu, start, state.estimator, own)

    def _velocity(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        caches: list[_LayerCaches],
        starts: list[int],
        time: TimeConditioning | None = None,
    ) -> torch.Tensor:
        estimator = stream_estimator(self.decoder)
        return _estimator_increment(estimator, x, mu, t, spks, cond, caches, starts, time)


# --------------------------------------------------------------------------------------------
# Incremental streaming
#
# With streaming=True every stage of the flow is chunk-causal, so a stream can encode and decode
# only the new tokens against caches of what came before, instead of re-running the whole history
# as the official CosyVoice2Model does. Per encoded chunk the state keeps:
#   encoder       pre-look-ahead conv2: the last 2 conv1 outputs; each Conformer layer: keys,
#                 values and linear_pos rows for distances 0, 1, ...; up_layer: the last
#                 2 token frames; each up-Conformer layer: keys, values, linear_pos rows
#   U-Net         per Euler step and CFG row: the last 2 input frames of every causal
#                 conv, and keys/values of every transformer block
# The mel equals the official streaming re-run (finalize=False) chunk by chunk, up to float
# rounding. Only whole chunks are encoded; tokens of a partial chunk wait for more tokens (the
# official schedule is chunk-aligned, so it never has partial chunks before the last call).


CAPTURED_ROWS = 2  # the most rows of one traced increment graph (a stream's CFG pair)


class _ConvTail:
    """The last input frames of one causal conv (its left context for the next chunk)."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:  # noqa: ARG002 - kept as computed
        self.frames: torch.Tensor | None = None

    def fork(self, share: bool) -> _ConvTail:  # noqa: ARG002 - one fork signature per cache
        fork = _ConvTail()
        fork.frames = self.frames  # replaced, never written in place
        return fork


class _LayerCaches:
    """Per-layer caches of one network, handed out in call order (which never changes)."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.items: list[Any] = []
        self.cursor = 0
        self.frozen = False  # past the stream's budget: read, never extended
        self.dtype = dtype  # of the attention keys and values (None: as computed)

    def freeze(self) -> None:
        self.frozen = True
        for item in self.items:
            if isinstance(item, AttentionHistory):
                item.freeze()

    def rewind(self) -> _LayerCaches:
        self.cursor = 0
        return self

    def next(self, kind: type) -> Any:
        if self.cursor == len(self.items):
            self.items.append(kind(self.dtype))
            if self.frozen:  # frozen before its first frames: it stays empty
                self.freeze()
        item = self.items[self.cursor]
        self.cursor += 1
        return item

    def fork(self, share: bool) -> _LayerCaches:
        fork = _LayerCaches(self.dtype)
        fork.items = [item.fork(share) for item in self.items]
        return fork

    def nbytes(self, shared: bool = False) -> int:
        return sum(item.nbytes(shared) for item in self.items if isinstance(item, AttentionHistory))


@dataclass
class FlowV2StreamState:
    """Everything one v2 flow stream remembers between chunks. Owned by one request.

    Create it with `CausalMaskedDiffWithXvec.new_stream`, feed tokens with `stream_step`.
    """

    embedding: torch.Tensor  # projected speaker embedding [1, 80]
    prompt_feat: torch.Tensor  # [1, mel_len1, 80], the cond of the first mel_len1 frames
    pending: torch.Tensor  # [1, k] token ids received but not encoded yet (prompt ones first)
    cache_dtype: torch.dtype | None = None  # of the U-Net's keys/values (None: as computed)
    tokens_done: int = 0  # token frames encoded so far, prompt included
    finished: bool = False
    last_step_frames: int = 0  # mel frames the U-Net ran on in the last call (cost probe)
    pre_lookahead_tail: torch.Tensor | None = None  # [1, 512, 2] last conv1 outputs
    up_tail: torch.Tensor | None = None  # [1, 512, 2] last token frames before up_layer
    encoder: _LayerCaches = field(default_factory=_LayerCaches)
    up_encoder: _LayerCaches = field(default_factory=_LayerCaches)
    # per Euler step, one per CFG row (the rows can be computed on different threads)
    estimator: list[list[_LayerCaches]] = field(default_factory=list)
    # Memory budget of the U-Net caches (bytes of this stream's own frames; None: unbounded).
    # Past it the caches stop growing: each call re-solves the frames from `frozen_at` on
    # against them, as the official re-runs its whole history (see solve_within_budget).
    cache_budget: int | None = None
    frozen_at: int | None = None  # first mel frame no longer cached
    frozen_mu: torch.Tensor | None = None  # [1, 80, n] mu of the frames from frozen_at on

    def fork(self) -> FlowV2StreamState:
        """A stream that goes on from here independently; the U-Net's keys and values so far are
        shared with it, not copied (a voice's prompt, computed once: see `PromptFlowCache`)."""
        if self.finished:
            raise ValueError("a finalized flow stream cannot be forked")
        return dataclasses.replace(
            self,
            encoder=self.encoder.fork(share=False),
            up_encoder=self.up_encoder.fork(share=False),
            estimator=[[row.fork(share=True) for row in step] for step in self.estimator],
        )

    def cache_bytes(self, shared: bool = False) -> int:
        """Bytes held by this stream's own caches (with ``shared``: and by its shared prefix)."""
        caches = [self.encoder, self.up_encoder, *(row for step in self.estimator for row in step)]
        return sum(caches.nbytes(shared) for caches in caches)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H * D] -> [B, H, T, D] (D spelled out: T may be 0, one new frame's earlier ones)."""
    return x.view(x.size(0), x.size(1), heads, x.size(2) // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H * D]."""
    return x.transpose(1, 2).reshape(x.size(0), x.size(2), -1)


def _rel_attention_increment(
    attn: RelPositionMultiHeadedAttention,
    x: torch.Tensor,
    cache: AttentionHistory,
    start: int,
    chunk: int,
    pos_enc: EspnetRelPositionalEncoding,
) -> torch.Tensor:
    """Relative-position self-attention of new frames x [1, n, D] at absolute `start`.

    Same scores as the full-sequence layer: ((q + u) . k_j + (q + v) . linear_pos(pe(i - j))) /
    sqrt(d_k) with a chunk mask. Distances i - j run from -(n - 1) (later keys of the same chunk)
    to start + n - 1; the rows of the non-negative ones are cached, the negative ones are new.
    """
    n = x.size(1)
    end = start + n
    q, k, v = (_split_heads(y, attn.h) for y in grouped(attn, "qkv", x))
    keys, values = cache.keys.append(k), cache.values.append(v)

    def project(distances: torch.Tensor) -> torch.Tensor:
        pe = pos_enc.sinusoids(distances).to(x.dtype).unsqueeze(0)
        return _split_heads(attn.linear_pos(pe), attn.h)

    known = cache.positions.length
    if known < end:
        cache.positions.append(project(torch.arange(known, end, device=x.device)))
    positive = cache.positions.valid()[:, :, :end]
    negative = project(torch.arange(-(n - 1), 0, device=x.device))
    table = torch.cat([negative, positive], dim=2)  # column c <-> distance c - (n - 1)

    content = torch.matmul(q + attn.pos_bias_u.unsqueeze(1), keys.transpose(-2, -1))
    by_distance = torch.matmul(q + attn.pos_bias_v.unsqueeze(1), table.transpose(-2, -1))
    query = torch.arange(start, end, device=x.device).unsqueeze(1)
    key = torch.arange(end, device=x.device).unsqueeze(0)
    column = (query - key + (n - 1)).expand(*by_distance.shape[:2], n, end)
    positional = torch.gather(by_distance, -1, column)
    scores = (content + positional) / math.sqrt(attn.d_k)
    drop = ~chunk_keep(start, n, end, chunk, x.device)
    weights = torch.softmax(scores.masked_fill(drop, -float("inf")), dim=-1).masked_fill(drop, 0.0)
    return attn.linear_out(_merge_heads(torch.matmul(weights, values)))


def _conformer_increment(
    layers: nn.ModuleList,
    x: torch.Tensor,
    caches: _LayerCaches,
    start: int,
    chunk: int,
    pos_enc: EspnetRelPositionalEncoding,
) -> torch.Tensor:
    """Pre-norm Conformer layers (no macaron, no conv module) over new frames x [1, n, D]."""
    caches.rewind()
    for layer in layers:
        cache = caches.next(AttentionHistory)
        x = x + _rel_attention_increment(
            layer.self_attn, layer.norm_mha(x), cache, start, chunk, pos_enc
        )
        x = x + layer.feed_forward(layer.norm_ff(x))
    return x


def _causal_conv_increment(conv: CausalConv1d, x: torch.Tensor, io: _IncrementIO) -> torch.Tensor:
    """A left-padded conv over new frames x [R, C, n], each row's left context from ``io``."""
    x = torch.cat([io.tail(), x], dim=2)
    if io.keeps:
        io.new_tails.append(x[:, :, -conv.causal_padding :].clone())  # not a view of the input
    return conv1d_by_row(conv, x)


def _causal_block_increment(block: nn.Module, x: torch.Tensor, io: _IncrementIO) -> torch.Tensor:
    """CausalBlock1D (`block.0` causal conv, then LayerNorm over channels and Mish); no padding mask."""
    return block.block[1:](_causal_conv_increment(block.block[0], x, io))


def _resnet_increment(
    resnet: nn.Module, x: torch.Tensor, modulation: torch.Tensor, io: _IncrementIO
) -> torch.Tensor:
    """modulation: the resnet's, from the CFG rows' conditioning (every row has the same t)."""
    h = _causal_block_increment(resnet.block1, x, io)
    h = h + per_row(modulation, h.size(0)).unsqueeze(-1)
    h = _causal_block_increment(resnet.block2, h, io)
    return h + conv1d_by_row(resnet.res_conv, x)


def _transformers_increment(
    blocks: nn.ModuleList, x: torch.Tensor, io: _IncrementIO
) -> torch.Tensor:
    """diffusers BasicTransformerBlocks over new frames x [R, C, n]: projections and
    feed-forwards for all rows at once, attention per row over what came before its new frames
    (``io``: cached keys and values, the row's mask) and the new frames."""
    # frame-major memory, as ConditionalDecoder._transformers: left a transposed view, every
    # norm and residual add of the blocks would run strided
    h = x.transpose(1, 2).contiguous()
    for block in blocks:
        attn = block.attn1
        hn = block.norm1(h)
        q, k, v = (_split_heads(y, attn.heads) for y in grouped(attn, "qkv", hn))
        if io.keeps:
            io.new_keys.append(k)
            io.new_values.append(v)
        outs = []
        for row, (keys, values, stored) in enumerate(io.attention()):
            mine = slice(row, row + 1)
            keys, values = joined(keys, k[mine], stored), joined(values, v[mine], stored)
            outs.append(attention(q[mine], keys, values, io.masks[row]))
        h = h + attn.to_out[0](_merge_heads(stack_rows(outs)))
        h = h + block.ff(block.norm3(h))
    return h.transpose(1, 2).contiguous()


@dataclass(frozen=True)
class _Layout:
    """What the tensors of one increment call are (the key of its traced graph): its rows, time
    modulations, causal convs and attention layers, and per attention layer (in call order) and
    row the dtype the cache stores new rows in where that rounds what it hands back (None: read
    as computed). Before each row's new keys and values come ``BEFORE_PARTS``
    (`AttentionHistory.before`). ``keeps``: whether the call returns its new conv tails, keys and
    values; not when every row's caches are frozen (a re-solve past the stream's budget, up to
    the whole stream's frames), whose call would otherwise hold every layer's projections of all
    those frames until it returns."""

    rows: int
    modulations: int
    convs: int
    layers: int
    stored: tuple[tuple[torch.dtype | None, ...], ...]
    keeps: bool = True


class _IncrementIO:
    """One increment call's inputs, handed out in call order, and the new conv tails, keys and
    values, collected as the layers make them."""

    def __init__(self, layout: _Layout, inputs: Sequence[torch.Tensor]) -> None:
        at = 4 + layout.modulations
        self._tails = iter(inputs[at : at + layout.convs])
        at += layout.convs
        before = []
        for _ in ("keys", "values"):  # [layer][row]: BEFORE_PARTS tensors
            rows = range(at, at + layout.layers * layout.rows * BEFORE_PARTS, BEFORE_PARTS)
            parts = [inputs[start : start + BEFORE_PARTS] for start in rows]
            before.append([parts[i : i + layout.rows] for i in range(0, len(parts), layout.rows)])
            at = rows.stop
        self._layers = iter(zip(*before, layout.stored, strict=True))
        self.masks = inputs[at:]
        self.keeps = layout.keeps
        self.new_tails: list[torch.Tensor] = []
        self.new_keys: list[torch.Tensor] = []
        self.new_values: list[torch.Tensor] = []

    def tail(self) -> torch.Tensor:
        """The next causal conv's left frames [R, C, pad]."""
        return next(self._tails)

    def attention(self) -> Iterator[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], Any]]:
        """Per row, the next attention layer's keys and values before the new ones, and the
        dtype the cache stores the new ones in (None: read as computed)."""
        keys, values, stored = next(self._layers)
        return zip(keys, values, stored, strict=True)


def _increment(
    estimator: nn.Module, layout: _Layout, *inputs: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The causal U-Net's velocity for new frames of R rows as a function of tensors alone, so
    that it can run as a traced graph. ``inputs`` (``_IncrementCall.inputs``): x, mu, spks,
    cond, the time modulations, each causal conv's left frames [R, C, pad], the keys then the
    values before each attention layer's new ones (per layer and row, ``BEFORE_PARTS`` of
    them: `AttentionHistory.before`) and each row's additive attention mask [n, keys]. Returns the velocity [R, 80, n],
    then each conv's new left frames, each layer's new keys, then its new values.

    Mirrors CausalConditionalDecoder.forward with streaming=True and an all-ones mask (whose
    multiplications are exact no-ops), one level (channels [c]) so no down/up-sampling.
    """
    x, mu, spks, cond = inputs[:4]
    modulations = iter(inputs[4 : 4 + layout.modulations])
    io = _IncrementIO(layout, inputs)
    h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.size(2)), cond], dim=1)
    skips = []
    for resnet, transformers, conv in estimator.down_blocks:
        h = _resnet_increment(resnet, h, next(modulations), io)
        h = _transformers_increment(transformers, h, io)
        skips.append(h)
        h = _causal_conv_increment(conv, h, io)
    for resnet, transformers in estimator.mid_blocks:
        h = _resnet_increment(resnet, h, next(modulations), io)
        h = _transformers_increment(transformers, h, io)
    for resnet, transformers, conv in estimator.up_blocks:
        h = torch.cat([h, skips.pop()], dim=1)
        h = _resnet_increment(resnet, h, next(modulations), io)
        h = _transformers_increment(transformers, h, io)
        h = _causal_conv_increment(conv, h, io)
    h = _causal_block_increment(estimator.final_block, h, io)
    velocity = conv1d_by_row(estimator.final_proj, h)
    if not io.keeps:
        return (velocity,)
    return (velocity, *io.new_tails, *io.new_keys, *io.new_values)


def _cached_layers(estimator: nn.Module) -> list[nn.Module]:
    """The U-Net's causal convs and attention layers in the order `_increment` runs them: the
    order of the items in a row's `_LayerCaches`."""
    layers: list[nn.Module] = []
    for blocks in (estimator.down_blocks, estimator.mid_blocks, estimator.up_blocks):
        for resnet, transformers, *conv in blocks:
            layers += [resnet.block1.block[0], resnet.block2.block[0]]
            layers += [block.attn1 for block in transformers]
            layers += conv
    layers.append(estimator.final_block.block[0])
    return layers


class _IncrementCall:
    """One increment call of R rows: its inputs gathered from the rows' caches in call order, and
    its outputs stored into them (``store``), around `_increment`."""

    def __init__(
        self,
        estimator: nn.Module,
        caches: list[_LayerCaches],
        starts: list[int],
        x: torch.Tensor,
        modulations: int,
    ) -> None:
        self.caches = caches
        self.tails: list[list[_ConvTail]] = []  # per conv, per row
        self.histories: list[list[AttentionHistory]] = []  # per attention layer, per row
        self.left: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        stored = []
        for layer in _cached_layers(estimator):
            if isinstance(layer, CausalConv1d):
                tails = [cache.next(_ConvTail) for cache in caches]
                zeros = x.new_zeros(1, layer.in_channels, layer.causal_padding)
                self.left.append(
                    stack_rows([zeros if t.frames is None else t.frames for t in tails])
                )
                self.tails.append(tails)
                continue
            histories = [cache.next(AttentionHistory) for cache in caches]
            empty = x.new_zeros(1, layer.heads, 0, layer.to_out[0].in_features // layer.heads)
            for history in histories:
                keys, values = history.before(empty)
                self.keys += keys
                self.values += values
            stored.append(tuple(history.rounds_to(x.dtype) for history in histories))
            self.histories.append(histories)
        n, chunk = x.size(2), estimator.static_chunk_size
        first = self.histories[0]
        # the official -1e10 where masked (mask_to_bias of the static chunk mask)
        self.masks = [
            h.chunk_bias(s, n, chunk, x, -1.0e10) for h, s in zip(first, starts, strict=True)
        ]
        self.layout = _Layout(
            len(caches),
            modulations,
            len(self.left),
            len(self.histories),
            tuple(stored),
            keeps=keeps_history(caches),
        )

    def inputs(self, *head: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`_increment`'s inputs after ``head`` (x, mu, spks, cond and the modulations)."""
        return (*head, *self.left, *self.keys, *self.values, *self.masks)

    def store(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Keep the call's new conv tails, keys and values in the rows' caches (not where a
        cache is frozen); returns the velocity."""
        if not self.layout.keeps:
            return outputs[0]
        convs, layers = len(self.tails), len(self.histories)
        tails = outputs[1 : 1 + convs]
        keys = outputs[1 + convs : 1 + convs + layers]
        values = outputs[1 + convs + layers :]
        for new, row_tails in zip(tails, self.tails, strict=True):
            for row, (tail, cache) in enumerate(zip(row_tails, self.caches, strict=True)):
                if not cache.frozen:
                    tail.frames = new[row : row + 1]
        for new_keys, new_values, histories in zip(keys, values, self.histories, strict=True):
            for row, history in enumerate(histories):
                history.append(new_keys[row : row + 1], new_values[row : row + 1])
        return outputs[0]


def _estimator_increment(
    estimator: nn.Module,
    x: torch.Tensor,
    mu: torch.Tensor,
    t: torch.Tensor,
    spks: torch.Tensor,
    cond: torch.Tensor,
    caches: list[_LayerCaches],
    starts: list[int],
    time: TimeConditioning | None = None,
) -> torch.Tensor:
    """The causal U-Net's velocity for new frames [R, 80, n] of R rows (CFG rows of streams),
    row r of a stream at absolute frame `starts[r]`, against that row's caches `caches[r]`;
    time: t's conditioning as the official batch of two CFG rows (the solver's table),
    computed here when not given. With the estimator's graphs captured (graph_capture.py),
    each row runs as a traced graph: its caches are read before the graph and written after.
    """
    for cache in caches:
        cache.rewind()
    # every row has the same t: conditioned as the official batch of two CFG rows (a batch of
    # another size could round differently), each row taking the first
    if time is None:
        time = estimator.time_conditioning(t.expand(CFG_ROWS))
    graphs = estimator.graphs
    if graphs is None or torch.jit.is_tracing() or not keeps_history(caches):
        call = _IncrementCall(estimator, caches, starts, x, len(time.blocks))
        layout = call.layout
        return call.store(
            _increment(estimator, layout, *call.inputs(x, mu, spks, cond, *time.blocks))
        )

    # captured: rows in pairs (a row computes alike in any batch), so that two graphs (one and
    # two rows; each holds tens of MB for a full-size v2 U-Net) serve every batch; pairs keep most
    # of a batch's gain (four streams' first audio 1.33x sooner than eager, one row at a time 1.13x)
    def begin(mine: slice) -> tuple[_IncrementCall, tuple[torch.Tensor, ...]]:
        call = _IncrementCall(estimator, caches[mine], starts[mine], x[mine], len(time.blocks))
        return call, call.inputs(x[mine], mu[mine], spks[mine], cond[mine], *time.blocks)

    increment = partial(_increment, estimator)
    return stack_rows(graphs.run_in_groups(x, CAPTURED_ROWS, begin, increment))
