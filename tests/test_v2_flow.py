"""v2 flow parity against the official CosyVoice2 code (goldens from tools/golden/v2_flow.py).

The official encoder hard-codes 512 channels, so the tiny flow still has ~12 M parameters; its
weights are regenerated from a seed (`seeded_state`, identical to the golden script) and checked
against the official per-tensor checksums before any parity test runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _utterances import check_batched_equals_alone, utterances_of

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.networks.flow_matching import CausalConditionalCFM, euler_times, time_span
from cosyvoice_lite.networks.flow_v2 import CausalMaskedDiffWithXvec, UpsampleConformerEncoder
from cosyvoice_lite.networks.unet import CausalBlock1D, CausalConditionalDecoder
from cosyvoice_lite.pipelines.common import ModelInputs
from cosyvoice_lite.pipelines.prompt_flow import PromptFlowCache

GOLDEN = Path(__file__).parent / "data" / "golden" / "v2_flow"
TOL = 1e-4
LOOKAHEAD = 3

# Must match tools/golden/v2_flow.py.
ENCODER_KW = dict(
    input_size=512,
    output_size=512,
    attention_heads=4,
    linear_units=64,
    num_blocks=2,
    dropout_rate=0.1,
    positional_dropout_rate=0.1,
    attention_dropout_rate=0.1,
    normalize_before=True,
    input_layer="linear",
    pos_enc_layer_type="rel_pos_espnet",
    selfattention_layer_type="rel_selfattn",
    use_cnn_module=False,
    macaron_style=False,
    static_chunk_size=5,
)
ESTIMATOR_KW = dict(
    in_channels=320,
    out_channels=80,
    channels=[32],
    dropout=0.0,
    attention_head_dim=16,
    n_blocks=1,
    num_mid_blocks=1,
    num_heads=2,
    act_fn="gelu",
    static_chunk_size=10,
    num_decoding_left_chunks=-1,
)
CFM_PARAMS = dict(
    sigma_min=1e-06,
    solver="euler",
    t_scheduler="cosine",
    training_cfg_rate=0.2,
    inference_cfg_rate=0.7,
    reg_loss_type="l1",
)
FLOW_KW = dict(
    input_size=512,
    output_size=80,
    spk_embed_dim=192,
    output_type="mel",
    vocab_size=50,
    input_frame_rate=25,
    only_mask_loss=True,
    token_mel_ratio=2,
    pre_lookahead_len=3,
)
WEIGHT_SEED = 2024


def seeded_state(shapes: dict[str, torch.Size], seed: int = WEIGHT_SEED) -> dict[str, torch.Tensor]:
    """Same as tools/golden/v2_flow.py: 1-D weights ~ 1 + 0.1 N, 1-D biases ~ 0.1 N, others N / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        w = torch.randn(shape, generator=g)
        if len(shape) == 1:
            w = 1.0 + 0.1 * w if name.endswith("weight") else 0.1 * w
        else:
            w = w / math.sqrt(math.prod(shape[1:]))
        out[name] = w
    return out


