"""Precision chosen once at load: weights really stored in bfloat16/float16, int8 LLM linear
layers, outputs within stated bounds of float32 on the tiny models, the flow step option, and
clear errors for what a device does not support."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cosyvoice_lite import Engine, Mode, SynthesisRequest
from cosyvoice_lite.device import Placement, check_precision, cpu_features, resolve_placement
from cosyvoice_lite.errors import DeviceError, InvalidRequestError
from cosyvoice_lite.mapped_tables import MappedEmbedding
from cosyvoice_lite.modeldir import open_model_dir
from cosyvoice_lite.networks.conv_layout import is_channels_last
from cosyvoice_lite.networks.flow_matching import OFFICIAL_STEPS
from cosyvoice_lite.networks.linear import FusedLinear, fuse_linear_groups
from cosyvoice_lite.pipelines.factory import load_network
from cosyvoice_lite.precision import (
    CHUNK_ROWS,
    EXACT_ROWS,
    MAX_CHUNK_ROWS,
    PackedLinear,
    exempt_names,
    has_int8_products,
    int8_product_kernel,
    keeps_official_floats,
    packs_linear,
    padded_rows,
    quantize_products_int8,
    stores_channels_last,
    stream_cache_dtype,
    tied_to_embeddings,
)
from cosyvoice_lite.quantized_linear import Int8Linear, Int8MatmulLinear

DATA = Path(__file__).resolve().parent / "data"
MODELS = DATA / "models"
PARTS = (("llm", "llm.pt"), ("flow", "flow.pt"), ("hift", "hift.pt"))

# What stays in its own dtype, and only that (the reasons live next to each declaration).
HIFT_EXEMPT = {"f0_predictor", "m_source", "stft_window"}
FLOW_EXEMPT = {1: set(), 2: {"decoder.rand_noise"}, 3: {"decoder.rand_noise"}}

# Relative L2 error bounds against float32 on the tiny models (measured: flow mel <= 0.006 bf16,
# <= 0.0006 fp16; vocoder <= 0.20 bf16, <= 0.04 fp16: the tiny random vocoders amplify the
# rounding of their weights alone to 3-9%; at full size the bf16 waveform error is 0.006-0.008).
MEL_BOUND = {torch.bfloat16: 0.02, torch.float16: 0.003}
WAV_BOUND = {torch.bfloat16: 0.3, torch.float16: 0.1}
# Teacher-forced log-probability error (mean absolute, nats) on the tiny LLMs (measured <= 0.04
# bf16, <= 0.005 fp16). int8 (a scale per block of 128 weights and per block of each activation
# row): measured 0.049 (v1) and 0.058 (v2), 93% of the argmax tokens the same.
LOGP_BOUND = {torch.bfloat16: 0.08, torch.float16: 0.02}
INT8_LOGP_BOUND = 0.12


def _float_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    return {name: t for name, t in tensors.items() if t.is_floating_point()}


def _under(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_weights_are_stored_in_the_chosen_dtype(version: int, dtype: str) -> None:
    model = open_model_dir(MODELS / f"v{version}-tiny")
    placement = resolve_placement("cpu", dtype)
    for part, filename in PARTS:
        network = load_network(model, part, filename, placement)
        exempt = set(exempt_names(network))
        if part == "hift":
            assert exempt == HIFT_EXEMPT
        elif part == "flow":
            rope = {n for n in exempt if n.endswith("rotary_embed.inv_freq")}
            assert exempt - rope == FLOW_EXEMPT[version] and (version == 3) == bool(rope)
        # the LLM's text table stays the checkpoint file's float32 pages (mapped_tables.py)
        mapped = {n for n, m in network.named_modules() if isinstance(m, MappedEmbedding)}
        assert bool(mapped) == (part == "llm"), (part, mapped)
        exempt |= mapped
        tensors = _float_tensors(network)
        kept = {n: t.dtype for n, t in tensors.items() if _under(n, exempt)}
        lowered = {n: t.dtype for n, t in tensors.items() if not _under(n, exempt)}
        assert lowered and set(lowered.values()) == {placement.dtype}, (part, lowered)
        assert set(kept.values()) <= {torch.float32, torch.float64}, (part, kept)
        if part == "hift" and version == 3:  # the official CosyVoice3 f0 predictor is float64
            assert {t.dtype for t in network.f0_predictor.parameters()} == {torch.float64}


@pytest.mark.parametrize("version", [1, 2])
def test_int8_quantises_every_llm_linear_layer(version: int) -> None:
    model = open_model_dir(MODELS / f"v{version}-tiny")
    placement = resolve_placement("cpu")
    reference = load_network(model, "llm", "llm.pt", placement, kernels=False)  # official tree
    tables = tied_to_embeddings(reference)  # e.g. Qwen2's unused lm_head: left alone
    linear = [m for m in reference.modules() if type(m) is nn.Linear and m not in tables]
    llm = load_network(model, "llm", "llm.pt", resolve_placement("cpu", quantize="int8"))
    quantised = [m for m in llm.modules() if isinstance(m, Int8Linear)]
    # the fused groups (q/k/v, gate/up) are quantised as one layer each: same weights, fewer calls
    assert linear and sum(m.in_features * m.out_features for m in quantised) == sum(
        m.weight.numel() for m in linear
    )
    assert len(quantised) < len(linear)
    assert {n for n, m in llm.named_modules() if type(m) is nn.Linear} == {
        n for n, m in reference.named_modules() if m in tables
    }
    # the U-Net flows declare no int8 products: they keep their dtype
    flow = load_network(model, "flow", "flow.pt", resolve_placement("cpu", quantize="int8"))
    assert {t.dtype for t in _float_tensors(flow).values()} == {torch.float32}
    assert not has_int8_products(flow)


def test_int8_flow_products_only_where_declared() -> None:
    """int8 quantises the DiT's attention and feed-forward products (W8A8) and nothing else of
    the flow: the time and modulation layers, the input and output projections keep the dtype.
    On a CPU their kernel is ``torch._int_mm`` where the CPU has VNNI or AMX, onnxruntime's
    elsewhere (the same integers, test_quantized_linear.py); a bfloat16 flow on AMX tiles keeps
    its bfloat16 products (faster there), a float32 one takes int8 on every CPU."""
    model = open_model_dir(MODELS / "v3-tiny")
    bf16 = load_network(model, "flow", "flow.pt", resolve_placement("cpu", "bfloat16", "int8"))
    assert has_int8_products(bf16) != cpu_features().amx
    placement = resolve_placement("cpu", "float32", "int8")
    flow = load_network(model, "flow", "flow.pt", placement)
    kernel = "torch" if cpu_features().int8_products else "onnxruntime"
    assert int8_product_kernel(placement) == kernel
    assert {m.kernel for m in flow.modules() if isinstance(m, Int8MatmulLinear)} == {kernel}
    assert has_int8_products(flow)
    estimator = flow.decoder.estimator
    quantised = {n for n, m in estimator.named_modules() if isinstance(m, Int8MatmulLinear)}
    per_block = {"attn.qkv.linear", "attn.to_out.0", "ff.ff.0.0", "ff.ff.2"}
    assert quantised == {
        f"transformer_blocks.{i}.{n}" for i in range(estimator.depth) for n in per_block
    }
    assert sum(isinstance(m, Int8MatmulLinear) for m in flow.modules()) == len(quantised)
    packed = any(isinstance(m, PackedLinear) for m in estimator.modules())
    assert packed == packs_linear(placement)  # the rest: packed where oneDNN packs it
    # export loads without the load-time kernels: no int8 there
    plain = load_network(
        model, "flow", "flow.pt", resolve_placement("cpu", "bfloat16", "int8"), kernels=False
    )
    assert not has_int8_products(plain)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_llm_decoding_kernels_keep_the_outputs(version: int) -> None:
    """The load-time LLM kernels (fused q/k/v and gate/up, oneDNN-packed weights) change how the
    products are computed, not what: teacher-forced log-probabilities within float32 rounding."""
    model = open_model_dir(MODELS / f"v{version}-tiny")
    placement = resolve_placement("cpu")
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 100, (1, n), generator=g, dtype=torch.int32) for n in (12, 6, 10, 30)]
    embedding = torch.randn(1, 192, generator=g)

    def log_probs(kernels: bool) -> tuple[torch.Tensor, nn.Module]:
        lm = load_network(model, "llm", "llm.pt", placement, kernels=kernels)
        with torch.inference_mode():
            extra = (embedding,) if version == 1 else ()
            logits = lm.teacher_forced_logits(*ids[:3], *extra, ids[3])
        return logits.float().log_softmax(dim=-1), lm

    reference, plain = log_probs(kernels=False)
    fast, lm = log_probs(kernels=True)
    assert torch.allclose(fast, reference, atol=1e-4, rtol=0)
    assert any(isinstance(m, FusedLinear) for m in lm.modules())
    assert not any(isinstance(m, FusedLinear) for m in plain.modules())
    packed = [m for m in lm.modules() if isinstance(m, PackedLinear)]
    assert bool(packed) == packs_linear(placement)
    tables = tied_to_embeddings(lm)
    assert all(m in tables for m in lm.modules() if type(m) is nn.Linear) or not packed


def _flow_and_vocoder(
    version: int,
    dtype: str,
    kernels: bool = True,
    quantize: str | None = None,
    w8a8: bool = False,
    exact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mel of fixed tokens, and the waveform of a fixed (float32) mel, at ``dtype``;
    ``w8a8``: the flow's declared int8 products with ``torch._int_mm`` (loading picks this CPU's
    kernel). Those are made from the official layers (loaded without kernels, where a CPU with
    bfloat16 products would have packed them already), fused as loading fuses them. ``exact``:
    float32 products by torch's default kernels (``Placement.exact_float32``)."""
    model = open_model_dir(MODELS / f"v{version}-tiny")
    placement = resolve_placement("cpu", dtype, quantize, exact_float32=exact)
    flow = load_network(model, "flow", "flow.pt", placement, kernels=kernels and not w8a8)
    if w8a8:
        quantize_products_int8(flow, "torch", fuse=True)
        fuse_linear_groups(flow)
    assert any(isinstance(m, FusedLinear) for m in flow.modules()) == kernels
    hift = load_network(model, "hift", "hift.pt", placement)
    g = torch.Generator().manual_seed(0)
    token = torch.randint(0, 100, (1, 40), generator=g, dtype=torch.int32)
    prompt = torch.randint(0, 100, (1, 20), generator=g, dtype=torch.int32)
    frames = int(20 / 50 * 22050 / 256) if version == 1 else 40
    feat = torch.randn(1, frames, 80, generator=g)
    embedding = torch.randn(1, 192, generator=g)
    mel_in = torch.randn(1, 80, 60, generator=g) - 4

    def length(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([x.shape[1]], dtype=torch.int32)

    args = (token, length(token), prompt, length(prompt), feat, length(feat), embedding)
    with torch.inference_mode():
        if version == 1:
            mel = flow.inference(*args, None, torch.Generator().manual_seed(1))[0]
        else:
            mel = flow.inference(*args, streaming=False, finalize=True)[0]
    wav = _vocode(hift, mel_in, version)
    assert mel.dtype == wav.dtype == torch.float32  # outputs are float32 whatever the weights
    return mel, wav


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def _same_bfloat16_products(x: torch.Tensor, ref: torch.Tensor) -> bool:
    """Mels of bfloat16 products by oneDNN's packed weights and by torch's plain kernel: the
    same floats, except on AMX tiles, which sum in another order (measured on the tiny v2/v3
    flows: relative 0.0022 / 0.0030, as far as bfloat16 itself is from float32)."""
    if cpu_features().amx:
        return _relative(x, ref) < MEL_BOUND[torch.bfloat16] / 2
    return torch.equal(x, ref)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_flow_fused_linear_groups_give_the_same_mel(version: int) -> None:
    """The flows' q/k/v run as one product after loading: every output column is the same dot
    product as in the official module tree, so the mel keeps its floats (with the default
    kernels that the official uses)."""
    fused, _ = _flow_and_vocoder(version, "float32", exact=True)
    official_tree, _ = _flow_and_vocoder(version, "float32", kernels=False)
    assert torch.equal(fused, official_tree)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_flow_packed_weights_keep_the_mel(version: int) -> None:
    """The flow's linear layers are packed for oneDNN at load where it packs them: in bfloat16
    the same floats (on an AMX CPU, whose tiles sum the packed products in another order, within
    bfloat16's rounding); in float32 oneDNN sums in another order than torch's default kernels,
    the mel within float32 rounding of the official's floats (kept by ``exact_float32``)."""
    model = open_model_dir(MODELS / f"v{version}-tiny")
    for dtype, exact in (("float32", False), ("float32", True), ("bfloat16", False)):
        placement = resolve_placement("cpu", dtype, exact_float32=exact)
        flow = load_network(model, "flow", "flow.pt", placement)
        packed = any(isinstance(m, PackedLinear) for m in flow.modules())
        assert packed == packs_linear(placement) and not (exact and packed)
    fast, _ = _flow_and_vocoder(version, "bfloat16")
    plain, _ = _flow_and_vocoder(version, "bfloat16", kernels=False)
    assert _same_bfloat16_products(fast, plain)
    packed32, _ = _flow_and_vocoder(version, "float32")
    exact32, _ = _flow_and_vocoder(version, "float32", exact=True)
    assert (packed32 - exact32).abs().max() < 1e-4 and _relative(packed32, exact32) < 1e-5


@pytest.mark.parametrize("version", [1, 2, 3])
def test_vocoder_convolutions_are_stored_channels_last_where_they_keep_the_waveform(
    version: int,
) -> None:
    """On a CPU the vocoder's convolution weights are stored channels-last at load (bfloat16, and
    float32 unless ``exact_float32``), but the exempt f0 predictor's; export (no kernels) and
    ``exact_float32`` keep the default layout. The waveform: bfloat16 the same floats on AMX
    (measured: also at full size), float32 within 1e-4 of the default kernels'."""
    model = open_model_dir(MODELS / f"v{version}-tiny")
    mel = torch.randn(1, 80, 60, generator=torch.Generator().manual_seed(0)) - 4
    if not stores_channels_last(resolve_placement("cpu", "float32")):
        pytest.skip("torch without oneDNN: the default layout everywhere")

    def vocode(dtype: str, kernels: bool = True, exact: bool = False) -> tuple[torch.Tensor, int]:
        placement = resolve_placement("cpu", dtype, exact_float32=exact)
        hift = load_network(model, "hift", "hift.pt", placement, kernels=kernels)
        convs = {
            name: is_channels_last(m.weight)
            for name, m in hift.named_modules()
            if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)) and min(m.weight.shape[1:]) > 1
        }
        expected = kernels and stores_channels_last(placement)
        assert all(on == (expected and not _under(name, HIFT_EXEMPT)) for name, on in convs.items())
        return _vocode(hift, mel, version), sum(convs.values())

    fast16, stored = vocode("bfloat16")
    plain16, none = vocode("bfloat16", kernels=False)
    assert none == 0 and (stored > 0) == stores_channels_last(resolve_placement("cpu", "bfloat16"))
    # the same floats on an AMX CPU (measured); elsewhere bfloat16 kernels may round otherwise
    assert torch.equal(fast16, plain16) or not cpu_features().amx
    assert _relative(fast16, plain16) < WAV_BOUND[torch.bfloat16] / 10
    fast32, stored = vocode("float32")
    exact32, none = vocode("float32", exact=True)
    # the tiny random vocoders amplify float32 rounding (measured: relative 3e-6 to 1.7e-5, up to
    # 8e-5 of a waveform at 0.99; at full size 3.5e-7 of 0.07)
    assert stored > 0 and none == 0 and _relative(fast32, exact32) < 1e-4


