"""HiFT vocoders (v1/v2 HiFTGenerator, v3 CausalHiFTGenerator) against the official code.

Golden data: tools/golden/hift.py (tiny official generators, their state dicts, mels, outputs).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _golden import golden_file

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.networks.hift import (
    ConvRNNF0Predictor,
    HiFTGenerator,
    Snake,
    load_hift_state_dict,
)
from cosyvoice_lite.networks.hift_causal import (
    CausalConvRNNF0Predictor,
    CausalHiFTGenerator,
    FixedSourceRandomness,
)

ATOL = 1e-4

TINY = dict(
    in_channels=80,
    base_channels=16,
    nb_harmonics=8,
    nsf_alpha=0.1,
    nsf_sigma=0.003,
    nsf_voiced_threshold=10,
    istft_params={"n_fft": 16, "hop_len": 4},
    resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5]] * 3,
    lrelu_slope=0.1,
    audio_limit=0.99,
)
TINY_V1 = dict(
    TINY,
    sampling_rate=22050,
    upsample_rates=[8, 8],
    upsample_kernel_sizes=[16, 16],
    source_resblock_kernel_sizes=[7, 11],
    source_resblock_dilation_sizes=[[1, 3, 5]] * 2,
)
TINY_V2 = dict(
    TINY,
    sampling_rate=24000,
    upsample_rates=[8, 5, 3],
    upsample_kernel_sizes=[16, 11, 7],
    source_resblock_kernel_sizes=[7, 7, 11],
    source_resblock_dilation_sizes=[[1, 3, 5]] * 3,
)
TINY_V3 = dict(TINY_V2, conv_pre_look_right=4)
COND = 16


def golden(version: str) -> dict[str, np.ndarray]:
    with np.load(golden_file(f"hift/{version}.npz")) as z:
        return {k: z[k] for k in z.files}


def official_state_dict(data: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The official state dict in its current spelling (`parametrizations.weight.original0/1`)."""
    return {k[3:]: torch.from_numpy(v) for k, v in data.items() if k.startswith("sd/")}


