"""v3 flow parity against the official CosyVoice3 code (goldens from tools/golden/v3_flow.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _utterances import check_batched_equals_alone, utterances_of

from cosyvoice_lite.networks.dit import DiT
from cosyvoice_lite.networks.flow_matching import CausalConditionalCFM, euler_times, time_span
from cosyvoice_lite.networks.flow_v3 import CausalMaskedDiffWithDiT, PreLookaheadLayer

GOLDEN = Path(__file__).parent / "data" / "golden" / "v3_flow"
TOL = 1e-4

# Must match tools/golden/v3_flow.py.
DIT_KW = dict(
    dim=48,
    depth=2,
    heads=3,
    dim_head=16,
    ff_mult=2,
    mel_dim=80,
    mu_dim=80,
    spk_dim=80,
    out_channels=80,
    static_chunk_size=10,
    num_decoding_left_chunks=-1,
)
FLOW_KW = dict(
    input_size=80,
    output_size=80,
    spk_embed_dim=192,
    output_type="mel",
    vocab_size=50,
    input_frame_rate=25,
    only_mask_loss=True,
    token_mel_ratio=2,
    pre_lookahead_len=3,
)
CFM_PARAMS = dict(
    sigma_min=1e-06,
    solver="euler",
    t_scheduler="cosine",
    training_cfg_rate=0.2,
    inference_cfg_rate=0.7,
    reg_loss_type="l1",
)


def _load(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in _load("flow_state").items()}


def new_flow(state: dict[str, torch.Tensor]) -> CausalMaskedDiffWithDiT:
    decoder = CausalConditionalCFM(
        in_channels=240, cfm_params=CFM_PARAMS, n_spks=1, spk_emb_dim=80, estimator=DiT(**DIT_KW)
    )
    model = CausalMaskedDiffWithDiT(
        **FLOW_KW,
        pre_lookahead_layer=PreLookaheadLayer(80, 32, pre_lookahead_len=3),
        decoder=decoder,
    )
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def flow(state: dict[str, torch.Tensor]) -> CausalMaskedDiffWithDiT:
    return new_flow(state)


@pytest.fixture(scope="module")
def estimator(state: dict[str, torch.Tensor]) -> DiT:
    prefix = "decoder.estimator."
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    model = DiT(**DIT_KW)
    model.load_state_dict(sub, strict=True)
    return model.eval()


def _max_err(a: torch.Tensor, b: np.ndarray) -> float:
    assert tuple(a.shape) == b.shape
    return float((a.detach() - torch.from_numpy(b)).abs().max())


def test_rotary_inv_freq_is_checkpoint_key(estimator: DiT) -> None:
    assert "rotary_embed.inv_freq" in estimator.state_dict()
    expected = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    torch.testing.assert_close(estimator.rotary_embed.inv_freq, expected)


@pytest.mark.parametrize(
    ("key", "streaming", "t_key"),
    [("out_full", False, "t"), ("out_stream", True, "t"), ("out_scalar_t", False, "t_scalar")],
)
def test_estimator_parity(estimator: DiT, key: str, streaming: bool, t_key: str) -> None:
    g = {k: torch.from_numpy(v) for k, v in _load("estimator").items()}
    with torch.no_grad():
        out = estimator(
            g["x"], g["mask"], g["mu"], g[t_key], g["spks"], g["cond"], streaming=streaming
        )
    assert _max_err(out, g[key].numpy()) < TOL


def test_residual_stream_is_contiguous(estimator: DiT) -> None:
    """The input embedding hands the blocks a frame-major (contiguous) residual stream: with the
    official operand order (conv + x) the sum took the conv's transposed layout, and every add and
    norm of the 22 blocks ran strided (full-size bf16 row ~6% slower, the same floats)."""
    frames, mel = 7, estimator.proj_out.out_features
    x, cond, mu = (torch.randn(1, frames, mel) for _ in range(3))
    spks = torch.randn(1, estimator.input_embed.spk_dim)
    with torch.inference_mode():
        assert estimator.input_embed(x, cond, mu, spks).is_contiguous()


def test_streaming_mask_is_chunk_causal(estimator: DiT) -> None:
    g = {k: torch.from_numpy(v) for k, v in _load("estimator").items()}
    x, mu, cond, mask = g["x"][:1], g["mu"][:1], g["cond"][:1], g["mask"][:1]
    chunk = estimator.static_chunk_size
    with torch.no_grad():
        full = estimator(x, mask, mu, g["t"][:1], g["spks"][:1], cond, streaming=True)
        head = estimator(
            x[..., :chunk],
            mask[..., :chunk],
            mu[..., :chunk],
            g["t"][:1],
            g["spks"][:1],
            cond[..., :chunk],
            streaming=True,
        )
    torch.testing.assert_close(head, full[..., :chunk], atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt", ["prompt", "noprompt"])
@pytest.mark.parametrize("streaming", ["full", "stream"])
@pytest.mark.parametrize("finalize", ["final", "partial"])
def test_inference_parity(
    flow: CausalMaskedDiffWithDiT, prompt: str, streaming: str, finalize: str
) -> None:
    g = _load("inference")
    token = torch.from_numpy(g["token"])
    mel, extra = _inference(flow, prompt == "prompt", streaming == "stream", finalize == "final")
    assert extra is None
    expected = g[f"mel_{prompt}_{streaming}_{finalize}"]
    n_tokens = token.shape[1] - (0 if finalize == "final" else 3)
    assert mel.shape == (1, 80, 2 * n_tokens)
    assert _max_err(mel, expected) < TOL


def test_pre_lookahead_context_equals_zero_padding_at_the_end() -> None:
    torch.manual_seed(0)
    layer = PreLookaheadLayer(8, 16, pre_lookahead_len=3).eval()
    x = torch.randn(1, 10, 8)
    with_context = layer(x[:, :7], context=x[:, 7:])
    full = layer(x)
    # frames far enough from the end see the same inputs either way
    torch.testing.assert_close(with_context[:, :7], full[:, :7])
    with_zero_context = layer(x[:, :7], context=torch.zeros(1, 3, 8))
    torch.testing.assert_close(with_zero_context, layer(x[:, :7]))


def test_bad_inputs_raise(flow: CausalMaskedDiffWithDiT) -> None:
    tok = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="one utterance"):  # look-ahead calls are per stream
        flow.inference(
            tok,
            torch.tensor([5, 5]),
            tok[:, :0],
            torch.tensor([0, 0]),
            torch.zeros(2, 0, 80),
            torch.tensor([0, 0]),
            torch.randn(2, 192),
            streaming=False,
            finalize=False,
        )
    tok = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError):
        flow.inference(
            tok,
            torch.tensor([3]),
            tok[:, :0],
            torch.tensor([0]),
            torch.zeros(1, 0, 80),
            torch.tensor([0]),
            torch.randn(1, 192),
            streaming=True,
            finalize=False,
        )


@pytest.mark.parametrize("streaming", [False, True])
def test_whole_utterances_batched_equal_each_alone(
    flow: CausalMaskedDiffWithDiT, streaming: bool
) -> None:
    """Utterances of different prompt and token lengths in one padded batch (masked DiT, every
    row from the same noise frames) give each utterance's mel alone."""
    check_batched_equals_alone(flow, utterances_of(_load("inference")), streaming)