@pytest.mark.parametrize("version", [2, 3])
def test_channels_last_vocoders_batch_and_stream_as_loaded_without(version: int) -> None:
    """Padded batches of whole utterances (masked per row) and, for the causal CosyVoice3
    vocoder, a stream's windows with their look-ahead: with channels-last convolutions as with
    the default layout (bfloat16: the same floats on an AMX CPU)."""
    model = open_model_dir(MODELS / f"v{version}-tiny")
    placement = resolve_placement("cpu", "bfloat16")
    if not stores_channels_last(placement):
        pytest.skip("no channels-last convolutions on this CPU")
    g = torch.Generator().manual_seed(0)
    mels = [torch.randn(1, 80, n, generator=g) - 4 for n in (60, 41)]

    def run(kernels: bool) -> list[torch.Tensor]:
        hift = load_network(model, "hift", "hift.pt", placement, kernels=kernels)
        with torch.inference_mode():
            if version == 3:
                out = hift.inference_rows(mels)
                state = hift.new_stream()
                out += [
                    hift.stream_step(state, mels[0][:, :, a:b], finalize=b == 60)
                    for a, b in ((0, 17), (17, 40), (40, 60))
                ]
            else:
                gens = [torch.Generator().manual_seed(i) for i in range(len(mels))]
                out = hift.inference_rows(mels, gens)
        return out

    fast, plain = run(kernels=True), run(kernels=False)
    for a, b in zip(fast, plain, strict=True):
        assert torch.equal(a, b) or (not cpu_features().amx and _relative(a, b) < 0.03)