def _load(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def _build() -> CausalMaskedDiffWithXvec:
    decoder = CausalConditionalCFM(
        in_channels=240,
        cfm_params=CFM_PARAMS,
        n_spks=1,
        spk_emb_dim=80,
        estimator=CausalConditionalDecoder(**ESTIMATOR_KW),
    )
    return CausalMaskedDiffWithXvec(
        **FLOW_KW, encoder=UpsampleConformerEncoder(**ENCODER_KW), decoder=decoder
    )


@pytest.fixture(scope="module")
def flow() -> CausalMaskedDiffWithXvec:
    model = _build()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(seeded_state(shapes), strict=True)
    return model.eval()


def _max_err(a: torch.Tensor, b: np.ndarray) -> float:
    assert tuple(a.shape) == b.shape
    return float((a.detach() - torch.from_numpy(b)).abs().max())


def _run(
    flow: CausalMaskedDiffWithXvec,
    token: torch.Tensor,
    prompt_token: torch.Tensor,
    prompt_feat: torch.Tensor,
    embedding: torch.Tensor,
    streaming: bool,
    finalize: bool,
) -> torch.Tensor:
    mel, extra = flow.inference(
        token,
        torch.tensor([token.shape[1]]),
        prompt_token,
        torch.tensor([prompt_token.shape[1]]),
        prompt_feat,
        torch.tensor([prompt_feat.shape[1]]),
        embedding,
        streaming=streaming,
        finalize=finalize,
    )
    assert extra is None
    return mel


# --------------------------------------------------------------------------------------------
# structure and weights


def test_state_dict_matches_official_weights(flow: CausalMaskedDiffWithXvec) -> None:
    """Same key set as the official module, and the regenerated weights are the official ones."""
    checks = _load("weights")
    state = flow.state_dict()
    assert sorted(state) == [str(n) for n in checks["names"]]
    for i, name in enumerate(checks["names"]):
        t = state[str(name)].double()
        assert math.isclose(float(t.sum()), checks["sums"][i], rel_tol=1e-9, abs_tol=1e-6), name
        assert math.isclose(float(t.abs().sum()), checks["abs_sums"][i], rel_tol=1e-9), name
        assert float(t.reshape(-1)[0]) == checks["firsts"][i], name


def test_official_key_names(flow: CausalMaskedDiffWithXvec) -> None:
    keys = set(flow.state_dict())
    for key in (
        "input_embedding.weight",
        "spk_embed_affine_layer.weight",
        "encoder.embed.out.0.weight",
        "encoder.embed.out.1.bias",
        "encoder.pre_lookahead_layer.conv1.weight",
        "encoder.pre_lookahead_layer.conv2.bias",
        "encoder.encoders.1.self_attn.pos_bias_u",
        "encoder.encoders.1.norm_mha.weight",
        "encoder.up_layer.conv.weight",
        "encoder.up_embed.out.0.weight",
        "encoder.up_encoders.3.feed_forward.w_2.weight",
        "encoder.after_norm.weight",
        "encoder_proj.weight",
        "decoder.estimator.down_blocks.0.0.block1.block.2.weight",
        "decoder.estimator.final_proj.weight",
    ):
        assert key in keys
    assert "decoder.rand_noise" not in keys
    assert flow.encoder.pre_lookahead_layer.conv1.weight.shape == (512, 512, 4)
    assert flow.encoder.up_layer.conv.weight.shape == (512, 512, 5)


def test_unsupported_encoder_options_raise() -> None:
    with pytest.raises(ModelDirError):
        UpsampleConformerEncoder(**{**ENCODER_KW, "use_cnn_module": True})
    with pytest.raises(ModelDirError):
        UpsampleConformerEncoder(**{**ENCODER_KW, "output_size": 256})


# --------------------------------------------------------------------------------------------
# parity with the official code


@pytest.mark.parametrize("mode", ["full", "stream"])
def test_encoder_parity(flow: CausalMaskedDiffWithXvec, mode: str) -> None:
    g = _load("encoder")
    xs, lens, context = (torch.from_numpy(g[k]) for k in ("xs", "lens", "context"))
    streaming = mode == "stream"
    with torch.no_grad():
        out, mask = flow.encoder(xs[:1], lens[:1], streaming=streaming)
        assert _max_err(out, g[f"out_{mode}"]) < TOL
        assert _max_err(mask.float(), g[f"mask_{mode}"]) == 0
        out, mask = flow.encoder(xs, lens, streaming=streaming)
        assert _max_err(out, g[f"out_batch_{mode}"]) < TOL
        assert _max_err(mask.float(), g[f"mask_batch_{mode}"]) == 0
        out, _ = flow.encoder(xs[:1], lens[:1], context=context, streaming=streaming)
        assert _max_err(out, g[f"out_context_{mode}"]) < TOL


@pytest.mark.parametrize("prompt", ["prompt", "noprompt"])
@pytest.mark.parametrize("streaming", ["full", "stream"])
@pytest.mark.parametrize("finalize", ["final", "partial"])
def test_inference_parity(
    flow: CausalMaskedDiffWithXvec, prompt: str, streaming: str, finalize: str
) -> None:
    g = {k: torch.from_numpy(v) for k, v in _load("inference").items()}
    if prompt == "prompt":
        p_tok, p_feat = g["prompt_token"], g["prompt_feat"]
    else:
        p_tok, p_feat = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80)
    mel = _run(
        flow, g["token"], p_tok, p_feat, g["embedding"], streaming == "stream", finalize == "final"
    )
    n_tokens = g["token"].shape[1] - (0 if finalize == "final" else LOOKAHEAD)
    assert mel.shape == (1, 80, 2 * n_tokens)
    assert _max_err(mel, g[f"mel_{prompt}_{streaming}_{finalize}"].numpy()) < TOL