def _inference(
    flow: CausalMaskedDiffWithDiT, prompt: bool, streaming: bool, finalize: bool
) -> tuple[torch.Tensor, None]:
    """flow.inference on the golden tokens, with or without the golden prompt."""
    g = _load("inference")
    token = torch.from_numpy(g["token"])
    if prompt:
        p_tok, p_feat = torch.from_numpy(g["prompt_token"]), torch.from_numpy(g["prompt_feat"])
    else:
        p_tok, p_feat = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80)
    return flow.inference(
        token,
        torch.tensor([token.shape[1]]),
        p_tok,
        torch.tensor([p_tok.shape[1]]),
        p_feat,
        torch.tensor([p_feat.shape[1]]),
        torch.from_numpy(g["embedding"]),
        streaming=streaming,
        finalize=finalize,
    )


def _prompted_mel(flow: CausalMaskedDiffWithDiT) -> torch.Tensor:
    return _inference(flow, prompt=True, streaming=False, finalize=True)[0]


def test_time_conditioning_is_computed_once_per_schedule(state: dict[str, torch.Tensor]) -> None:
    """The solver computes what the DiT derives from t alone (time MLP, adaptive norms) once per
    Euler step of its schedule and reuses it (the goldens above hold with it); new weights
    through load_state_dict or a dtype/device move compute it again."""
    flow = new_flow(state)
    before = _prompted_mel(flow)
    assert _max_err(before, _load("inference")["mel_prompt_full_final"]) < TOL
    norms = [block.attn_norm.linear for block in flow.decoder.estimator.transformer_blocks]
    with torch.no_grad():  # behind the solver's back: the table it computed stays in use
        for linear in norms:
            linear.weight.mul_(2.0)
    assert torch.equal(_prompted_mel(flow), before)
    changed = {k: v.clone() for k, v in flow.state_dict().items()}
    flow.load_state_dict(changed, strict=True)  # the same doubled weights, loaded: recomputed
    loaded = _prompted_mel(flow)
    assert torch.equal(loaded, _prompted_mel(new_flow(changed)))
    assert (loaded - before).abs().max() > 1e-3
    with torch.no_grad():
        for linear in norms:
            linear.weight.div_(2.0)  # exact: back to the loaded weights
    assert torch.equal(_prompted_mel(flow.float()), before)  # a (dtype) move recomputes it