def _vocode(hift: nn.Module, mel: torch.Tensor, version: int) -> torch.Tensor:
    """A whole mel's waveform (v1/v2: a seeded source)."""
    with torch.inference_mode():
        if version == 3:
            return hift.inference(mel)[0]
        return hift.inference(mel, None, torch.Generator().manual_seed(1))[0]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_flow_and_vocoder_within_bounds_of_float32(version: int) -> None:
    mel32, wav32 = _flow_and_vocoder(version, "float32")
    for dtype in (torch.bfloat16, torch.float16):
        mel, wav = _flow_and_vocoder(version, str(dtype).removeprefix("torch."))
        assert 0 < _relative(mel, mel32) < MEL_BOUND[dtype], dtype
        assert 0 < _relative(wav, wav32) < WAV_BOUND[dtype], dtype


def test_int8_flow_within_bounds_of_float32() -> None:
    """CosyVoice3's int8 flow (W8A8 DiT products, bf16 elsewhere) against float32: about the error
    of bfloat16 alone (measured on the tiny model, relative L2: 0.0040 against 0.0031; int8 with
    float32 elsewhere 0.0027). Loaded with int8, the flow has them with this CPU's kernel, which
    gives the same mel as ``torch._int_mm``'s."""
    mel32, _ = _flow_and_vocoder(3, "float32")
    mel_bf16, _ = _flow_and_vocoder(3, "bfloat16")
    mel_int8, _ = _flow_and_vocoder(3, "bfloat16", quantize="int8")
    mel_w8a8, _ = _flow_and_vocoder(3, "bfloat16", w8a8=True)
    if cpu_features().amx:  # loaded with int8, a bfloat16 flow keeps its (faster) products
        assert torch.equal(mel_int8, mel_bf16)
    else:
        assert _same_bfloat16_products(mel_int8, mel_w8a8)  # its bfloat16 layers are packed
    assert not torch.equal(mel_w8a8, mel_bf16)
    assert 0 < _relative(mel_w8a8, mel32) < MEL_BOUND[torch.bfloat16]


