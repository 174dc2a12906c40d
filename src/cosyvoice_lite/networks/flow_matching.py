"""Conditional flow matching solver (official `cosyvoice/flow/flow_matching.py`).

Both solvers integrate the estimator's velocity field from noise (t=0) to a mel (t=1) with a
fixed-step Euler method on a cosine time schedule, using classifier-free guidance: every step
runs the estimator on a batch of two, the second row with mu, spks and cond zeroed, and mixes
`v = (1 + r) * v_cond - r * v_uncond` with r = `inference_cfg_rate`.

* `ConditionalCFM` (v1) draws fresh Gaussian noise per call from an explicit generator and keeps
  the official "flow cache" so that overlapping streaming chunks reuse noise and mu.
* `CausalConditionalCFM` (v2/v3) always uses the same noise: the official module draws
  `randn(1, 80, 15000)` right after seeding the global RNG with 0. We draw the identical values
  from a private generator and keep them out of the state_dict (they are not in flow.pt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.networks.abort import check
from cosyvoice_lite.row_parallel import SERIAL, RowSplit

# Frames at the end of a v1 chunk whose noise and mu are carried to the next chunk; it is the
# mel length of the 20-token overlap, int(20 / 50 * 22050 / 256) (official hard-coded value).
FLOW_CACHE_OVERLAP_FRAMES = 34

# v2/v3 fixed noise: 80 mel bins x 300 s at 50 frames/s, drawn after manual_seed(0).
FIXED_NOISE_SEED = 0
FIXED_NOISE_FRAMES = 50 * 300

# The official number of Euler steps (hard-coded in every official flow `inference`). Fewer steps
# are faster and change the mel; how much that costs in quality can only be judged with real
# weights, so the official value stays the default.
OFFICIAL_STEPS = 10
MAX_STEPS = 100

# Classifier-free guidance: every utterance or stream is two estimator rows (conditional, then
# unconditional with mu, spks and cond zeroed).
CFG_ROWS = 2


def stream_estimator(cfm: nn.Module) -> nn.Module | None:
    """The estimator module whose layers compute a stream's new frames against its caches: the
    CFM's estimator, or the torch module a stand-in for whole calls keeps as ``incremental``
    (``export.runtime.OrtEstimator``: a graph of whole inputs cannot hold per-stream caches)."""
    estimator = getattr(cfm, "estimator", None)
    return getattr(estimator, "incremental", estimator)


def check_steps(steps: int) -> int:
    """A valid number of Euler steps, or ValueError naming the range."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"flow steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    return steps


def _cfm_param(cfm_params: Mapping[str, Any] | Any, name: str, default: Any = None) -> Any:
    """Read a cfm_params entry from a plain mapping (or an attribute-style config object)."""
    if isinstance(cfm_params, Mapping):
        value = cfm_params.get(name, default)
    else:
        value = getattr(cfm_params, name, default)
    if value is None:
        raise ModelDirError(f"cfm_params is missing {name!r}")
    return value


class TimeConditioning(NamedTuple):
    """What an estimator computes from t alone, for R rows (`estimator.time_conditioning(t)`):
    each block's modulation [R, k] (the DiT's adaptive norms, the U-Net's resnet time MLPs) and
    the DiT's final norm's [R, 2 * dim] (None for the U-Net). It is the same for every frame,
    chunk and request at a given t, so the solver computes it once per Euler step of its fixed
    schedule (`_EulerCFM.time_conditioning`) instead of at every call: for the full-size DiT
    that is 140 M of its 330 M weights read per call. Where R is not the batch's, its first row
    serves every row (`per_row`)."""

    blocks: tuple[torch.Tensor, ...]
    final: torch.Tensor | None = None


def per_row(modulation: torch.Tensor, rows: int) -> torch.Tensor:
    """Modulations [rows, k] from ``modulation`` [R, k]: its own rows, or, when the counts
    differ, its first row for every row (every row shares one t: conditioned as the official
    batch of two CFG rows, each row gets the values it has alone)."""
    return modulation if modulation.shape[0] == rows else modulation[:1].expand(rows, -1)


