"""v1 TransformerLM against golden data from the official code (tools/golden/v1_llm.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _decoding import assert_same_decoding, decode_rows

from cosyvoice_lite.decoding import LengthPolicy, run_alone, speech_token_task
from cosyvoice_lite.networks.conformer import POSITION_BLOCK, ConformerEncoder, TransformerEncoder
from cosyvoice_lite.networks.transformer_lm import TransformerLM
from cosyvoice_lite.sampling import RasSampler

GOLDEN = Path(__file__).parent / "data" / "golden" / "v1_llm"
CASES = ("full", "speaker_only", "prompt_only", "bare")
INPUTS = ("text", "prompt_text", "prompt_speech_token", "embedding")


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((GOLDEN / "config.json").read_text())


@pytest.fixture(scope="module")
def model(config: dict) -> TransformerLM:
    lm = TransformerLM(
        **config["lm"],
        text_encoder=ConformerEncoder(**config["text_encoder"]),
        llm=TransformerEncoder(**config["llm_encoder"]),
        sampling=object(),
    )
    state = torch.load(GOLDEN / "llm_state.pt", weights_only=True)
    lm.load_state_dict(state, strict=True)
    return lm.eval()


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "cases.npz") as data:
        return dict(data)


def inputs(golden: dict[str, np.ndarray], case: str) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(golden[f"{case}.{name}"]) for name in INPUTS}


def generate(
    model,
    text,
    prompt_text,
    prompt_speech_token,
    embedding,
    sampler,
    max_token_text_ratio=20,
    min_token_text_ratio=2,
):
    """The official decoding of one request, run alone."""
    policy = LengthPolicy(min_ratio=min_token_text_ratio, max_ratio=max_token_text_ratio)
    return run_alone(
        model,
        speech_token_task(
            model, text, prompt_text, prompt_speech_token, embedding, sampler, policy
        ),
    )


@pytest.mark.parametrize("case", CASES)
def test_teacher_forced_log_probs_match_official(model, golden, case):
    forced = torch.from_numpy(golden[f"{case}.forced"]).unsqueeze(0)
    ours = model.teacher_forced_logits(**inputs(golden, case), speech_tokens=forced)
    expected = torch.from_numpy(golden[f"{case}.forced_logp"])
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_generated_tokens_match_official(model, golden, case, seed):
    sampler = RasSampler(torch.Generator().manual_seed(seed))
    tokens = list(generate(model, **inputs(golden, case), sampler=sampler))
    assert tokens == golden[f"{case}.tokens_seed{seed}"].tolist()


@pytest.mark.parametrize("case", CASES)
def test_generation_stops_at_max_len_like_official(model, golden, case):
    sampler = RasSampler(torch.Generator().manual_seed(0))
    tokens = list(generate(model, **inputs(golden, case), sampler=sampler, max_token_text_ratio=3))
    assert tokens == golden[f"{case}.tokens_seed0_maxratio3"].tolist()


def test_cached_steps_equal_full_causal_recompute(model, golden):
    """Prefix + one position at a time through the cache == one no-cache causal forward."""
    torch.manual_seed(0)
    llm = model.llm
    xs = torch.randn(1, 13, 64)
    with torch.inference_mode():
        full, _ = llm(xs, torch.tensor([13]))
        out, cache = llm.forward_chunk(xs[:, :6], llm.new_cache())
        pieces = [out]
        for t in range(6, 13):
            out, cache = llm.forward_chunk(xs[:, t : t + 1], cache)
            pieces.append(out)
    stepped = torch.cat(pieces, dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    assert cache.length == 13


@pytest.mark.parametrize("queries", [1, 5])
def test_fused_cached_attention_equals_the_official_operations(model, queries):
    """Loaded for speed (all but exact float32) the cached attention is one fused call with the
    positional scores as its mask; it gives the official's separate products, masked softmax and
    re-zeroing within float32 rounding, for a step and for a causal chunk."""
    attn = model.llm.encoders[0].self_attn
    generator = torch.Generator().manual_seed(0)
    keys = 9
    q, k, v = (
        torch.randn(1, attn.h, n, attn.d_k, generator=generator) for n in (queries, keys, keys)
    )
    bd = torch.randn(1, attn.h, queries, keys, generator=generator)
    keep = torch.arange(keys - queries, keys)[:, None] >= torch.arange(keys)[None, :]
    with torch.inference_mode():
        official = attn._weighted_values(q, k, v, bd, keep)
        fused = attn._weighted_values(q, k, v, bd, keep, fused=True)
    torch.testing.assert_close(fused, official, atol=1e-6, rtol=1e-5)


def test_position_rows_are_shared_and_the_same_whoever_needs_them_first(config):
    """The projected positional rows live in one table per encoder (not in each cache): equal to
    projecting each distance alone, grown in whole blocks, so its rows hold the same floats
    whichever sequence reached them first; a cache keeps only keys and values."""
    state = torch.load(GOLDEN / "llm_state.pt", weights_only=True)

    def fresh() -> TransformerEncoder:
        lm = TransformerLM(
            **config["lm"],
            text_encoder=ConformerEncoder(**config["text_encoder"]),
            llm=TransformerEncoder(**config["llm_encoder"]),
            sampling=object(),
        )
        lm.load_state_dict(state, strict=True)
        return lm.eval().llm

    short_first, long_first = fresh(), fresh()
    torch.manual_seed(0)
    xs = torch.randn(1, POSITION_BLOCK + 7, 64)
    with torch.inference_mode():
        short_first.forward_chunk(xs[:, :5])  # the first block only
        short_first.forward_chunk(xs)  # then the second
        _, cache = long_first.forward_chunk(xs)  # both at once
        table = short_first.positions.covering(short_first, POSITION_BLOCK + 7, xs)
        other = long_first.positions.covering(long_first, POSITION_BLOCK + 7, xs)
        distances = torch.arange(2 * POSITION_BLOCK)
        attn = short_first.encoders[0].self_attn
        alone = torch.stack(
            [
                attn.projected_positions(short_first.embed.pos_enc.sinusoids(d[None]), xs.dtype)
                for d in distances[:9]
            ],
            dim=1,
        )[:, :, 0]
    assert all(a.shape[1] == 2 * POSITION_BLOCK for a in table)
    assert all(torch.equal(a, b) for a, b in zip(table, other, strict=True))
    torch.testing.assert_close(table[0][:, :9], alone, atol=1e-6, rtol=0)
    assert all(len(layer) == 2 for layer in cache.buffers)  # keys and values only


def test_decode_step_touches_one_new_position(model, golden):
    """Each decode step adds exactly one cache position and projects only that position."""
    llm = model.llm
    case = inputs(golden, "bare")
    n_prefix = model.prefix(**case).size(1)
    lengths: list[int] = []
    rows_seen: list[int] = []
    original = llm.forward_chunk

    def spy(xs, cache=None):
        rows_seen.append(xs.size(1))
        out, cache = original(xs, cache)
        lengths.append(cache[0].length)
        return out, cache

    llm.forward_chunk = spy
    try:
        tokens = list(generate(model, **case, sampler=RasSampler(torch.Generator().manual_seed(0))))
    finally:
        del llm.forward_chunk
    # One forward per decoded token plus the one that produced EOS.
    assert rows_seen == [n_prefix] + [1] * len(tokens)
    assert lengths == list(range(n_prefix, n_prefix + len(tokens) + 1))


def test_eos_is_suppressed_before_min_len(model, golden):
    """A sampler that always wants EOS still gets min_len tokens (EOS scores are -inf)."""
    eos = model.eos_token

    def greedy_eos(scores: torch.Tensor, decoded):
        return eos if scores[eos] > -float("inf") else int(scores.argmax())

    tokens = list(generate(model, **inputs(golden, "bare"), sampler=greedy_eos))
    assert len(tokens) == 10  # 5 text tokens * min ratio 2


def test_length_bounds_follow_official_float32_arithmetic():
    assert LengthPolicy(2, 20).bounds(5) == (10, 100)
    assert LengthPolicy(0.5, 2.5).bounds(7) == (3, 17)
    assert LengthPolicy(2, 20, max_tokens=50).bounds(5) == (10, 50)
    assert LengthPolicy(2, 20, max_tokens=50, ignore_eos=True).bounds(5) == (50, 50)


def test_rejects_batched_inputs(model, golden):
    case = inputs(golden, "full")
    case["text"] = case["text"].repeat(2, 1)
    with pytest.raises(ValueError):
        list(generate(model, **case, sampler=RasSampler(torch.Generator())))


@pytest.mark.parametrize("fused", [False, True])
def test_captured_decoding_steps_compute_the_eager_floats(config, fused):
    """Decoding steps as traced graphs (``TransformerEncoder.capture_graphs``), with the packed
    products the engine loads on a CPU and either attention (the official's operations, or the
    fused call): the eager hidden states and cache contents bit for bit, for one row and for
    rows of different lengths, over steps whose caches grow (one graph per row count)."""
    from cosyvoice_lite.precision import fuse_cached_attention, pack_linears

    def build(capture: bool) -> TransformerEncoder:
        encoder = TransformerEncoder(**config["llm_encoder"]).eval()
        torch.manual_seed(0)
        for parameter in encoder.parameters():
            parameter.data.normal_(0, 0.2)
        if fused:
            fuse_cached_attention(encoder)
        if torch.backends.mkldnn.is_available():
            pack_linears(encoder, fuse=True, threads=torch.get_num_threads())
        if capture:
            encoder.capture_graphs(torch.get_num_threads())
        return encoder

    width = config["llm_encoder"]["input_size"]
    eager, encoder = build(capture=False), build(capture=True)
    expected = decode_rows(eager.forward_chunk, eager.new_cache, width)
    captured = decode_rows(encoder.forward_chunk, encoder.new_cache, width)
    assert len(encoder.graphs) == 2  # two rows, one row (three: eager)
    assert_same_decoding(expected, captured)