@pytest.mark.parametrize("version", [1, 2])
def test_llm_teacher_forced_log_probs_within_bounds(version: int) -> None:
    model = open_model_dir(MODELS / f"v{version}-tiny")
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 1000, (1, 12), generator=g, dtype=torch.int32)
    prompt_text = torch.randint(0, 1000, (1, 6), generator=g, dtype=torch.int32)
    prompt_speech = torch.randint(0, 100, (1, 10), generator=g, dtype=torch.int32)
    speech = torch.randint(0, 100, (1, 30), generator=g, dtype=torch.int32)
    embedding = torch.randn(1, 192, generator=g)

    def log_probs(dtype: str = "float32", quantize: str | None = None) -> torch.Tensor:
        lm = load_network(model, "llm", "llm.pt", resolve_placement("cpu", dtype, quantize))
        with torch.inference_mode():
            if version == 1:
                return lm.teacher_forced_logits(text, prompt_text, prompt_speech, embedding, speech)
            logits = lm.teacher_forced_logits(text, prompt_text, prompt_speech, speech)
            return logits[-31:-1].float().log_softmax(dim=-1)

    reference = log_probs()
    for dtype, bound in LOGP_BOUND.items():
        error = (log_probs(str(dtype).removeprefix("torch.")).float() - reference).abs().mean()
        assert 0 < error < bound, (dtype, error)
    int8 = log_probs(quantize="int8").float()
    agree = (int8.argmax(-1) == reference.argmax(-1)).float().mean()
    assert 0 < (int8 - reference).abs().mean() < INT8_LOGP_BOUND and agree >= 0.85