@pytest.mark.parametrize("n", [12, 14, 17, 19, 22])
def test_streaming_prefix_parity(flow: CausalMaskedDiffWithXvec, n: int) -> None:
    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    mel = _run(
        flow, g["token"][:, :n], g["prompt_token"], g["prompt_feat"], g["embedding"], True, False
    )
    assert _max_err(mel, g[f"mel_{n}"].numpy()) < TOL


# --------------------------------------------------------------------------------------------
# chunk causality of streaming=True (what an incremental flow may rely on)
#
# Prompt 6 tokens, chunk 5 tokens (10 mel frames). A call on n tokens with finalize=False encodes
# 6 + n - 3 tokens; n = 12, 17, 22 end on a chunk boundary, n = 14, 19 in the middle of a chunk.


def _stream_mels(flow: CausalMaskedDiffWithXvec, ns: list[int]) -> dict[int, torch.Tensor]:
    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    return {
        n: _run(
            flow,
            g["token"][:, :n],
            g["prompt_token"],
            g["prompt_feat"],
            g["embedding"],
            True,
            False,
        )
        for n in ns
    }


def test_streaming_is_chunk_causal_on_chunk_boundaries(flow: CausalMaskedDiffWithXvec) -> None:
    """Mel of a chunk-aligned prefix never changes when more tokens are appended.

    This covers the encoder chunk masks, the pre-look-ahead context, the causal upsampler, the
    causal U-Net convs and chunk attention, and the fixed noise indexed by absolute frame.
    Equality is up to float rounding (different matrix sizes), not bit-exact.
    """
    mels = _stream_mels(flow, [12, 17, 22])
    for short, long in ((12, 17), (12, 22), (17, 22)):
        head = mels[long][:, :, : mels[short].shape[2]]
        torch.testing.assert_close(head, mels[short], atol=1e-5, rtol=0)


def test_streaming_partial_chunk_changes_when_tokens_arrive(flow: CausalMaskedDiffWithXvec) -> None:
    """A prefix ending inside a chunk: its complete chunks are stable, its last partial chunk is not.

    n = 14 encodes 17 tokens = 3 full chunks (30 mel frames incl. the 12 prompt frames, so 18 new
    frames) + 2 tokens of a 4th chunk; those 4 frames attend to different keys once the chunk is
    complete, so the official streaming schedule (hops that keep prompt + hop a multiple of the
    chunk) is what makes re-running the whole history reproducible.
    """
    mels = _stream_mels(flow, [14, 17])
    stable = 2 * (3 * 5) - 12
    short, long = mels[14], mels[17][:, :, : mels[14].shape[2]]
    torch.testing.assert_close(long[:, :, :stable], short[:, :, :stable], atol=1e-5, rtol=0)
    assert float((long[:, :, stable:] - short[:, :, stable:]).abs().max()) > 1e-2


def test_full_attention_is_not_causal(flow: CausalMaskedDiffWithXvec) -> None:
    """streaming=False (the official final chunk) lets early frames see later tokens."""
    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    args = (g["prompt_token"], g["prompt_feat"], g["embedding"])
    short = _run(flow, g["token"][:, :12], *args, streaming=False, finalize=False)
    long = _run(flow, g["token"][:, :17], *args, streaming=False, finalize=False)
    assert float((long[:, :, : short.shape[2]] - short).abs().max()) > 1e-2


# --------------------------------------------------------------------------------------------
# incremental streaming: new frames against cached history


