"""Conformer/Transformer encoders: official key names, full-context parity, unsupported options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.networks.cache import KVCache
from cosyvoice_lite.networks.conformer import (
    CachedDistances,
    ConformerEncoder,
    EspnetRelPositionalEncoding,
    TransformerEncoder,
    subsequent_chunk_mask,
)

GOLDEN = Path(__file__).parent / "data" / "golden" / "v1_llm"


def test_full_context_conformer_matches_official_on_padded_batch():
    config = json.loads((GOLDEN / "config.json").read_text())["full_context_encoder"]
    encoder = ConformerEncoder(**config)
    encoder.load_state_dict(torch.load(GOLDEN / "encoder_state.pt", weights_only=True), strict=True)
    with np.load(GOLDEN / "encoder.npz") as data:
        xs, xs_lens = torch.from_numpy(data["xs"]), torch.from_numpy(data["xs_lens"])
        expected_out, expected_mask = torch.from_numpy(data["out"]), torch.from_numpy(data["mask"])
    with torch.inference_mode():
        out, mask = encoder.eval()(xs, xs_lens)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("row_mask", [False, True])
def test_a_long_sequences_attention_in_blocks_of_queries_is_the_whole_ones(monkeypatch, row_mask):
    """A long utterance's queries are attended a block at a time: all at once, a 6,000-token
    CosyVoice2 utterance's scores needed more memory than the machine had (h x T x (2T - 1)
    floats, 11.7 GB, then more). Rows as the whole computation gives them, padded or not."""
    from cosyvoice_lite.networks import conformer

    torch.manual_seed(0)
    attention = conformer.RelPositionMultiHeadedAttention(2, 16).eval()
    for parameter in attention.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    x = torch.randn(2, 150, 16)
    x, pos_emb = EspnetRelPositionalEncoding(16)(x)
    lengths = torch.tensor([150, 97])
    keep = torch.arange(150)[None, :] < lengths[:, None]  # [B, T]
    mask = (keep[:, :, None] & keep[:, None, :]) if row_mask else keep[:, None, :]
    with torch.inference_mode():
        whole = attention(x, mask, pos_emb)
        monkeypatch.setattr(conformer, "WHOLE_ATTENTION_ROWS", 32)
        blocks = attention(x, mask, pos_emb)
    torch.testing.assert_close(blocks, whole, atol=1e-5, rtol=1e-5)


def _long_attention(heads: int, features: int, size: int):
    """A relative-position attention with weights of some size, its input and full mask."""
    from cosyvoice_lite.networks import conformer

    torch.manual_seed(0)
    attention = conformer.RelPositionMultiHeadedAttention(heads, features).eval()
    for parameter in attention.parameters():
        torch.nn.init.normal_(parameter, std=0.3 / features**0.5)
    x, pos_emb = EspnetRelPositionalEncoding(features)(torch.randn(1, size, features))
    return attention, x, torch.ones(1, 1, size, dtype=torch.bool), pos_emb


def test_a_long_sequence_at_the_default_block_sizes_is_attended_as_the_whole_one(monkeypatch):
    """Past WHOLE_ATTENTION_ROWS queries, the blocks are as large as ATTENTION_BLOCK_SCORES
    allows (here 3 blocks of 699 rows, a CosyVoice2 attention's 8 heads x 64): within 1e-5 of
    all queries at once (measured: equal, float32 on a CPU)."""
    from cosyvoice_lite.networks import conformer

    attention, x, mask, pos_emb = _long_attention(8, 512, 1500)
    assert conformer.attention_block_rows(1, 8, 1500) == 699
    with torch.inference_mode():
        blocks = attention(x, mask, pos_emb)
        monkeypatch.setattr(conformer, "WHOLE_ATTENTION_ROWS", 1500)
        whole = attention(x, mask, pos_emb)
    torch.testing.assert_close(blocks, whole, atol=1e-5, rtol=1e-5)


def test_attention_blocks_hold_a_bounded_number_of_scores():
    """A block's scores (batch x heads x rows x keys) stay within ATTENTION_BLOCK_SCORES, so a
    long utterance's blocks take a bounded time each (the abort checks between them): a
    6,000-token CosyVoice2 utterance's up-encoder (8 heads, 12,000 frames with its prompt)."""
    from cosyvoice_lite.networks.conformer import (
        ATTENTION_BLOCK_MIN_ROWS,
        ATTENTION_BLOCK_SCORES,
        WHOLE_ATTENTION_ROWS,
        attention_block_rows,
    )

    assert attention_block_rows(1, 4, 1025) == WHOLE_ATTENTION_ROWS  # a small model's
    for batch, keys in [(1, 6000), (1, 12000), (2, 6000)]:
        rows = attention_block_rows(batch, 8, keys)
        assert ATTENTION_BLOCK_MIN_ROWS <= rows < WHOLE_ATTENTION_ROWS
        assert batch * 8 * rows * keys <= ATTENTION_BLOCK_SCORES
    assert attention_block_rows(16, 16, 15000) == ATTENTION_BLOCK_MIN_ROWS


def test_a_long_attention_stops_between_its_blocks(monkeypatch):
    """A cancelled request's (or a closing engine's) long attention stops at the next block
    (networks.abort), not at the layer's end: one layer of a 6,000-token CosyVoice2
    utterance's up-encoder took 6-14 s on 2 cores, and close() gave up waiting for it."""
    from cosyvoice_lite.networks import conformer
    from cosyvoice_lite.networks.abort import ComputationAborted, abort_when

    attention, x, mask, pos_emb = _long_attention(2, 16, 150)
    monkeypatch.setattr(conformer, "WHOLE_ATTENTION_ROWS", 32)  # 5 blocks
    asked = []

    def condition() -> bool:
        asked.append(True)
        return len(asked) == 2

    with (
        torch.inference_mode(),
        abort_when(condition),
        pytest.raises(ComputationAborted, match="attention block at query 64 of 150"),
    ):
        attention(x, mask, pos_emb)
    asked.clear()
    with torch.inference_mode(), abort_when(lambda: bool(asked.append(True))):
        attention(x, mask, pos_emb)
    assert len(asked) == 4  # between the 5 blocks


def test_state_dict_keys_are_the_official_ones():
    conformer = ConformerEncoder(
        8, 8, 2, 16, 1, input_layer="linear", pos_enc_layer_type="rel_pos_espnet",
        macaron_style=False, use_cnn_module=False,
    )  # fmt: skip
    transformer = TransformerEncoder(
        8, 8, 2, 16, 1, input_layer="linear_legacy", pos_enc_layer_type="rel_pos_espnet",
        selfattention_layer_type="rel_selfattn",
    )  # fmt: skip
    attn = [f"self_attn.linear_{n}.{p}" for n in "qkv" for p in ("weight", "bias")]
    attn += [
        "self_attn.linear_out.weight",
        "self_attn.linear_out.bias",
        "self_attn.linear_pos.weight",
    ]
    attn += ["self_attn.pos_bias_u", "self_attn.pos_bias_v"]
    ff = [f"feed_forward.w_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
    common = [f"embed.out.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]
    common += ["after_norm.weight", "after_norm.bias"]

    def norms(names):
        return [f"{n}.{p}" for n in names for p in ("weight", "bias")]

    expected_conformer = common + [
        f"encoders.0.{k}" for k in attn + ff + norms(["norm_ff", "norm_mha"])
    ]
    expected_transformer = common + [
        f"encoders.0.{k}" for k in attn + ff + norms(["norm1", "norm2"])
    ]
    assert sorted(conformer.state_dict()) == sorted(expected_conformer)
    assert sorted(transformer.state_dict()) == sorted(expected_transformer)


@pytest.mark.parametrize(
    "option",
    [
        {"macaron_style": True},
        {"use_cnn_module": True},
        {"input_layer": "conv2d"},
        {"pos_enc_layer_type": "rel_pos"},
        {"use_dynamic_chunk": True},
    ],
)
def test_unsupported_options_are_refused(option):
    kwargs = dict(
        input_layer="linear",
        pos_enc_layer_type="rel_pos_espnet",
        macaron_style=False,
        use_cnn_module=False,
    )
    kwargs.update(option)
    with pytest.raises(ModelDirError):
        ConformerEncoder(8, 8, 2, 16, 1, **kwargs)


def test_relative_sinusoids_match_the_official_table_formula():
    """Official table: row for distance r>0 is sin/cos(r*f), for r<0 sin/cos(-1*|r|*f)."""
    enc = EspnetRelPositionalEncoding(6)
    rows = enc.sinusoids(torch.tensor([2, 0, -3]))
    freq = torch.exp(torch.arange(0, 6, 2, dtype=torch.float32) * -(np.log(10000.0) / 6))
    assert torch.equal(rows[0, 0::2], torch.sin(2.0 * freq))
    assert torch.equal(rows[1, 1::2], torch.ones(3))
    assert torch.equal(rows[2, 1::2], torch.cos(-1 * torch.tensor(3.0) * freq))


def test_chunk_mask():
    assert subsequent_chunk_mask(4, 2, torch.device("cpu")).int().tolist() == [
        [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1],
    ]  # fmt: skip
    assert torch.equal(
        subsequent_chunk_mask(3, 1, torch.device("cpu")), torch.ones(3, 3).tril().bool()
    )


def test_a_steps_distances_are_per_row_and_causal():
    """One decoding step of rows at different lengths: each row's new position sees its own keys
    (distances start .. 0), none of the longer rows' ones; a prefill chunk is causal."""

    def caches(*lengths: int) -> list[KVCache]:
        made = [KVCache(1) for _ in lengths]
        for cache, length in zip(made, lengths, strict=True):
            cache.advance(length)
        return made

    step = CachedDistances.of(caches(2, 4), 1, torch.device("cpu"))
    assert step.keep.tolist() == [[[True] * 3 + [False] * 2], [[True] * 5]]
    assert step.clamped.tolist() == [[[2, 1, 0, 0, 0]], [[4, 3, 2, 1, 0]]]
    chunk = CachedDistances.of(caches(1), 3, torch.device("cpu"))
    assert chunk.keep[0].tolist() == [[j <= i + 1 for j in range(4)] for i in range(3)]
    assert chunk.clamped[0].tolist() == [[1, 0, 0, 0], [2, 1, 0, 0], [3, 2, 1, 0]]