@pytest.mark.parametrize("version", [2, 3])
def test_engine_bf16_int8_fixed_length_audio(
    version: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cosyvoice_lite.engine"):
        engine = Engine.load(MODELS / f"v{version}-tiny", dtype="bfloat16", quantize="int8")
    # loading tells a user whose CPU emulates bfloat16, and nobody else
    warned = any("no bfloat16 matrix instructions" in r.getMessage() for r in caplog.records)
    assert warned == (not cpu_features().bfloat16_products)
    request = SynthesisRequest(
        Mode.ZERO_SHOT,
        "你好。",
        prompt_audio=DATA / "audio" / "zh_16k.wav",
        prompt_text="希望你以后能够做的比我还好呦。",
        seed=3,
        max_speech_tokens=30,
        ignore_eos=True,
    )
    for stream in (False, True):
        chunks = list(engine.synthesize(replace(request, stream=stream)))
        audio = np.concatenate([c.samples for c in chunks])
        assert audio.dtype == np.float32 and np.isfinite(audio).all()
        assert len(audio) == 30 * 2 * 480  # 30 tokens x 2 mel frames x 480 samples
    # int8: the LLM's thread decodes on one torch thread (its products are onnxruntime's), the
    # audio workers and threads started later keep the process's count
    threads = torch.get_num_threads()
    assert engine.call(torch.get_num_threads).result() == 1
    assert engine.loop.background(torch.get_num_threads).result() == threads
    counts: list[int] = []
    fresh = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert counts == [threads] and torch.get_num_threads() == threads
    engine.close()


def test_flow_steps_is_a_load_time_option() -> None:
    model = open_model_dir(MODELS / "v2-tiny")
    flow = load_network(model, "flow", "flow.pt", resolve_placement("cpu"))
    assert flow.decoder.steps == OFFICIAL_STEPS == 10
    calls: list[int] = []
    flow.decoder.estimator.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    token = torch.randint(0, 100, (1, 30), generator=g, dtype=torch.int32)
    prompt = torch.randint(0, 100, (1, 10), generator=g, dtype=torch.int32)
    feat, embedding = torch.randn(1, 20, 80, generator=g), torch.randn(1, 192, generator=g)
    lengths = [torch.tensor([n], dtype=torch.int32) for n in (30, 10, 20)]

    def mel() -> tuple[torch.Tensor, int]:
        calls.clear()
        out = flow.inference(
            token,
            lengths[0],
            prompt,
            lengths[1],
            feat,
            lengths[2],
            embedding,
            streaming=False,
            finalize=True,
        )[0]
        return out, len(calls)

    official, official_calls = mel()
    flow.decoder.set_steps(4)
    fewer, fewer_calls = mel()
    assert (official_calls, fewer_calls) == (10, 4)
    assert fewer.shape == official.shape and not torch.equal(fewer, official)
    stream = flow.new_stream(prompt, feat, embedding)
    flow.stream_step(stream, token, finalize=True)
    assert len(stream.estimator) == 4  # the incremental flow keeps one cache per Euler step
    for bad in (0, -1, 101, 2.5, True):
        with pytest.raises(ValueError, match="flow steps must be an integer from 1 to"):
            flow.decoder.set_steps(bad)


def test_unsupported_precision_names_what_the_device_supports() -> None:
    with pytest.raises(DeviceError, match="unknown quantisation 'int4'; use one of: int8"):
        resolve_placement("cpu", quantize="int4")
    with pytest.raises(DeviceError, match="unknown dtype 'int8'"):
        resolve_placement("cpu", "int8")
    with pytest.raises(
        DeviceError, match=r"'int8' is not supported on cuda.*supported there: none"
    ):
        check_precision(torch.device("cuda", 0), "float16", "int8")
    with pytest.raises(DeviceError, match="device 'mps' is not supported: .* no float64"):
        resolve_placement("mps", "bf16")  # refused whole, before its dtypes
    assert resolve_placement("cpu", "bf16", "INT8").quantize == "int8"
    assert check_precision(torch.device("cpu"), "fp16") == (torch.float16, None)


@pytest.mark.parametrize("version", [1, 2])
def test_low_precision_llm_attends_in_float32_on_cpu(version: int) -> None:
    """bf16 weights, float32 key/value caches and attention (see precision.attend_in_float32);
    the log-probabilities come out in float32 for the sampler (as the official's autocast)."""
    model = open_model_dir(MODELS / f"v{version}-tiny")
    lm = load_network(model, "llm", "llm.pt", resolve_placement("cpu", "bfloat16"))
    cache = lm.new_cache()
    inputs = torch.randn(1, 5, lm.speech_embedding.weight.shape[1], dtype=torch.bfloat16)
    with torch.inference_mode():
        first = lm.log_probs(inputs, [cache])
        step = lm.log_probs(lm.speech_input(3), [cache])
    assert first.dtype == step.dtype == torch.float32 and torch.isfinite(step).all()
    assert {b.data.dtype for layer in cache.buffers for b in layer} == {torch.float32}
    assert cache.length == 6


def test_the_v1_cached_attention_is_fused_only_where_no_official_floats_are_kept() -> None:
    """exact float32 (the official's floats) and export (the official module tree) keep the
    separate operations; float32 with oneDNN's products, bf16 weights and int8 products take the
    fused call (conformer._weighted_values)."""
    from cosyvoice_lite.networks.conformer import RelPositionMultiHeadedAttention

    model = open_model_dir(MODELS / "v1-tiny")

    def fused(placement, kernels: bool = True) -> set[bool]:
        lm = load_network(model, "llm", "llm.pt", placement, kernels=kernels)
        return {
            m.fused_cached for m in lm.modules() if isinstance(m, RelPositionMultiHeadedAttention)
        }

    assert fused(resolve_placement("cpu", exact_float32=True)) == {False}
    assert fused(resolve_placement("cpu")) == {packs_linear(resolve_placement("cpu"))}
    # float32 by torch's default kernels elsewhere (a GPU) keeps them; int8 never has them
    assert keeps_official_floats(Placement(torch.device("cuda"), torch.float32))
    assert not keeps_official_floats(Placement(torch.device("cpu"), torch.float32, "int8", True))
    assert fused(resolve_placement("cpu", "bfloat16"), kernels=False) == {False}
    assert fused(resolve_placement("cpu", "bfloat16")) == {True}
    assert fused(resolve_placement("cpu", quantize="int8")) == {True}


@pytest.mark.parametrize("version", [2, 3])
def test_int8_streams_keep_their_flow_caches_in_float16(version: int) -> None:
    """With int8 over a float32 flow the streams' keys and values are kept in float16 (half the
    memory; int8 is not the official's float32 anyway), each stream's mel within rounding of
    float32 caches; plain float32 keeps them exact, lower-precision weights in their own dtype."""
    assert stream_cache_dtype(resolve_placement("cpu", quantize="int8")) == torch.float16
    assert stream_cache_dtype(resolve_placement("cpu")) is None
    engine = Engine.load(MODELS / f"v{version}-tiny", device="cpu", quantize="int8")
    try:  # every stream forks from the voice's primed prompt, made in that dtype
        assert engine.pipeline.prompt_flows.cache_dtype == torch.float16
    finally:
        engine.close()
    model = open_model_dir(MODELS / f"v{version}-tiny")
    flow = load_network(model, "flow", "flow.pt", resolve_placement("cpu"))
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 100, (1, 13), generator=g, dtype=torch.int32)
    feat, embedding = torch.randn(1, 26, 80, generator=g), torch.randn(1, 192, generator=g)
    token = torch.randint(0, 100, (1, 70), generator=g, dtype=torch.int32)

    def stream(cache_dtype: torch.dtype | None) -> tuple[torch.Tensor, int]:
        state = flow.new_stream(prompt, feat, embedding, cache_dtype=cache_dtype)
        mels = [flow.stream_step(state, token[:, :30]), flow.stream_step(state, token[:, 30:])]
        size = state.cache_bytes()
        mels.append(flow.stream_step(state, token[:, :0], finalize=True))
        return torch.cat(mels, dim=2), size

    exact, exact_bytes = stream(None)
    half, half_bytes = stream(torch.float16)
    assert half.shape == exact.shape
    assert float((half - exact).norm() / exact.norm()) < 2e-3
    assert half_bytes < 0.85 * exact_bytes  # the attention caches halve (tiny: beside the rest)