def test_fixed_time_conditioning_releases_its_weights(state: dict[str, torch.Tensor]) -> None:
    """Engine.load fixes the schedule: the time table is computed once and the weights only it
    reads are released; the mel does not change, and another schedule is refused clearly."""
    flow = new_flow(state)
    before = _prompted_mel(flow)
    estimator = flow.decoder.estimator
    weights = sum(p.numel() for m in estimator.time_modules() for p in m.parameters())
    released = flow.decoder.fix_time_conditioning()
    assert released == 4 * weights > 0
    assert all(p.numel() == 0 for m in estimator.time_modules() for p in m.parameters())
    assert torch.equal(_prompted_mel(flow), before)
    flow.decoder.set_steps(10)  # the fixed schedule itself
    with pytest.raises(RuntimeError, match="fixed at load for 10 Euler steps .* for 4 steps"):
        flow.decoder.set_steps(4)
    with pytest.raises(RuntimeError, match="fixed at load for 10 Euler steps .* 5 steps on cpu"):
        mu, mask, spks, cond = _solver_inputs()
        flow.decoder(mu, mask, 5, spks=spks, cond=cond)


def _solver_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    mu = torch.randn(1, 80, 24, generator=g)
    return mu, torch.ones(1, 1, 24), torch.randn(1, 80, generator=g), torch.zeros_like(mu)


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_time_table_gives_the_estimator_its_own_floats(estimator: DiT, rows: int) -> None:
    """The solver's table gives a DiT call exactly what it computes from t itself (one row,
    the official batch of two; more rows take the batch of two's first row)."""
    cfm = CausalConditionalCFM(
        in_channels=240, cfm_params=CFM_PARAMS, n_spks=1, spk_emb_dim=80, estimator=estimator
    )
    g = torch.Generator().manual_seed(9)
    x, mu, cond = (torch.randn(rows, 80, 30, generator=g) for _ in range(3))
    spks, mask = torch.randn(rows, 80, generator=g), torch.ones(rows, 1, 30)
    t_span = time_span(10, "cosine", torch.empty(0))
    with torch.inference_mode():
        for step, (t, _) in enumerate(euler_times(t_span)):
            time = cfm.time_conditioning(estimator, 10, step, rows, torch.device("cpu"))
            if rows <= 2:
                own = estimator(x, mask, mu, t.expand(rows), spks, cond)
                assert torch.equal(estimator(x, mask, mu, t, spks, cond, time=time), own)
            else:  # each row as in the official batch of two
                pair = estimator(x[:2], mask[:2], mu[:2], t.expand(2), spks[:2], cond[:2])
                got = estimator(x, mask, mu, t.expand(rows), spks, cond, time=time)
                torch.testing.assert_close(got[:2], pair, rtol=0, atol=1e-5)