def conv1d_by_row(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``conv``'s weights over x [R, C, T] (already padded as the caller needs) so that a row's
    result never depends on the rows beside it: torch's float32 CPU convolution takes another
    path for a single sample than for several (measured: 256 channels, kernel 3, ~1e-6
    relative), so there float32 rows go one by one; elsewhere (bfloat16 measured bit-identical,
    devices) in one call."""

    def conv1d(rows: torch.Tensor) -> torch.Tensor:
        return F.conv1d(rows, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

    if x.shape[0] == 1 or x.dtype != torch.float32 or x.device.type != "cpu":
        return conv1d(x)
    return torch.cat([conv1d(x[r : r + 1]) for r in range(x.shape[0])])


def time_span(n_timesteps: int, scheduler: str, like: torch.Tensor) -> torch.Tensor:
    """The n_timesteps + 1 integration times, cosine-warped when scheduler == 'cosine'."""
    t_span = torch.linspace(0, 1, n_timesteps + 1, device=like.device, dtype=like.dtype)
    if scheduler == "cosine":
        t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
    return t_span


@dataclass(eq=False)
class StreamSolve:
    """One incremental stream's share of a flow call (v2 and v3): the new frames mu [1, 80, n]
    at mel frame ``start``. ``state`` has ``embedding``, ``prompt_feat``, ``cache_budget``,
    ``frozen_at`` and ``frozen_mu``; ``caches[step]`` holds one cache per CFG row (with
    ``freeze()``), so that the rows can be computed apart (row_parallel.py); ``own_bytes`` is
    what they hold."""

    state: Any
    mu: torch.Tensor
    start: int
    caches: list[list[Any]]
    own_bytes: int


def keeps_history(caches: Sequence[Any]) -> bool:
    """Whether an incremental call over these rows' caches (one per row, each with ``frozen``)
    keeps anything: not once every one is frozen. Such a call (a re-solve past the stream's
    budget, hundreds of frames and more) returns only its velocity, since holding every layer's
    new keys and values of all its frames until it returns is what it would otherwise cost, and
    runs eagerly: few, large operations, where a graph saves little, and no graph of its own to
    trace (seconds) and hold (tens of MB)."""
    return not all(cache.frozen for cache in caches)


# velocity of rows of streams: (x [R, 80, n], mu, t [1] (every row's), spks, cond, the rows'
# caches at this Euler step, their streams' first frames, t's conditioning for the official
# batch of two CFG rows (None: computed from t)) -> [R, 80, n]
StreamVelocity = Callable[
    [
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        list[Any],
        list[int],
        TimeConditioning | None,
    ],
    torch.Tensor,
]


@dataclass(frozen=True)
class TokenChunks:
    """How an incremental stream turns tokens into mel (v2 and v3): in whole chunks of ``size``
    tokens counted from the prompt's first token, each once its ``look`` next tokens (look-ahead)
    exist; ``ratio`` mel frames per token. A stream state has ``pending`` [1, k] tokens received
    but not computed, ``tokens_done`` and ``finished``."""

    size: int
    look: int
    ratio: int

    def whole(self, state: Any, pending: int) -> int:
        """Tokens of `pending` that complete whole chunks with their look-ahead."""
        usable = state.tokens_done + pending - self.look
        return (usable // self.size) * self.size - state.tokens_done

    def needed(self, state: Any, new_tokens: int) -> int:
        """Tokens still needed, after `new_tokens` more, before a (not final) call computes mel:
        0 when those would already complete a chunk."""
        next_end = (state.tokens_done // self.size + 1) * self.size
        have = state.pending.shape[1] + new_tokens
        return max(0, next_end - state.tokens_done + self.look - have)

    def frames_after(self, state: Any, new_tokens: int, finalize: bool) -> int:
        """The stream's mel frames, prompt included, once a call with `new_tokens` is done."""
        pending = state.pending.shape[1] + new_tokens
        count = pending if finalize else self.whole(state, pending)
        return self.ratio * (state.tokens_done + max(count, 0))

    def take(
        self, state: Any, token: torch.Tensor, finalize: bool
    ) -> tuple[int, torch.Tensor, torch.Tensor | None] | None:
        """Adds the tokens to the stream's pending ones; returns (count, the tokens to compute
        now, their look-ahead context) or None when no whole chunk is ready."""
        pending = torch.cat([state.pending, token.to(state.pending)], dim=1)
        if finalize:
            count, context = pending.shape[1], None
            state.finished = True
        else:
            count = self.whole(state, pending.shape[1])
            context = pending[:, count : count + self.look] if count > 0 else None
        state.pending = pending[:, max(count, 0) :]
        if count <= 0:
            return None
        return count, pending[:, :count], context


def step_streams(
    cfm: nn.Module,
    states: Sequence[Any],
    tokens: Sequence[torch.Tensor],
    finalize: Sequence[bool],
    chunks: TokenChunks,
    encode: Callable[[Any, torch.Tensor, torch.Tensor | None], torch.Tensor],
    stream_solve: Callable[[Any, torch.Tensor, int], StreamSolve],
    velocity: StreamVelocity,
) -> list[torch.Tensor]:
    """`stream_steps` of the v2 and v3 flows: each stream's new tokens are taken in whole chunks
    and encoded alone (``encode(state, tokens, context)`` -> mu [1, 80, ratio * count]), then
    the solves of the streams with as many new frames run as one batch (`solve_streams`);
    returns each stream's new float32 mel [1, 80, m] (prompt frames are not output). Every call
    is checked before any stream changes: a StreamCallError leaves all of them as they were (any
    other error may come after some streams advanced)."""
    check_stream_calls(states, tokens, finalize, chunks.frames_after, cfm)
    mels: list[torch.Tensor] = []
    solves: list[tuple[int, StreamSolve, int]] = []
    for state, token, last in zip(states, tokens, finalize, strict=True):
        mels.append(state.embedding.new_zeros(1, state.prompt_feat.shape[2], 0).float())
        state.last_step_frames = 0
        work = chunks.take(state, token, last)
        if work is None:
            continue
        count, new, context = work
        mu = encode(state, new, context)
        first_frame = chunks.ratio * state.tokens_done
        state.tokens_done += count
        skip = max(0, state.prompt_feat.shape[1] - first_frame)  # prompt frames are not output
        solves.append((len(mels) - 1, stream_solve(state, mu, first_frame), skip))

    def solve(streams: list[StreamSolve]) -> torch.Tensor:
        for stream in streams:
            stream.state.last_step_frames = stream.mu.shape[2]
        return solve_streams(cfm, streams, velocity)

    solved = solve_within_budget([solve for _, solve, _ in solves], solve)
    for (index, _, skip), mel in zip(solves, solved, strict=True):
        mels[index] = mel[:, :, skip:].float()
    return mels


class StreamCallError(ValueError):
    """A bad ``stream_steps`` call, found before any stream changed: each stream may be run
    again on its own. Any other error of the call may come after some streams advanced."""


def check_stream_calls(
    states: Sequence[Any],
    tokens: Sequence[torch.Tensor],
    finalize: Sequence[bool],
    frames_after: Callable[[Any, int, bool], int],
    cfm: nn.Module,
) -> None:
    """StreamCallError (a ValueError), before any stream changes, for a bad `stream_steps` call
    (v2 and v3): lists of different lengths, a stream given twice, a finalized stream, tokens
    not [1, k], or a call that would take a stream past the fixed noise
    (``frames_after(state, k, finalize)``: its mel frames once the call is done)."""
    if not len(states) == len(tokens) == len(finalize):
        raise StreamCallError("stream_steps needs one token tensor and one finalize per stream")
    if len({id(state) for state in states}) != len(states):
        raise StreamCallError("a flow stream can appear once per stream_steps call")
    limit = cfm.rand_noise.shape[2]
    for state, token, last in zip(states, tokens, finalize, strict=True):
        if state.finished:
            raise StreamCallError("this flow stream has already been finalized")
        if token.dim() != 2 or token.shape[0] != 1:
            raise StreamCallError(f"tokens must be [1, k], got {tuple(token.shape)}")
        if frames_after(state, token.shape[1], last) > limit:
            raise StreamCallError(f"the flow can generate at most {limit} mel frames per stream")


def solve_within_budget(
    streams: list[StreamSolve], solve: Callable[[list[StreamSolve]], torch.Tensor]
) -> list[torch.Tensor]:
    """The mel of each stream's new frames (v2 and v3), streams with as many new frames solved
    together: ``solve(streams)`` returns their mel [S, 80, n].

    A stream whose caches reach its budget has them frozen, and every later call re-solves its
    frames from ``frozen_at`` on with the new ones (chunk-causal, so the re-solved frames come
    out the same), alone; only the new frames are returned.
    """
    mels: list[torch.Tensor | None] = [None] * len(streams)
    together: dict[int, list[int]] = {}
    for index, stream in enumerate(streams):
        state, budget = stream.state, stream.state.cache_budget
        if state.frozen_at is None and budget is not None and stream.own_bytes >= budget:
            state.frozen_at = stream.start
            for step in stream.caches:
                for cache in step:
                    cache.freeze()
        if state.frozen_at is None:
            together.setdefault(stream.mu.shape[2], []).append(index)
            continue
        tail = state.frozen_mu
        state.frozen_mu = stream.mu if tail is None else torch.cat([tail, stream.mu], dim=2)
        again = dataclasses.replace(stream, mu=state.frozen_mu, start=state.frozen_at)
        mels[index] = solve([again])[:, :, stream.start - state.frozen_at :]
    for indices in together.values():
        mel = solve([streams[i] for i in indices])
        for row, index in enumerate(indices):
            mels[index] = mel[row : row + 1]
    return mels  # type: ignore[return-value]


def solve_streams(
    cfm: nn.Module, streams: list[StreamSolve], velocity: StreamVelocity
) -> torch.Tensor:
    """The Euler/CFG solve of S incremental streams' new frames (all n frames long) in one batch
    of 2S estimator rows: stream i's conditional row 2i, its unconditional row 2i + 1 (mu, spks,
    cond zero), as the official batch of two for one stream; the rows are shared among the
    threads of ``cfm.stream_rows``. Mirrors `_EulerCFM.solve_euler` (same operations, same t/dt
    accumulation); returns the float32 mel [S, 80, n]."""
    first = streams[0]
    n, device = first.mu.shape[2], first.mu.device
    limit = cfm.rand_noise.shape[2]
    if any(s.start + n > limit for s in streams):
        raise ValueError(f"the flow can generate at most {limit} mel frames per stream")
    dtype = first.state.embedding.dtype
    # the Euler state stays float32 whatever the weights' dtype (see solve_euler)
    x = stack_rows([cfm.rand_noise[:, :, s.start : s.start + n] for s in streams])
    x = x.to(device=device, dtype=torch.float32)
    mu_in, spks_in, cond_in = [], [], []
    for s in streams:
        cond = torch.zeros(1, s.mu.shape[1], n, device=device, dtype=dtype)
        prompt = s.state.prompt_feat[:, s.start : s.start + n].transpose(1, 2)
        cond[:, :, : prompt.shape[2]] = prompt
        mu_in += [s.mu.to(dtype), torch.zeros_like(s.mu, dtype=dtype)]
        spks_in += [s.state.embedding, torch.zeros_like(s.state.embedding)]
        cond_in += [cond, torch.zeros_like(cond)]
    mu, spks, cond = stack_rows(mu_in), stack_rows(spks_in), stack_rows(cond_in)
    starts = [s.start for s in streams for _ in range(CFG_ROWS)]
    t_span = time_span(cfm.steps, cfm.t_scheduler, x)

    def rows_velocity(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        x_in = torch.repeat_interleave(x, CFG_ROWS, dim=0).to(dtype)
        caches = [cache for s in streams for cache in s.caches[step]]

        time = cfm.time_conditioning(stream_estimator(cfm), cfm.steps, step, CFG_ROWS, device)

        def share(rows: slice) -> torch.Tensor:  # t stays float32
            return velocity(
                x_in[rows], mu[rows], t, spks[rows], cond[rows], caches[rows], starts[rows], time
            )

        return cfm.stream_rows.map(share, x_in.shape[0])

    return euler_cfg(x, t_span, cfm.inference_cfg_rate, rows_velocity)


def stack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors stacked along the batch dim (one tensor as it is)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)


def euler_cfg(
    x: torch.Tensor,
    t_span: torch.Tensor,
    rate: float,
    velocity: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """The one Euler solver with classifier-free guidance, used by every flow (whole utterances
    and incremental streams alike).

    ``velocity(x, t, step)`` returns the estimator's output for the float32 state ``x`` (B, C, T)
    at time ``t`` (1,) of Euler step ``step``, as 2B rows: for each utterance its conditional
    then its unconditional row. The guided velocity is ``(1 + rate) * v_cond - rate * v_uncond``.
    t and dt are accumulated exactly as the official loop does (t += dt, then
    dt = t_span[k+1] - t), which differs from t_span[k] in the last float bits.
    """
    for step, (t, dt) in enumerate(euler_times(t_span)):
        check(f"Euler step {step}")  # a cancelled request's solve stops here (networks.abort)
        v = velocity(x, t, step).float()
        v_cond, v_uncond = v[0::2], v[1::2]
        x = x + dt * ((1.0 + rate) * v_cond - rate * v_uncond)
    return x


def euler_times(t_span: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(t (1,), dt) of each Euler step, accumulated as the official loop does (t += dt, then
    dt = t_span[k+1] - t)."""
    t = t_span[0].unsqueeze(0)
    dt = t_span[1] - t_span[0]
    for step in range(1, len(t_span)):
        yield t, dt
        t = t + dt
        if step < len(t_span) - 1:
            dt = t_span[step + 1] - t


class _EulerCFM(nn.Module):
    """Shared constructor and Euler/CFG solver."""

    def __init__(
        self,
        in_channels: int,
        cfm_params: Mapping[str, Any] | Any,
        n_spks: int = 1,
        spk_emb_dim: int = 64,
        estimator: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if estimator is None:
            raise ModelDirError(f"{type(self).__name__} needs an estimator module")
        self.n_feats = in_channels
        self.n_spks = n_spks
        self.spk_emb_dim = spk_emb_dim
        self.solver = _cfm_param(cfm_params, "solver", "euler")
        if self.solver != "euler":
            raise ModelDirError(f"unsupported cfm solver {self.solver!r}; only 'euler' exists")
        self.sigma_min = float(_cfm_param(cfm_params, "sigma_min", 1e-4))
        self.t_scheduler = _cfm_param(cfm_params, "t_scheduler")
        self.training_cfg_rate = float(_cfm_param(cfm_params, "training_cfg_rate", 0.0))
        self.inference_cfg_rate = float(_cfm_param(cfm_params, "inference_cfg_rate"))
        self.estimator = estimator
        self.steps = OFFICIAL_STEPS  # chosen once at load with set_steps
        # threads computing the estimator's rows of streams and of whole utterances
        self.stream_rows = self.utterance_rows = SERIAL  # chosen once at load: set_row_split
        # (estimator id, steps, device, rows) -> each step's time conditioning; derived from the
        # weights, so dropped when they change (load_state_dict, dtype or device moves)
        self._time_tables: dict[tuple, list[TimeConditioning]] = {}
        self._time_fixed: int | None = None  # fix_time_conditioning: its steps; weights released
        self.register_load_state_dict_post_hook(lambda module, _: module._time_tables.clear())

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - nn.Module's signature
        if self._time_fixed is None:  # fixed: the weights are gone, the tables stay as computed
            self._time_tables.clear()
        return super()._apply(fn, *args, **kwargs)

    def fix_time_conditioning(self) -> int:
        """Compute the time table of the current schedule (``steps``) on the weights' device for
        every estimator the solver runs (whole utterances and streams, one and two rows), then
        release the weights only that table reads (``estimator.time_modules()``). A load-time
        choice of the engine, whose schedule and device never change: full-size CosyVoice3 frees
        142 M weights (570 MB in float32). Afterwards another schedule or device raises instead
        of recomputing, and the state_dict no longer holds those weights. Returns the bytes
        released."""
        estimators = {id(e): e for e in (self.estimator, stream_estimator(self))}.values()
        estimators = [e for e in estimators if callable(getattr(e, "time_modules", None))]
        for estimator in estimators:
            device = next(estimator.parameters()).device
            for rows in range(1, CFG_ROWS + 1):
                self.time_conditioning(estimator, self.steps, 0, rows, device)
        released = 0
        for estimator in estimators:
            for module in estimator.time_modules():
                for tensor in (*module.parameters(), *module.buffers()):
                    released += tensor.numel() * tensor.element_size()
                    tensor.data = tensor.data.new_empty(0)
        self._time_fixed = self.steps
        return released

    def time_conditioning(
        self, estimator: nn.Module, steps: int, step: int, rows: int, device: torch.device
    ) -> TimeConditioning | None:
        """``estimator.time_conditioning`` of the t of Euler step ``step`` of ``steps`` for
        ``rows`` rows (every row has the same t; more than two rows take the official batch of
        two's first row), computed once per schedule. None where the estimator conditions on t
        itself (an exported graph)."""
        make = getattr(estimator, "time_conditioning", None)
        if make is None:
            return None
        rows = min(rows, CFG_ROWS)
        key = (id(estimator), steps, str(device), rows)
        table = self._time_tables.get(key)
        if table is None and self._time_fixed is not None:
            raise RuntimeError(
                f"the flow's time conditioning was fixed at load for {self._time_fixed} Euler "
                f"steps and its weights released: {steps} steps on {device} cannot be computed; "
                "load the model again to change the flow steps or the device"
            )
        if table is None:  # two threads may both compute it: the same values either way
            like = torch.empty(0, device=device, dtype=torch.float32)  # as the solvers' state
            t_span = time_span(steps, self.t_scheduler, like)
            with torch.inference_mode():
                table = [make(t.expand(rows)) for t, _ in euler_times(t_span)]
            self._time_tables[key] = table
        return table[step]

    def set_steps(self, steps: int) -> None:
        """Use ``steps`` Euler steps from now on (a load-time choice; 10 is the official)."""
        steps = check_steps(steps)
        if self._time_fixed is not None and steps != self._time_fixed:
            raise RuntimeError(
                f"the flow's time conditioning was fixed at load for {self._time_fixed} Euler "
                f"steps and its weights released; load the model again for {steps} steps"
            )
        self.steps = steps

    def set_row_split(self, split: RowSplit, utterances: bool = True) -> None:
        """Compute the estimator's rows of incremental streams (and with ``utterances``, of whole
        utterances too) on ``split``'s threads from now on: a load-time choice for CPUs (see
        row_parallel.py). A row computed apart may differ in the last float bits."""
        self.stream_rows = split
        self.utterance_rows = split if utterances else SERIAL

    def close_row_split(self) -> None:
        """Stop the threads of `set_row_split` (back to computing the rows in one batch)."""
        self.stream_rows.close()
        self.utterance_rows.close()
        self.stream_rows = self.utterance_rows = SERIAL

    def solve_euler(
        self,
        x: torch.Tensor,
        t_span: torch.Tensor,
        mu: torch.Tensor,
        mask: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        streaming: bool = False,
    ) -> torch.Tensor:
        """Integrate from noise x (B, C, T) along t_span; returns the float32 mel (B, C, T).

        B utterances (padded to T, ``mask`` (B, 1, T) marks each one's frames) are 2B estimator
        rows: utterance i's conditional row 2i, its unconditional row 2i + 1 (mu, spks and cond
        zero), as the official batch of two for one utterance and as `solve_streams`.
        The estimator runs in the dtype of its weights (that of ``spks``); the state x and the
        times stay float32 whatever that dtype is: x accumulates ten small steps, which bfloat16
        (8 significant bits) would round away."""
        batch, channels, length = x.shape
        rows, steps = CFG_ROWS * batch, len(t_span) - 1
        # The official buffers take the dtype of spks: the dtype the estimator's weights are in.
        dtype = spks.dtype
        x_in = torch.zeros([rows, channels, length], device=x.device, dtype=dtype)
        mask_in = torch.zeros([rows, 1, length], device=x.device, dtype=dtype)
        mu_in = torch.zeros([rows, channels, length], device=x.device, dtype=dtype)
        # t stays float32: the time embedding scales it by 1000 before its sinusoids, so a
        # bfloat16 t (2**-9 steps near 0.5) would turn the phases by up to 2 radians
        t_in = torch.zeros([rows], device=x.device, dtype=torch.float32)
        spks_in = torch.zeros([rows, spks.shape[1]], device=x.device, dtype=dtype)
        cond_in = torch.zeros([rows, channels, length], device=x.device, dtype=dtype)
        # The odd rows keep mu/spks/cond at zero: the unconditional branch of guidance.
        mu_in[0::CFG_ROWS] = mu
        spks_in[0::CFG_ROWS] = spks
        cond_in[0::CFG_ROWS] = cond
        mask_in.view(batch, CFG_ROWS, 1, length)[:] = mask.unsqueeze(1)

        def velocity(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
            x_in.view(batch, CFG_ROWS, channels, length)[:] = x.unsqueeze(1)
            t_in[:] = t

            def rows_velocity(rows: slice) -> torch.Tensor:
                count = len(range(*rows.indices(t_in.shape[0])))
                return self.estimator(
                    x_in[rows],
                    mask_in[rows],
                    mu_in[rows],
                    t_in[rows],
                    spks_in[rows],
                    cond_in[rows],
                    streaming=streaming,
                    time=self.time_conditioning(self.estimator, steps, step, count, x.device),
                )

            return self.utterance_rows.map(rows_velocity, rows)

        x = euler_cfg(x, t_span, self.inference_cfg_rate, velocity)
        return x.float()


class ConditionalCFM(_EulerCFM):
    """v1 CFM: fresh noise per call, plus the streaming flow cache."""

    @torch.inference_mode()
    def forward(
        self,
        mu: torch.Tensor,
        mask: torch.Tensor,
        n_timesteps: int,
        temperature: float = 1.0,
        spks: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        prompt_len: int = 0,
        cache: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mu, cond: (1, 80, T); mask: (1, 1, T); spks: (1, 80).

        `cache` (1, 80, N, 2) holds noise [..., 0] and mu [..., 1] of the first N frames, which
        overwrite this call's noise and mu (streaming continuity). Returns the mel (1, 80, T) and
        the new cache: the first `prompt_len` frames and the last 34 frames of this call.
        The noise is `randn` from `generator`, the same stream as the official `randn_like(mu)`
        after `torch.manual_seed(s)` when the generator is seeded with s and lives on the same
        device type as the official run.
        """
        if spks is None or cond is None:
            raise ValueError("ConditionalCFM needs spks and cond")
        if generator is None:
            raise ValueError("ConditionalCFM needs a torch.Generator for its noise")
        # Drawn on the generator's device, then moved: a CPU generator gives the same noise on
        # every device; a CUDA generator reproduces the official draw on that GPU.
        # float32 noise whatever the weights' dtype: the same draws as a float32 run
        z = torch.randn(mu.shape, generator=generator, device=generator.device, dtype=torch.float32)
        z = z.to(mu.device) * temperature
        mu = mu.clone()
        if cache is not None and cache.shape[2] != 0:
            cache_size = cache.shape[2]
            if cache_size > mu.shape[2]:
                raise ValueError(
                    f"flow cache covers {cache_size} frames but the chunk has only {mu.shape[2]}"
                )
            z[:, :, :cache_size] = cache[:, :, :, 0]
            mu[:, :, :cache_size] = cache[:, :, :, 1]
        # Same slicing as the official code, including its overlap when T < prompt_len + 34.
        tail = FLOW_CACHE_OVERLAP_FRAMES
        z_cache = torch.cat([z[:, :, :prompt_len], z[:, :, -tail:]], dim=2)
        mu_cache = torch.cat([mu[:, :, :prompt_len], mu[:, :, -tail:]], dim=2)
        new_cache = torch.stack([z_cache, mu_cache.to(z.dtype)], dim=-1)

        t_span = time_span(n_timesteps, self.t_scheduler, z)
        mel = self.solve_euler(z, t_span=t_span, mu=mu, mask=mask, spks=spks, cond=cond)
        return mel, new_cache


class CausalConditionalCFM(_EulerCFM):
    """v2/v3 CFM: deterministic, the noise is the fixed `rand_noise` buffer."""

    rand_noise: torch.Tensor
    precision_exempt = {"rand_noise": "the starting noise of the float32 Euler state"}

    def __init__(
        self,
        in_channels: int,
        cfm_params: Mapping[str, Any] | Any,
        n_spks: int = 1,
        spk_emb_dim: int = 64,
        estimator: nn.Module | None = None,
    ) -> None:
        super().__init__(in_channels, cfm_params, n_spks, spk_emb_dim, estimator)
        # Identical to the official `set_all_random_seed(0); torch.randn([1, 80, 15000])`, but
        # drawn from a private CPU generator so the global RNG is left alone. Not persistent:
        # flow.pt does not contain it.
        generator = torch.Generator().manual_seed(FIXED_NOISE_SEED)
        noise = torch.randn([1, 80, FIXED_NOISE_FRAMES], generator=generator)
        self.register_buffer("rand_noise", noise, persistent=False)

    @torch.inference_mode()
    def forward(
        self,
        mu: torch.Tensor,
        mask: torch.Tensor,
        n_timesteps: int,
        temperature: float = 1.0,
        spks: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        streaming: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """mu, cond: (B, 80, T); mask: (B, 1, T); spks: (B, 80) -> (mel (B, 80, T), None).

        Every row starts from the same noise frames 0 .. T - 1, so a padded row's frames are
        what that utterance gives alone."""
        if spks is None or cond is None:
            raise ValueError("CausalConditionalCFM needs spks and cond")
        batch, length = mu.shape[0], mu.shape[2]
        if length > self.rand_noise.shape[2]:
            raise ValueError(
                f"the flow can generate at most {self.rand_noise.shape[2]} mel frames per call, "
                f"got {length}"
            )
        z = self.rand_noise[:, :, :length].to(device=mu.device, dtype=torch.float32) * temperature
        z = z.expand(batch, -1, -1)
        t_span = time_span(n_timesteps, self.t_scheduler, z)
        mel = self.solve_euler(z, t_span, mu, mask, spks, cond, streaming=streaming)
        return mel, None