def test_the_stream_cache_dtype_is_a_load_option() -> None:
    """``stream_cache_dtype`` (``--stream-cache-dtype``): float16 halves a float32 engine's stream
    caches (and voices' prompt frames), float32 keeps int8's exact; another name, or weights in
    another dtype, is refused before loading."""
    assert stream_cache_dtype(resolve_placement("cpu"), "float16") == torch.float16
    assert stream_cache_dtype(resolve_placement("cpu", quantize="int8"), "float32") is None
    with pytest.raises(ValueError, match="must be one of float16, float32"):
        stream_cache_dtype(resolve_placement("cpu"), "bfloat16")
    with pytest.raises(ValueError, match="applies to float32 weights"):
        stream_cache_dtype(resolve_placement("cpu", "bfloat16"), "float16")
    with pytest.raises(InvalidRequestError, match="applies to float32 weights"):
        Engine.load(MODELS / "v2-tiny", dtype="bfloat16", stream_cache_dtype="float16")
    # named as dtypes are (it refused fp16, Float16 and torch.float16)
    for name in ("fp16", " Float16", torch.float16, "half"):
        assert stream_cache_dtype(resolve_placement("cpu"), name) == torch.float16
    # CosyVoice-300M streams without caches: the option was taken, and did nothing
    with pytest.raises(InvalidRequestError, match="keeps no stream caches"):
        Engine.load(MODELS / "v1-tiny", stream_cache_dtype="float16")
    engine = Engine.load(MODELS / "v2-tiny", stream_cache_dtype="float16")
    try:
        assert engine.pipeline.prompt_flows.cache_dtype == torch.float16
        request = SynthesisRequest(
            Mode.ZERO_SHOT, "你好。", prompt_audio=DATA / "audio" / "zh_16k.wav",
            prompt_text="希望你以后能够做的比我还好呦。", seed=3, stream=True,
            max_speech_tokens=40, ignore_eos=True,
        )  # fmt: skip
        chunks = list(engine.synthesize(request))
        assert chunks[-1].final and sum(c.samples.size for c in chunks) > 0
    finally:
        engine.close()


