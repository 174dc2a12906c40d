"""CosyVoice2/3 LLM parity against the official Qwen2LM / CosyVoice3LM (goldens from
tools/golden/v2v3_llm.py: tiny Qwen2 body, official state dicts, seeded official decoding)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _decoding import assert_same_decoding, decode_rows

from cosyvoice_lite.decoding import (
    LengthPolicy,
    TextSource,
    bistream_task,
    run_alone,
    speech_token_task,
)
from cosyvoice_lite.errors import CosyVoiceError
from cosyvoice_lite.networks.qwen2 import Qwen2Config, Qwen2Encoder
from cosyvoice_lite.networks.qwen2_lm import CosyVoice3LM, Qwen2LM
from cosyvoice_lite.sampling import RasSampler

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden" / "v2v3_llm"
BLANK_EN = DATA / "CosyVoice-BlankEN-tiny"
TOL = 1e-4
CLASSES = {"v2": Qwen2LM, "v3": CosyVoice3LM}


def _golden(version: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{version}_llm.npz") as data:
        return {k: data[k] for k in data.files}


def _build(version: str) -> Qwen2LM:
    lm = CLASSES[version](
        llm_input_size=16,
        llm_output_size=16,
        speech_token_size=6561,
        llm=Qwen2Encoder(BLANK_EN),
        mix_ratio=[5, 15],
    )
    state = torch.load(GOLDEN / f"{version}_llm.pt", map_location="cpu", weights_only=True)
    lm.load_state_dict(state, strict=True)
    return lm.eval()


_MODELS: dict[str, Qwen2LM] = {}


def _model(version: str) -> Qwen2LM:
    """Built once per test session (tests only read the models)."""
    if version not in _MODELS:
        _MODELS[version] = _build(version)
    return _MODELS[version]


@pytest.fixture(scope="module", params=["v2", "v3"])
def case(request: pytest.FixtureRequest) -> tuple[str, Qwen2LM, dict[str, np.ndarray]]:
    return request.param, _model(request.param), _golden(request.param)


def _sampler(seed: int) -> RasSampler:
    return RasSampler(generator=torch.Generator().manual_seed(seed))


def generate(
    lm,
    text,
    prompt_text,
    prompt_speech,
    sampler,
    min_token_text_ratio=2.0,
    max_token_text_ratio=20.0,
):
    """The official decoding of one request, run alone."""
    policy = LengthPolicy(min_token_text_ratio, max_token_text_ratio)
    return run_alone(
        lm, speech_token_task(lm, text, prompt_text, prompt_speech, None, sampler, policy)
    )


def generate_bistream(lm, pieces, prompt_text, prompt_speech, sampler):
    return run_alone(lm, bistream_task(lm, TextSource(pieces), prompt_text, prompt_speech, sampler))


def test_a_text_source_pulls_only_once_polled() -> None:
    """A task closed before it ever ran (its request cancelled at admission) never reaches the
    ``finally`` that closes its TextSource: the feeder thread starts with the first poll, so such
    a source holds no thread (one had been left pulling the caller's iterator for good)."""
    pulled: list[int] = []

    def pieces():
        pulled.append(1)
        yield [1, 2]

    source = TextSource(pieces())
    time.sleep(0.2)
    assert not pulled and not source._thread.is_alive()
    deadline = time.monotonic() + 10
    while (piece := source.poll()) is TextSource.PENDING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert piece == [1, 2] and pulled == [1]
    source.close()
    closed = TextSource(pieces())
    closed.close()
    assert closed.poll() is TextSource.PENDING and not closed._thread.is_alive()


def test_config_from_blank_en() -> None:
    config = Qwen2Config.from_json(BLANK_EN / "config.json")
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    ) == (16, 2, 4, 2, 4)
    assert config.rope_theta == 1e6 and config.rms_norm_eps == 1e-6 and config.tie_word_embeddings


def test_state_dict_keys_match_official(case) -> None:
    version, lm, _ = case
    official = torch.load(GOLDEN / f"{version}_llm.pt", map_location="cpu", weights_only=True)
    assert set(lm.state_dict()) == set(official)
    assert ("llm_embedding.weight" in official) == (version == "v2")
    assert ("llm_decoder.bias" in official) == (version == "v2")
    # Tied lm_head, as in the official checkpoint.
    assert lm.llm.model.lm_head.weight is lm.llm.model.model.embed_tokens.weight


def test_teacher_forced_hidden_and_logits(case) -> None:
    _, lm, g = case
    logits = lm.teacher_forced_logits(
        g["text"], g["prompt_text"], g["prompt_speech"], g["target_speech"]
    )
    np.testing.assert_allclose(
        logits[:, g["tf_logit_cols"]].numpy(), g["tf_logits"], atol=TOL, rtol=0
    )
    all_text = np.concatenate([g["prompt_text"], g["text"]])
    speech = np.concatenate([g["prompt_speech"], g["target_speech"]])
    with torch.inference_mode():
        hidden, _ = lm.llm(lm._layout(lm.ids(all_text), lm.ids(speech)))
    np.testing.assert_allclose(hidden[0].numpy(), g["tf_hidden"], atol=TOL, rtol=0)