def to_legacy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights as the legacy `torch.nn.utils.weight_norm` saves them."""
    return {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state_dict.items()
    }


def build(version: str) -> torch.nn.Module:
    if version == "v3":
        return CausalHiFTGenerator(
            **TINY_V3, f0_predictor=CausalConvRNNF0Predictor(1, 80, COND)
        ).eval()
    cfg = TINY_V1 if version == "v1" else TINY_V2
    return HiFTGenerator(**cfg, f0_predictor=ConvRNNF0Predictor(1, 80, COND)).eval()


def loaded(version: str) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    data = golden(version)
    model = build(version)
    load_hift_state_dict(model, official_state_dict(data))
    return model, data


def assert_close(ours: torch.Tensor, theirs: np.ndarray) -> float:
    assert tuple(ours.shape) == theirs.shape
    err = float((ours.float() - torch.from_numpy(theirs)).abs().max())
    assert err < ATOL, err
    return err


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_both_weight_norm_spellings_load_strictly_and_agree(version: str) -> None:
    sd = official_state_dict(golden(version))
    assert any("parametrizations.weight.original0" in k for k in sd)
    new_style, legacy = build(version), build(version)
    load_hift_state_dict(new_style, sd)
    legacy.load_state_dict(to_legacy(sd), strict=True)  # plain load_state_dict works too
    for (name, a), (_, b) in zip(
        new_style.state_dict().items(), legacy.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_folded_weight_is_g_times_v_over_norm_with_in_channels_as_dim0_for_transposed_convs() -> (
    None
):
    sd = official_state_dict(golden("v1"))
    model = build("v1")
    load_hift_state_dict(model, sd)
    g, v = (
        sd["ups.0.parametrizations.weight.original0"],
        sd["ups.0.parametrizations.weight.original1"],
    )
    assert g.shape == (16, 1, 1) and v.shape == (16, 8, 16)  # ConvTranspose1d: dim 0 = in_channels
    expected = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(model.ups[0].weight, expected, rtol=1e-6, atol=1e-7)


def test_generator_prefix_is_stripped() -> None:
    sd = {"generator." + k: v for k, v in to_legacy(official_state_dict(golden("v2"))).items()}
    load_hift_state_dict(build("v2"), sd)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: sd.pop("conv_post.bias"), "conv_post.bias"),
        (lambda sd: sd.pop("resblocks.0.convs1.0.weight_v"), "resblocks.0.convs1.0.weight_g"),
        (lambda sd: sd.update({"m_source.extra": torch.zeros(1)}), "m_source.extra"),
        (
            lambda sd: sd.update({"m_source.l_linear.weight": torch.zeros(1, 8)}),
            "m_source.l_linear.weight",
        ),
        (lambda sd: sd.update({"conv_pre.weight_g": torch.ones(3, 1, 1)}), "weight-norm magnitude"),
        (lambda sd: sd.update({"f0_predictor.condnet.0.weight": torch.zeros(16, 80, 3)}), "both"),
    ],
)
def test_corrupted_checkpoint_fails_with_clear_error(corrupt, message: str) -> None:  # type: ignore[no-untyped-def]
    sd = to_legacy(official_state_dict(golden("v1")))
    corrupt(sd)
    with pytest.raises(ModelDirError, match=message):
        load_hift_state_dict(build("v1"), sd)


def test_causal_f0_predictor_keeps_float64_weights() -> None:
    model, _ = loaded("v3")
    assert all(p.dtype == torch.float64 for p in model.f0_predictor.parameters())
    assert model.conv_pre.weight.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# v1 / v2 parity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("seed", [0, 42])
def test_waveform_matches_official_with_seeded_generator(version: str, seed: int) -> None:
    model, data = loaded(version)
    generator = torch.Generator().manual_seed(seed)
    speech, source = model.inference(torch.from_numpy(data["mel_a"]), None, generator)
    assert_close(source, data[f"source_a_seed{seed}"])
    assert_close(speech, data[f"speech_a_seed{seed}"])
    # the generator consumed exactly as many numbers as the official global RNG
    assert torch.equal(
        torch.rand(4, generator=generator), torch.from_numpy(data[f"rng_after_a_seed{seed}"])
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cache_source_overrides_the_source_head(version: str) -> None:
    model, data = loaded(version)
    generator = torch.Generator().manual_seed(5)
    cache_source = torch.from_numpy(data["cache_source"])
    speech, source = model.inference(torch.from_numpy(data["mel_b"]), cache_source, generator)
    assert torch.equal(source[:, :, : cache_source.shape[2]], cache_source)
    assert_close(source, data["source_b_cached"])
    assert_close(speech, data["speech_b_cached"])
    assert torch.equal(
        torch.rand(4, generator=generator), torch.from_numpy(data["rng_after_b_cached"])
    )


def test_empty_cache_source_is_no_cache() -> None:
    model, data = loaded("v2")
    mel = torch.from_numpy(data["mel_a"])
    a, _ = model.inference(mel, torch.zeros(1, 1, 0), torch.Generator().manual_seed(0))
    b, _ = model.inference(mel, None, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_f0_predictor_matches_official() -> None:
    model, data = loaded("v1")
    with torch.no_grad():
        f0 = model.f0_predictor(torch.from_numpy(data["mel_a"]))
    assert_close(f0, data["f0_a"])


def test_bad_inputs_raise_invalid_request() -> None:
    model, data = loaded("v2")
    with pytest.raises(ValueError, match="80"):
        model.inference(torch.zeros(1, 40, 10), None, torch.Generator())
    with pytest.raises(ValueError, match="cache_source"):
        model.inference(
            torch.from_numpy(data["mel_b"]), torch.zeros(1, 1, 10**6), torch.Generator()
        )


# --------------------------------------------------------------------------------------------
# v3 parity
# --------------------------------------------------------------------------------------------


def test_v3_fixed_buffers_follow_the_official_construction_order() -> None:
    model, data = loaded("v3")
    fixed = model.m_source.l_sin_gen.fixed
    assert torch.equal(fixed.rand_ini(), torch.from_numpy(data["rand_ini"]))


def test_v3_release_buffers_are_reproduced_bit_exactly() -> None:
    with np.load(golden_file("hift/v3_release_buffers.npz")) as z:
        rand_ini, head = z["rand_ini"], z["sine_waves_head"]
    shapes = [p.shape for p in CausalConvRNNF0Predictor(1, 80, 512).parameters()]
    fixed = FixedSourceRandomness(shapes)
    assert torch.equal(fixed.rand_ini(), torch.from_numpy(rand_ini))
    small = fixed.sine_waves(100)
    assert torch.equal(small, torch.from_numpy(head[:, :100]))
    assert torch.equal(fixed.sine_waves(head.shape[1]), torch.from_numpy(head))  # grown prefix
    with pytest.raises(ValueError, match="300 s"):
        fixed.sine_waves(300 * 24000 + 1)


def test_v3_finalized_waveform_matches_official() -> None:
    model, data = loaded("v3")
    speech, source = model.inference(torch.from_numpy(data["mel_a"]), finalize=True)
    assert speech.shape[1] == data["mel_a"].shape[2] * 480
    assert_close(source, data["source_final"])
    assert_close(speech, data["speech_final"])


@pytest.mark.parametrize("frames", [9, 14, 20])
def test_v3_streaming_waveform_matches_official(frames: int) -> None:
    model, data = loaded("v3")
    speech, source = model.inference(torch.from_numpy(data["mel_a"][:, :, :frames]), finalize=False)
    assert speech.shape[1] == (frames - 8) * 480
    assert_close(source, data[f"source_stream{frames}"])
    assert_close(speech, data[f"speech_stream{frames}"])


def test_v3_streaming_prefix_agrees_with_the_full_pass() -> None:
    model, data = loaded("v3")
    mel = torch.from_numpy(data["mel_a"])
    full, _ = model.inference(mel, finalize=True)
    part, _ = model.inference(mel[:, :, :14], finalize=False)
    assert (full[:, : part.shape[1]] - part).abs().max() < 1e-5


def test_v3_too_short_streaming_input_raises() -> None:
    model, _ = loaded("v3")
    with pytest.raises(ValueError, match="at least 8"):
        model.inference(torch.zeros(1, 80, 7), finalize=False)


def test_v3_vocoder_can_be_deep_copied() -> None:
    model, data = loaded("v3")
    mel = torch.from_numpy(data["mel_a"][:, :, :9])
    a, _ = model.inference(mel, finalize=False)
    b, _ = copy.deepcopy(model).inference(mel, finalize=False)
    assert torch.equal(a, b)


def test_snake_in_half_precision_stays_finite_for_small_alpha() -> None:
    # in float16, 1e-9 is 0 and 1 / alpha overflows for |alpha| < 1.5e-5 (inf * 0 = nan)
    snake = Snake(3)
    with torch.no_grad():
        snake.alpha.copy_(torch.tensor([0.0, 1e-6, 0.5]))
    x = torch.linspace(-3, 3, 3 * 7).view(1, 3, 7)
    reference = snake(x)  # float32: the formula as before
    alpha = snake.alpha.view(1, 3, 1)
    assert torch.equal(reference, x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha) ** 2)
    half = snake.half()(x.half())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_whole_utterances_vocoded_as_one_padded_batch_equal_each_alone(version: str) -> None:
    """``inference_rows``: mels of different lengths in one zero-padded batch give each row's
    waveform as alone (same length, within 1e-4; the non-causal stack zeroes every row past its
    end, the causal one never looks there)."""
    model, data = loaded(version)
    mel = torch.from_numpy(data["mel_a"])
    mels = [mel, mel[:, :, 3:].flip(2).contiguous(), mel[:, :, :5] * 0.5]
    if version == "v3":
        alone = [model.inference(m, finalize=True)[0] for m in mels]
        rows = model.inference_rows(mels)
    else:
        alone = [
            model.inference(m, None, torch.Generator().manual_seed(i))[0]
            for i, m in enumerate(mels)
        ]
        rows = model.inference_rows(mels, [torch.Generator().manual_seed(i) for i in range(3)])
    for single, row in zip(alone, rows, strict=True):
        assert row.shape == single.shape
        torch.testing.assert_close(row, single, atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_streams_vocoded_together_equal_each_alone(version: str) -> None:
    """``stream_steps``: several streams' next chunks (different lengths, different histories,
    a final one among them) in one padded batch give each stream's samples and state as
    ``stream_step`` alone."""
    model, data = loaded(version)
    mel = torch.from_numpy(data["mel_a"])
    chunks = [[mel[:, :, :12], mel[:, :, 12:]], [mel[:, :, 5:] * 0.7], [mel.flip(2)[:, :, :16]]]
    v3 = version == "v3"

    def streams() -> list:
        return [model.new_stream() if v3 else model.new_stream(8) for _ in chunks]

    def step(states, index: int, finals: list[bool], together: bool) -> list[torch.Tensor]:
        live = [i for i, c in enumerate(chunks) if index < len(c)]
        args = [[states[i] for i in live], [chunks[i][index] for i in live]]
        if not v3:
            args += [[torch.Generator().manual_seed(i * 10 + index) for i in live]]
        args += [[finals[i] for i in live]] + ([] if v3 else [[1.0] * len(live)])
        if together:
            return model.stream_steps(*args)
        return [model.stream_step(*row) for row in zip(*args, strict=True)]

    alone, batch = streams(), streams()
    for index, finals in ((0, [False, False, False]), (1, [True, True, True])):
        want = step(alone, index, finals, together=False)
        got = step(batch, index, finals, together=True)
        for a, b in zip(want, got, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_a_vocoder_stops_between_its_stages(version: str) -> None:
    """A cancelled request's (or a closing engine's) vocoding stops at its next stage or
    resblock (networks.abort): a 2-minute CosyVoice2 utterance's vocoder went on ~4 s after
    its request was cancelled. Every check stops it; none changes the waveform."""
    from cosyvoice_lite.networks.abort import ComputationAborted, abort_when

    model, data = loaded(version)
    mel = torch.from_numpy(data["mel_a"])

    def vocode() -> torch.Tensor:
        if version == "v3":
            return model.inference(mel, finalize=True)[0]
        return model.inference(mel, None, torch.Generator().manual_seed(0))[0]

    asked: list[bool] = []
    with abort_when(lambda: bool(asked.append(True))):
        speech = vocode()
    assert torch.equal(speech, vocode())
    # the source, every stage, every resblock after a stage's first, the waveform
    assert len(asked) >= 2 + len(model.ups) * model.num_kernels + 1
    for stop_at in range(1, len(asked) + 1):
        with (
            abort_when(_true_at(stop_at)),
            pytest.raises(ComputationAborted, match="vocoder"),
        ):
            vocode()


def _true_at(ask: int):  # type: ignore[no-untyped-def]
    """An abort condition that holds from its ``ask``-th call."""
    asked = iter(range(1, ask))
    return lambda: next(asked, None) is None