def test_packed_linear_rows_come_in_few_shapes_and_as_alone() -> None:
    """oneDNN keeps a kernel per input shape (~0.6 MB each), so ``PackedLinear`` computes its rows
    padded to a few sizes (8 per power of two past ``EXACT_ROWS``, at most 12.5% more); a row's
    result is the same whatever rows share its call."""
    assert [padded_rows(n) for n in range(1, EXACT_ROWS + 1)] == list(range(1, EXACT_ROWS + 1))
    sizes = {padded_rows(n) for n in range(1, 4097)}
    chunks = set(range(CHUNK_ROWS, MAX_CHUNK_ROWS + 1, CHUNK_ROWS))  # streamed chunks' rows
    assert len(sizes) <= EXACT_ROWS + 8 * 8 + len(
        chunks
    )  # 8 in each of (16, 32], ..., (2048, 4096]
    assert all(padded_rows(n) == n for n in chunks)
    assert all(n <= padded_rows(n) <= n * 1.125 for n in range(1, 10_000))
    if not packs_linear(resolve_placement("cpu")):
        pytest.skip("no oneDNN packing on this build")
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = PackedLinear(linear)
    x = torch.randn(3, 700, 96, generator=g)
    with torch.inference_mode():
        whole = layer(x)
        assert whole.shape == (3, 700, 40) and whole.is_contiguous()
        assert torch.allclose(whole, linear(x), atol=1e-5, rtol=0)
        for rows in (2, 17, 50, 100, 130, 699):
            assert torch.equal(layer(x[1, :rows]), whole[1, :rows]), rows