def test_kv_cache_matches_full_recompute(case) -> None:
    _, lm, g = case
    all_text = np.concatenate([g["prompt_text"], g["text"]])
    speech = np.concatenate([g["prompt_speech"], g["target_speech"]])
    with torch.inference_mode():
        x = lm._layout(lm.ids(all_text), lm.ids(speech))
        full, _ = lm.llm(x)
        # Uneven chunks: a prefix, single steps, then a multi-position chunk after the cache.
        cache, parts, start = None, [], 0
        for stop in (7, 8, 9, 15, 16, x.size(1)):
            h, cache = lm.llm.forward_one_step(x[:, start:stop], cache)
            parts.append(h)
            start = stop
        assert cache.length == x.size(1)
    np.testing.assert_allclose(torch.cat(parts, dim=1).numpy(), full.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("prompt", ["zs", "noprompt"])
def test_seeded_generation_matches_official(case, prompt: str, seed: int) -> None:
    version, lm, g = case
    if prompt == "zs":
        text, prompt_text, prompt_speech = g["text"], g["prompt_text"], g["prompt_speech"]
    else:
        text, prompt_text, prompt_speech = g["noprompt_text"], [], []
    scores: list[torch.Tensor] = []
    sampler = _sampler(seed)

    def recording(logp: torch.Tensor, decoded):
        if len(scores) < 3:
            scores.append(logp.clone())
        return sampler(logp, decoded)

    tokens = list(generate(lm, text, prompt_text, prompt_speech, recording))
    key = f"gen_{prompt}_seed{seed}"
    assert tokens == g[key + "_tokens"].tolist()
    np.testing.assert_allclose(torch.stack(scores).numpy(), g[key + "_logp"], atol=TOL, rtol=0)


# The golden holds seeds 0-3 per case; a cheap subset that still covers, for v3, both the normal
# end (eos) and the official error (eos sampled while text is still streaming).
BISTREAM_CASES = [
    ("v2", "bi_zs", 1),
    ("v2", "bi_short", 0),
    ("v2", "bi_short", 2),
    ("v2", "bi_noprompt", 1),
    ("v3", "bi_zs", 0),
    ("v3", "bi_zs", 1),
    ("v3", "bi_short", 0),
    ("v3", "bi_short", 2),
    ("v3", "bi_noprompt", 1),
    ("v3", "bi_noprompt", 2),
]


@pytest.mark.parametrize(("version", "name", "seed"), BISTREAM_CASES)
def test_bistream_matches_official(version: str, name: str, seed: int) -> None:
    lm, g = _model(version), _golden(version)
    n_pieces = int(g[name + "_n_pieces"])
    bounds = np.cumsum(np.concatenate([[0], g["bi_pieces_lens"]]))
    pieces = [g["bi_pieces_flat"][bounds[i] : bounds[i + 1]] for i in range(n_pieces)]
    expected = g[f"{name}_seed{seed}_tokens"].tolist()
    outcome = str(g[f"{name}_seed{seed}_outcome"])
    stream = generate_bistream(
        lm, iter(pieces), g[name + "_prompt_text"], g[name + "_prompt_speech"], _sampler(seed)
    )
    tokens: list[int] = []
    if outcome == "eos":
        tokens.extend(stream)
    else:  # the official raises when it samples a stop id other than the one it expects
        assert outcome.startswith("error")
        with pytest.raises(CosyVoiceError, match="stop token"):
            for t in stream:
                tokens.append(t)
    assert tokens == expected


def test_bistream_yields_before_text_ends() -> None:
    lm, g = _model("v2"), _golden("v2")
    fed = []

    def pieces():
        for p in np.array_split(g["bi_pieces_flat"], 10):
            fed.append(len(p))
            yield p

    stream = generate_bistream(lm, pieces(), [], [], _sampler(0))
    next(stream)
    assert len(fed) < 10


def test_v3_requires_endofprompt() -> None:
    lm, g = _model("v3"), _golden("v3")
    text = [t for t in g["text"].tolist() if t != CosyVoice3LM.END_OF_PROMPT_ID]
    with pytest.raises(ValueError, match="endofprompt"):
        next(generate(lm, text, [], [], _sampler(0)))
    with pytest.raises(ValueError, match="endofprompt"):
        next(generate_bistream(lm, iter([text]), text[:3], [], _sampler(0)))


def test_v2_generation_respects_min_and_max_len() -> None:
    lm, g = _model("v2"), _golden("v2")
    text = g["text"][:2]
    for seed in range(3):
        tokens = list(
            generate(
                lm, text, [], [], _sampler(seed), min_token_text_ratio=3, max_token_text_ratio=5
            )
        )
        assert 6 <= len(tokens) <= 10
        assert all(0 <= t < 6561 for t in tokens)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_captured_decoding_steps_compute_the_eager_floats(version: str) -> None:
    """Decoding steps as traced graphs (``Qwen2Model.capture_graphs``), with the packed products
    the engine loads on a CPU: the eager hidden states and cache contents bit for bit, for one
    row and for rows of different lengths, over steps whose caches grow (one graph per row
    count)."""
    from cosyvoice_lite.precision import pack_linears

    def build(capture: bool) -> Qwen2LM:
        lm = _build(version)
        if torch.backends.mkldnn.is_available():
            pack_linears(lm.llm, fuse=True, threads=torch.get_num_threads())
        if capture:
            lm.capture_graphs(torch.get_num_threads())
        return lm

    eager, lm = build(capture=False), build(capture=True)
    expected = decode_rows(eager.llm.forward_one_step, eager.new_cache, 16)
    captured = decode_rows(lm.llm.forward_one_step, lm.new_cache, 16)
    assert len(lm.llm.model.model.graphs) == 2  # two rows, one row (three: eager)
    assert_same_decoding(expected, captured)
