"""Parity of the v1 flow (U-Net estimators, CFM solvers, MaskedDiffWithXvec) with the official
code, against goldens produced by tools/golden/v1_flow.py on tiny random modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice_lite.networks.conformer import ConformerEncoder
from cosyvoice_lite.networks.flow_matching import CausalConditionalCFM, ConditionalCFM
from cosyvoice_lite.networks.flow_v1 import InterpolateRegulator, MaskedDiffWithXvec
from cosyvoice_lite.networks.unet import CausalConditionalDecoder, ConditionalDecoder

GOLDEN = Path(__file__).parent / "data" / "golden" / "v1_flow"
ATOL = 1e-4
CONFIG = json.loads((GOLDEN / "config.json").read_text())
CASES = ["short_noprompt", "long_noprompt", "short_prompt", "long_prompt"]


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def state_of(arrays: dict[str, np.ndarray], prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        prefix + k.removeprefix("state."): torch.from_numpy(v)
        for k, v in arrays.items()
        if k.startswith("state.")
    }


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def assert_close(actual: torch.Tensor, expected: np.ndarray) -> None:
    assert tuple(actual.shape) == expected.shape
    err = (actual.detach().float() - t(expected)).abs().max().item()
    assert err <= ATOL, f"max abs error {err:.3g}"


@pytest.fixture(scope="module")
def estimator_data() -> dict[str, np.ndarray]:
    return load("estimator")


@pytest.fixture(scope="module")
def causal_data() -> dict[str, np.ndarray]:
    return load("causal_estimator")


def build_estimator(data: dict[str, np.ndarray]) -> ConditionalDecoder:
    estimator = ConditionalDecoder(**CONFIG["estimator"])
    estimator.load_state_dict(state_of(data), strict=True)
    return estimator.eval()


def build_causal(data: dict[str, np.ndarray]) -> CausalConditionalDecoder:
    estimator = CausalConditionalDecoder(**CONFIG["causal_estimator"])
    estimator.load_state_dict(state_of(data), strict=True)
    return estimator.eval()


def estimator_inputs(data: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: t(data[k]) for k in ("x", "mask", "mu", "t", "spks", "cond")}


# ------------------------------------------------------------------------------------------
# estimators


def test_estimator_matches_official(estimator_data: dict[str, np.ndarray]) -> None:
    estimator = build_estimator(estimator_data)
    with torch.inference_mode():
        out = estimator(**estimator_inputs(estimator_data))
    assert_close(out, estimator_data["out"])


@pytest.mark.parametrize("streaming", [False, True])
def test_causal_estimator_matches_official(
    causal_data: dict[str, np.ndarray], streaming: bool
) -> None:
    estimator = build_causal(causal_data)
    with torch.inference_mode():
        out = estimator(**estimator_inputs(causal_data), streaming=streaming)
    assert_close(out, causal_data["out_stream" if streaming else "out_full"])


def test_causal_chunks_do_not_see_the_future(causal_data: dict[str, np.ndarray]) -> None:
    estimator = build_causal(causal_data)
    inputs = estimator_inputs(causal_data)
    chunk = CONFIG["causal_estimator"]["static_chunk_size"]
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["x"][:, :, 2 * chunk :] += 1.0
    with torch.inference_mode():
        a = estimator(**inputs, streaming=True)
        b = estimator(**changed, streaming=True)
    assert torch.equal(a[:, :, : 2 * chunk], b[:, :, : 2 * chunk])
    assert not torch.equal(a[:, :, 2 * chunk :], b[:, :, 2 * chunk :])


def test_estimator_state_dict_keys(estimator_data: dict[str, np.ndarray]) -> None:
    keys = set(ConditionalDecoder(**CONFIG["estimator"]).state_dict())
    assert keys == set(state_of(estimator_data))
    assert "down_blocks.0.1.0.attn1.to_out.0.weight" in keys
    assert "down_blocks.0.1.0.ff.net.2.bias" in keys


# ------------------------------------------------------------------------------------------
# CFM solvers


def test_causal_cfm_fixed_noise_matches_official(causal_data: dict[str, np.ndarray]) -> None:
    estimator = build_causal(causal_data)  # (module init itself draws from the global RNG)
    state = torch.get_rng_state()
    cfm = CausalConditionalCFM(**CONFIG["cfm"], estimator=estimator)
    assert torch.equal(state, torch.get_rng_state()), "construction must not touch the global RNG"
    assert not any(k.startswith("rand_noise") for k in cfm.state_dict())
    assert_close(cfm.rand_noise[:, :, :64], causal_data["rand_noise_head"])
    assert cfm.rand_noise.shape == (1, 80, 15000)

    for streaming, key in ((False, "cfm_full"), (True, "cfm_stream")):
        mel, cache = cfm(
            t(causal_data["cfm_mu"]),
            t(causal_data["cfm_mask"]),
            10,
            spks=t(causal_data["cfm_spks"]),
            cond=t(causal_data["cfm_cond"]),
            streaming=streaming,
        )
        assert cache is None
        assert_close(mel, causal_data[key])


def test_cfm_requires_generator(estimator_data: dict[str, np.ndarray]) -> None:
    cfm = ConditionalCFM(**CONFIG["cfm"], estimator=build_estimator(estimator_data))
    mu = torch.zeros(1, 80, 5)
    with pytest.raises(ValueError):
        cfm(mu, torch.ones(1, 1, 5), 10, spks=torch.zeros(1, 80), cond=mu, generator=None)


# ------------------------------------------------------------------------------------------
# MaskedDiffWithXvec


@pytest.fixture(scope="module")
def flow(estimator_data: dict[str, np.ndarray]) -> MaskedDiffWithXvec:
    decoder = ConditionalCFM(**CONFIG["cfm"], estimator=ConditionalDecoder(**CONFIG["estimator"]))
    model = MaskedDiffWithXvec(
        **CONFIG["flow"],
        encoder=ConformerEncoder(**CONFIG["encoder"]),
        length_regulator=InterpolateRegulator(**CONFIG["length_regulator"]),
        decoder=decoder,
    )
    state = {**state_of(load("flow")), **state_of(estimator_data, "decoder.estimator.")}
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def cases() -> dict[str, np.ndarray]:
    return load("flow_cases")


def run_case(
    flow: MaskedDiffWithXvec,
    cases: dict[str, np.ndarray],
    name: str,
    cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    token = t(cases[f"{name}.token"])
    prompt_token = t(cases[f"{name}.prompt_token"])
    prompt_feat = t(cases[f"{name}.prompt_feat"])
    if cache is None:
        cache = t(cases[f"{name}.cache_in"])
    generator = torch.Generator().manual_seed(int(cases[f"{name}.seed"]))
    return flow.inference(
        token=token,
        token_len=torch.tensor([token.shape[1]], dtype=torch.int32),
        prompt_token=prompt_token,
        prompt_token_len=torch.tensor([prompt_token.shape[1]], dtype=torch.int32),
        prompt_feat=prompt_feat,
        prompt_feat_len=torch.tensor([prompt_feat.shape[1]], dtype=torch.int32),
        embedding=t(cases[f"{name}.embedding"]),
        flow_cache=cache,
        generator=generator,
    )


@pytest.mark.parametrize("name", CASES)
def test_flow_inference_matches_official(
    flow: MaskedDiffWithXvec, cases: dict[str, np.ndarray], name: str
) -> None:
    mel, cache = run_case(flow, cases, name)
    assert_close(mel, cases[f"{name}.mel"])
    assert_close(cache, cases[f"{name}.cache_out"])


def test_flow_streaming_cache_matches_official(
    flow: MaskedDiffWithXvec, cases: dict[str, np.ndarray]
) -> None:
    mel1, cache1 = run_case(flow, cases, "stream_first")
    assert_close(mel1, cases["stream_first.mel"])
    mel2, cache2 = run_case(flow, cases, "stream_second", cache=cache1)
    assert_close(mel2, cases["stream_second.mel"])
    assert_close(cache2, cases["stream_second.cache_out"])


def test_flow_empty_cache_equals_none(
    flow: MaskedDiffWithXvec, cases: dict[str, np.ndarray]
) -> None:
    mel_empty, _ = run_case(flow, cases, "short_prompt")
    mel_none, _ = run_case(flow, cases, "short_prompt", cache=torch.zeros(1, 80, 0, 2))
    assert torch.equal(mel_empty, mel_none)


def test_flow_rejects_empty_tokens(flow: MaskedDiffWithXvec, cases: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError):
        flow.inference(
            token=torch.zeros(1, 0, dtype=torch.int32),
            token_len=torch.tensor([0]),
            prompt_token=torch.zeros(1, 0, dtype=torch.int32),
            prompt_token_len=torch.tensor([0]),
            prompt_feat=torch.zeros(1, 0, 80),
            prompt_feat_len=torch.tensor([0]),
            embedding=t(cases["short_prompt.embedding"]),
            flow_cache=None,
            generator=torch.Generator().manual_seed(0),
        )