def test_plain_decoding_weights_compute_the_packed_floats() -> None:
    """A decoding LLM's float32 layers may keep plain weights (``PackedLinear``'s ``layout_rows=None``):
    one row by oneDNN's product as before, 2 to ``EXACT_ROWS`` rows as the transposed product,
    more as before; every row count gives the packed layer's floats, in the input's shape,
    contiguous, with and without a bias, eager and traced."""
    if not packs_linear(resolve_placement("cpu")):
        pytest.skip("no oneDNN packing on this build")
    g = torch.Generator().manual_seed(0)
    for bias in (True, False):
        linear = nn.Linear(96, 40, bias=bias)
        packed, plain = PackedLinear(linear), PackedLinear(linear, layout_rows=None)
        traced = torch.jit.trace(plain, torch.randn(3, 1, 96), check_trace=False)
        with torch.inference_mode():
            for rows in (1, 2, 3, EXACT_ROWS, EXACT_ROWS + 1, 40):
                x = torch.randn(rows, 1, 96, generator=g)
                out = plain(x)
                assert out.shape == (rows, 1, 40) and out.is_contiguous()
                assert torch.equal(out, packed(x)), (bias, rows)
                assert torch.equal(traced(x), out), (bias, rows)


def test_a_decoding_llm_widens_only_its_packed_products() -> None:
    """A CPU's decoding thread runs on one torch thread (``engine.decode_threads``) and the
    LLM's packed products take the process's threads for their call only, giving the same floats
    as at the caller's width and handing its own count back; the flow's packed products (its rows
    have threads of their own) keep the caller's."""
    from cosyvoice_lite.engine import decode_threads

    placement = resolve_placement("cpu")
    if not packs_linear(placement):
        pytest.skip("no oneDNN packing on this build")
    assert decode_threads(placement) == 1
    bf16 = resolve_placement("cpu", "bfloat16")  # packed only where the CPU has the instructions
    assert decode_threads(bf16) == (1 if packs_linear(bf16) else None)
    assert decode_threads(resolve_placement("cpu", quantize="int8")) == 1
    assert decode_threads(resolve_placement("cpu", exact_float32=True)) is None
    model = open_model_dir(MODELS / "v2-tiny")
    threads = torch.get_num_threads()
    lm = load_network(model, "llm", "llm.pt", placement)
    flow = load_network(model, "flow", "flow.pt", placement)
    assert {m.threads for m in lm.modules() if isinstance(m, PackedLinear)} == {threads}
    assert {m.threads for m in flow.modules() if isinstance(m, PackedLinear)} == {None}
    layer = PackedLinear(nn.Linear(96, 40), threads=2)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        wide = layer(x)
        torch.set_num_threads(1)
        try:
            assert torch.equal(layer(x), wide)
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(threads)


def test_exact_float32_needs_float32_weights() -> None:
    """``exact_float32`` (``--exact-float32``) keeps the official's float32 kernels: with other
    weights it would mean nothing, so it is an error naming the dtype."""
    assert resolve_placement("cpu", "float32", exact_float32=True).exact_float32
    assert resolve_placement("cpu", "float32", "int8", exact_float32=True).exact_float32
    with pytest.raises(DeviceError, match="exact float32 applies to float32 weights"):
        resolve_placement("cpu", "bfloat16", exact_float32=True)