def _stream(
    flow: CausalMaskedDiffWithXvec, pieces: list[torch.Tensor], g: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    state = flow.new_stream(g["prompt_token"], g["prompt_feat"], g["embedding"])
    out = [flow.stream_step(state, piece) for piece in pieces]
    out.append(flow.stream_step(state, pieces[0][:, :0], finalize=True))
    return out


def test_incremental_stream_matches_official_streaming(flow: CausalMaskedDiffWithXvec) -> None:
    """Each chunk equals the official re-run of the whole history (streaming=True, finalize=False).

    The official schedule here: tokens[:12], [:17], [:22] (prompt 6, chunk 5, look-ahead 3), then
    a final call. The final chunk equals the official flow with chunk attention; the official
    stream instead computes it with full attention, the one place where they differ.
    """
    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    token = g["token"]
    mels = _stream(flow, [token[:, :12], token[:, 12:17], token[:, 17:22]], g)
    assert [m.shape[2] for m in mels] == [18, 10, 10, 6]
    assert _max_err(mels[0], g["mel_12"].numpy()) < TOL
    assert _max_err(mels[1], g["mel_17"][:, :, 18:].numpy()) < TOL
    assert _max_err(mels[2], g["mel_22"][:, :, 28:38].numpy()) < TOL
    assert _max_err(mels[3], g["mel_22_stream_final"][:, :, 38:].numpy()) < TOL
    # what the official stream emits last (full attention) differs visibly
    assert float((mels[3] - g["mel_22_full_final"][:, :, 38:]).abs().max()) > 1e-2


def test_incremental_stream_any_push_size(flow: CausalMaskedDiffWithXvec) -> None:
    """Tokens pushed one by one give the same mel: partial chunks wait for their tokens."""
    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    token = g["token"]
    whole = torch.cat(_stream(flow, [token], g), dim=2)
    single = _stream(flow, [token[:, i : i + 1] for i in range(token.shape[1])], g)
    # whole 10-frame chunks only (counted from the 12 prompt frames, which are not output)
    ends = torch.tensor([m.shape[2] for m in single[:-1]]).cumsum(0) + 12
    assert bool((ends[ends > 12] % 10 == 0).all())
    torch.testing.assert_close(torch.cat(single, dim=2), whole, atol=1e-5, rtol=0)
    assert _max_err(whole, g["mel_22_stream_final"].numpy()) < TOL


def test_incremental_streams_are_independent(flow: CausalMaskedDiffWithXvec) -> None:
    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    token = g["token"]
    other = dict(g, embedding=-g["embedding"], prompt_feat=g["prompt_feat"].flip(1))
    solo_a = torch.cat(_stream(flow, [token], g), dim=2)
    solo_b = torch.cat(_stream(flow, [token.flip(1)], other), dim=2)
    a = flow.new_stream(g["prompt_token"], g["prompt_feat"], g["embedding"])
    b = flow.new_stream(other["prompt_token"], other["prompt_feat"], other["embedding"])
    out_a, out_b = [], []
    for i in range(0, token.shape[1], 4):
        out_a.append(flow.stream_step(a, token[:, i : i + 4]))
        out_b.append(flow.stream_step(b, token.flip(1)[:, i : i + 4]))
    out_a.append(flow.stream_step(a, token[:, :0], finalize=True))
    out_b.append(flow.stream_step(b, token[:, :0], finalize=True))
    torch.testing.assert_close(torch.cat(out_a, dim=2), solo_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(out_b, dim=2), solo_b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        flow.stream_step(a, token[:, :1])


def test_streams_stepped_together_equal_each_stream_alone(flow: CausalMaskedDiffWithXvec) -> None:
    """`stream_steps` batches the U-Net solves of streams at different positions (different
    prompts and push sizes, one past its cache budget, streams ending at different calls);
    every stream's mel equals the same stream stepped alone within 1e-4."""
    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    token = g["token"]
    voices = [
        g,
        dict(g, embedding=-g["embedding"], prompt_feat=g["prompt_feat"].flip(1)),
        dict(g, prompt_token=g["prompt_token"][:, :4], prompt_feat=g["prompt_feat"][:, :8]),
    ]
    feeds = [token, token.flip(1)[:, :17], token[:, 3:]]
    pushes = [4, 3, 6]

    def streams() -> list:
        made = [
            flow.new_stream(v["prompt_token"], v["prompt_feat"], v["embedding"]) for v in voices
        ]
        made[2].cache_budget = 1  # frozen from its first frames: re-solves alone each call
        return made

    def pieces(k: int) -> list[torch.Tensor]:
        return [feeds[k][:, i : i + pushes[k]] for i in range(0, feeds[k].shape[1], pushes[k])]

    alone = []
    for k, state in enumerate(streams()):
        outs = [flow.stream_step(state, piece) for piece in pieces(k)]
        alone.append(torch.cat([*outs, flow.stream_step(state, token[:, :0], finalize=True)], 2))
    states, together = streams(), [[], [], []]
    for call in range(max(len(pieces(k)) for k in range(3)) + 1):
        live = [k for k in range(3) if call <= len(pieces(k))]
        tokens = [pieces(k)[call] if call < len(pieces(k)) else token[:, :0] for k in live]
        finals = [call == len(pieces(k)) for k in live]
        mels = flow.stream_steps([states[k] for k in live], tokens, finals)
        for k, mel in zip(live, mels, strict=True):
            together[k].append(mel)
    for k in range(3):
        assert float((torch.cat(together[k], dim=2) - alone[k]).abs().max()) < TOL
    assert states[2].frozen_at is not None


def test_a_bad_stream_steps_call_changes_no_stream(flow: CausalMaskedDiffWithXvec) -> None:
    """Every call is checked before any stream changes: after a ValueError the good stream goes
    on exactly as a stream that never saw the bad call."""
    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    token = g["token"]
    args = (g["prompt_token"], g["prompt_feat"], g["embedding"])
    good, reference, done = (flow.new_stream(*args) for _ in range(3))
    flow.stream_step(done, token[:, :0], finalize=True)
    with pytest.raises(ValueError, match="finalized"):
        flow.stream_steps([good, done], [token[:, :12], token[:, :1]], [False, False])
    with pytest.raises(ValueError, match="once"):
        flow.stream_steps([good, good], [token[:, :12]] * 2, [False, False])
    with pytest.raises(ValueError, match="one token tensor"):
        flow.stream_steps([good], [token[:, :12]] * 2, [False])
    assert torch.equal(
        flow.stream_step(good, token[:, :12]), flow.stream_step(reference, token[:, :12])
    )


def test_forks_of_a_primed_prompt_equal_a_fresh_stream(flow: CausalMaskedDiffWithXvec) -> None:
    """The prompt's whole chunks are encoded once (`stream_step` with no new tokens); forks share
    the U-Net's keys/values of those frames and give the mel of a stream started afresh."""
    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    token = g["token"]
    # a 15-token prompt: two 5-token chunks have their look-ahead inside it
    voice = dict(
        g,
        prompt_token=torch.cat([g["prompt_token"], token[:, :9]], dim=1),
        prompt_feat=torch.cat([g["prompt_feat"], g["prompt_feat"].flip(1)[:, :18]], dim=1),
    )
    rest = token[:, 9:]
    fresh = torch.cat(_stream(flow, [rest[:, :5], rest[:, 5:]], voice), dim=2)
    template = flow.new_stream(voice["prompt_token"], voice["prompt_feat"], voice["embedding"])
    assert flow.stream_step(template, rest[:, :0]).shape[2] == 0
    assert template.tokens_done == 10
    template = template.fork()
    # the U-Net's part is shared
    assert sum(row.nbytes() for step in template.estimator for row in step) == 0
    forks = [template.fork(), template.fork()]
    outs: list[list[torch.Tensor]] = [[], []]
    for i in range(rest.shape[1]):  # interleaved, token by token
        for k in (1, 0):
            outs[k].append(flow.stream_step(forks[k], rest[:, i : i + 1]))
    for k in (0, 1):
        outs[k].append(flow.stream_step(forks[k], rest[:, :0], finalize=True))
        torch.testing.assert_close(torch.cat(outs[k], dim=2), fresh, atol=1e-5, rtol=0)
    keys = [
        next(item.keys for item in f.estimator[0][0].items if hasattr(item, "keys"))
        for f in (*forks, template)
    ]
    assert keys[0].shared is keys[1].shared is keys[2].shared
    assert keys[0].shared.shape[-2] == 20 and keys[0].length > 20


def _voice_inputs(g: dict[str, torch.Tensor], extra: torch.Tensor, flip: bool) -> ModelInputs:
    feat = g["prompt_feat"].flip(1) if flip else g["prompt_feat"]
    return _flow_voice(
        torch.cat([g["prompt_token"], extra], dim=1),
        torch.cat([feat, feat.flip(1)[:, : 2 * extra.shape[1]]], dim=1),
        -g["embedding"] if flip else g["embedding"],
    )


def _flow_voice(token: torch.Tensor, feat: torch.Tensor, embedding: torch.Tensor) -> ModelInputs:
    """A prompt's inputs as the flow reads them (its tokens, mel and speaker), nothing for the LLM."""
    nothing = torch.zeros(1, 0, dtype=torch.int32)
    return ModelInputs(
        text=nothing,
        prompt_text=nothing,
        llm_prompt_speech_token=nothing,
        llm_embedding=torch.zeros(0, 192),
        flow_prompt_speech_token=token,
        prompt_speech_feat=feat,
        flow_embedding=embedding,
    )


def test_prompt_flow_cache_primes_each_voice_once_within_its_budget(
    flow: CausalMaskedDiffWithXvec,
) -> None:
    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    token = g["token"]
    voices = [_voice_inputs(g, token[:, :9], flip) for flip in (False, True)]
    rest = token[:, 9:]

    def speak(stream) -> torch.Tensor:
        return torch.cat(
            [flow.stream_step(stream, rest), flow.stream_step(stream, rest[:, :0], finalize=True)],
            dim=2,
        )

    alone = [speak(PromptFlowCache(0).stream(flow, v)) for v in voices]
    cache = PromptFlowCache()
    for _ in range(2):
        for voice, expected in zip(voices, alone, strict=True):
            torch.testing.assert_close(
                speak(cache.stream(flow, voice)), expected, atol=1e-5, rtol=0
            )
    assert (cache.misses, cache.hits, len(cache)) == (2, 2, 2)
    one_voice = cache.nbytes // 2
    small = PromptFlowCache(one_voice + one_voice // 2)  # room for one: least recently used goes
    for voice in (voices[0], voices[1], voices[0]):
        small.stream(flow, voice)
    assert (small.misses, small.hits, len(small)) == (3, 0, 1)
    small.stream(flow, voices[0])
    assert small.hits == 1
    nothing = PromptFlowCache(0)  # a budget of 0 keeps nothing: every stream primes its prompt
    torch.testing.assert_close(speak(nothing.stream(flow, voices[1])), alone[1], atol=0, rtol=0)
    assert len(nothing) == 0 and nothing.misses == 1
    # its prompt's keys and values are a prefix the stream reads, not its own (its budget's)
    unkept = nothing.stream(flow, voices[0])
    assert sum(row.nbytes() for step in unkept.estimator for row in step) == 0
    with pytest.raises(ValueError):
        PromptFlowCache(-1)


def test_voices_prepared_ahead_fit_without_eviction_and_go_first_out(
    flow: CausalMaskedDiffWithXvec,
) -> None:
    """``prime(evict=False)`` (a server preparing its saved voices, newest first): a voice is kept
    only beside those kept, one that would not fit is not computed once a size is known, and
    the voices prepared later (older) are the first out."""
    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    token = g["token"]
    newest, older, other = (
        _voice_inputs(g, token[:, :9], False),
        _voice_inputs(g, token[:, :9], True),
        _voice_inputs(g, token[:, :8], False),
    )
    probe = PromptFlowCache()
    probe.prime(flow, newest)
    one_voice = probe.nbytes
    cache = PromptFlowCache(2 * one_voice + one_voice // 2)  # room for two
    assert cache.prime(flow, newest, evict=False) and cache.prime(flow, older, evict=False)
    assert cache.misses == 2
    assert not cache.prime(flow, other, evict=False)  # no room: not even computed
    assert (cache.misses, len(cache)) == (2, 2)
    assert cache.prime(flow, newest, evict=False)  # kept already: a hit
    cache.stream(flow, other)  # a request's voice: evicts the voice prepared last (older)
    assert len(cache) == 2 and cache.stream(flow, newest) is not None
    assert cache.hits == 2 and cache.misses == 3  # newest stayed, other came in
    nothing = PromptFlowCache(0)
    assert not nothing.prime(flow, newest, evict=False) and nothing.misses == 0


def _long_voice(g: dict[str, torch.Tensor], tokens: int, flip: bool) -> ModelInputs:
    """A voice of ``tokens`` prompt tokens (the golden ones repeated), its mel aligned."""
    times = -(-tokens // g["token"].shape[1])
    token = g["token"].repeat(1, times)[:, :tokens]
    feat = g["prompt_feat"].flip(1) if flip else g["prompt_feat"]
    feat = feat.repeat(1, -(-2 * tokens // feat.shape[1]), 1)[:, : 2 * tokens]
    return _flow_voice(token, feat, -g["embedding"] if flip else g["embedding"])


def test_priming_ahead_computes_nothing_it_could_not_keep(flow: CausalMaskedDiffWithXvec) -> None:
    """``prime`` (a voice prepared ahead of its streams) with a budget of 0 computes nothing; with
    a budget below the prompt's size it computes at most a probe of a few chunks, once (what a
    primed token takes, before any prompt was measured), and then nothing, for any voice. The
    estimate it goes by is the size the prompt takes, or a little more."""
    from torch.utils.flop_counter import FlopCounterMode

    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    voice, other = _long_voice(g, 256, False), _long_voice(g, 240, True)

    def flops(call, *args) -> tuple[object, int]:
        with FlopCounterMode(display=False) as counter:
            result = call(*args)
        return result, counter.get_total_flops()

    nothing = PromptFlowCache(0)
    for evict in (True, False):
        assert flops(nothing.prime, flow, voice, evict) == (False, 0)
    assert (nothing.misses, nothing.probes, len(nothing)) == (0, 0, 0)

    whole = PromptFlowCache()
    kept, primed = flops(whole.prime, flow, voice)
    assert kept and primed > 0 and whole.misses == 1
    size = whole.nbytes
    estimate = PromptFlowCache().estimate(flow, voice)  # from a probe, as before any priming
    assert size <= estimate <= 1.05 * size
    assert whole.estimate(flow, voice) >= size  # from what it measured

    small = PromptFlowCache(size // 2)
    kept, probed = flops(small.prime, flow, voice)
    assert not kept and 0 < probed < primed // 3  # the probe alone
    assert (small.misses, small.probes, len(small)) == (0, 1, 0)
    for inputs in (voice, other):
        for evict in (True, False):
            assert flops(small.prime, flow, inputs, evict) == (False, 0)
    assert (small.misses, small.probes, len(small)) == (0, 1, 0)
    # a voice's stream still computes its prompt itself
    assert small.stream(flow, other) is not None and small.misses == 1


@pytest.mark.parametrize("budget", [0, 1])
def test_a_stream_past_its_cache_budget_gives_the_same_mel(
    flow: CausalMaskedDiffWithXvec, budget: int
) -> None:
    g = {k: torch.from_numpy(v) for k, v in _load("causality").items()}
    token = g["token"]
    whole = torch.cat(_stream(flow, [token[:, i : i + 5] for i in range(0, 22, 5)], g), dim=2)
    state = flow.new_stream(g["prompt_token"], g["prompt_feat"], g["embedding"])
    state.cache_budget = budget  # 1: frozen after the first chunk; 0: before any frame
    out, sizes = [], []
    for i in range(0, 22, 5):
        out.append(flow.stream_step(state, token[:, i : i + 5]))
        sizes.append(sum(row.nbytes() for step in state.estimator for row in step))
    out.append(flow.stream_step(state, token[:, :0], finalize=True))
    torch.testing.assert_close(torch.cat(out, dim=2), whole, atol=1e-5, rtol=0)
    assert state.frozen_at is not None
    assert (sizes[0] > 0) == (budget > 0) and len(set(sizes[1:])) == 1  # no growth once frozen


# --------------------------------------------------------------------------------------------
# input checks


def test_bad_inputs_raise(flow: CausalMaskedDiffWithXvec) -> None:
    tok = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="one utterance"):  # look-ahead calls are per stream
        flow.inference(
            tok, torch.tensor([5, 5]), tok[:, :0], torch.tensor([0, 0]), torch.zeros(2, 0, 80),
            torch.tensor([0, 0]), torch.randn(2, 192), streaming=False, finalize=False,
        )  # fmt: skip
    tok = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError):
        flow.inference(
            tok, torch.tensor([3]), tok[:, :0], torch.tensor([0]), torch.zeros(1, 0, 80),
            torch.tensor([0]), torch.randn(1, 192), streaming=True, finalize=False,
        )  # fmt: skip
    tok = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError):  # prompt mel longer than the token features
        flow.inference(
            tok, torch.tensor([4]), tok, torch.tensor([4]), torch.zeros(1, 20, 80),
            torch.tensor([20]), torch.randn(1, 192), streaming=False, finalize=True,
        )  # fmt: skip


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_attention_masks_are_skipped_only_when_every_frame_sees_every_other():
    """A whole utterance (no padding, no chunks) attends without a mask: adding an all-zero bias
    changes no score, so skipping it is exact. Padding, chunk boundaries and graph tracing (an
    exported graph must keep its mask for padded inputs) keep the mask."""
    from cosyvoice_lite.networks.dit import dit_attention_mask
    from cosyvoice_lite.networks.unet import attention_bias

    full = torch.ones(2, 1, 60)
    padded = full.clone()
    padded[1, :, 50:] = 0
    assert attention_bias(full, 0, torch.float32) is None
    assert dit_attention_mask(full, 0) is None
    assert attention_bias(full, 60, torch.float32) is None  # one chunk: no boundary
    assert attention_bias(full, 50, torch.float32) is not None
    assert dit_attention_mask(full, 50) is not None
    assert attention_bias(padded, 0, torch.float32) is not None
    assert dit_attention_mask(padded, 0) is not None
    traced = torch.jit.trace(lambda m: attention_bias(m, 0, torch.float32), (full,))
    assert traced(padded)[1, 0, 0, 55] < -1e9  # the padded frame stays masked in the graph

    estimator = CausalConditionalDecoder(320, 80, channels=(32,), attention_head_dim=8, num_heads=2)
    estimator.eval()
    g = torch.Generator().manual_seed(0)
    x, mu, cond = (torch.randn(1, 80, 30, generator=g) for _ in range(3))
    t, spks = torch.rand(1, generator=g), torch.randn(1, 80, generator=g)
    with torch.inference_mode():
        unmasked = estimator(x, torch.ones(1, 1, 30), mu, t, spks, cond)
        # the same frames followed by padding: the mask is built and applied
        pad = torch.zeros(1, 80, 10)
        mask = torch.cat([torch.ones(1, 1, 30), torch.zeros(1, 1, 10)], dim=2)
        masked = estimator(
            torch.cat([x, pad], 2),
            mask,
            torch.cat([mu, pad], 2),
            t,
            spks,
            torch.cat([cond, pad], 2),
        )
    assert torch.allclose(unmasked, masked[:, :, :30], atol=1e-5)


def test_sees_all_before_agrees_with_the_chunk_mask() -> None:
    from cosyvoice_lite.networks.attention import chunk_keep, sees_all_before

    for chunk in (0, 1, 4, 50):
        for start in range(0, 130, 3):
            for n in range(1, 120, 7):
                keep = chunk_keep(start, n, start + n, chunk, torch.device("cpu"))
                assert sees_all_before(start, n, chunk) == bool(keep.all()), (chunk, start, n)


@pytest.mark.parametrize("streaming", [False, True])
def test_whole_utterances_batched_equal_each_alone(
    flow: CausalMaskedDiffWithXvec, streaming: bool
) -> None:
    """Utterances of different prompt and token lengths in one padded batch (masked encoder,
    masked U-Net, every row from the same noise frames) give each utterance's mel alone."""
    check_batched_equals_alone(flow, utterances_of(_load("inference")), streaming)


def test_causal_block_output_is_channel_major() -> None:
    """CausalBlock1D's LayerNorm over channels returns to channel-major memory: left a transposed
    view (as officially), the Mish, masks, padding and residual adds after it ran strided
    (full-size estimator, fp32, 2 rows: 1.46 -> 1.32 s a call, the same floats)."""
    block = CausalBlock1D(8, 16).eval()
    x, mask = torch.randn(2, 8, 11), torch.ones(2, 1, 11)
    with torch.inference_mode():
        out = block(x, mask)
        norm = block.block[2](block.block[0](x).transpose(1, 2)).transpose(1, 2)
    assert out.is_contiguous()
    assert torch.equal(out, F.mish(norm))


@pytest.mark.parametrize("rows", [1, 2])
def test_time_table_gives_the_unet_its_own_floats(
    flow: CausalMaskedDiffWithXvec, rows: int
) -> None:
    """The solver's table gives a U-Net call exactly what it computes from t itself."""
    cfm, estimator = flow.decoder, flow.decoder.estimator
    g = torch.Generator().manual_seed(9)
    x, mu, cond = (torch.randn(rows, 80, 30, generator=g) for _ in range(3))
    spks, mask = torch.randn(rows, 80, generator=g), torch.ones(rows, 1, 30)
    with torch.inference_mode():
        for step, (t, _) in enumerate(euler_times(time_span(10, "cosine", torch.empty(0)))):
            time = cfm.time_conditioning(estimator, 10, step, rows, torch.device("cpu"))
            own = estimator(x, mask, mu, t.expand(rows), spks, cond)
            assert torch.equal(estimator(x, mask, mu, t, spks, cond, time=time), own)


def test_a_solve_stops_between_steps_once_its_caller_says_so() -> None:
    """``abort_when``: a cancelled request's whole-utterance flow stops after the step under way
    (ComputationAborted) instead of running its ten steps; without it, or while the condition does not
    hold, the solve is unchanged."""
    from cosyvoice_lite.networks.abort import ComputationAborted, abort_when
    from cosyvoice_lite.networks.flow_matching import euler_cfg

    calls = []

    def velocity(x, t, step):
        calls.append(step)
        return torch.ones(2 * x.size(0), *x.shape[1:])

    x = torch.zeros(1, 2, 3)
    t_span = time_span(10, "cosine", x)
    plain = euler_cfg(x, t_span, 0.7, velocity)
    with abort_when(lambda: False):
        assert torch.equal(euler_cfg(x, t_span, 0.7, velocity), plain)
    calls.clear()
    with abort_when(lambda: len(calls) >= 3), pytest.raises(ComputationAborted):
        euler_cfg(x, t_span, 0.7, velocity)
    assert calls == [0, 1, 2]
    assert torch.equal(euler_cfg(x, t_span, 0.7, velocity), plain)  # the condition is gone
