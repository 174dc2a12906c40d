"""Version-specific wiring: which tokenizer and which token -> waveform pipeline a model uses."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..build import build_for_checkpoint, build_network
from ..device import Placement
from ..errors import ModelDirError
from ..heap import release_freed_memory
from ..hub import whisper_vocab_path
from ..mapped_tables import map_tables
from ..modeldir import ModelDir, copy_out_of_file, load_checkpoint, load_strict
from ..networks.flow_matching import OFFICIAL_STEPS
from ..precision import apply_precision, declares_int8_products
from ..versions import spec
from .prompt_flow import DEFAULT_BUDGET_BYTES

log = logging.getLogger(__name__)


def text_tokenizer(model: ModelDir, download: bool = True):
    """The text tokenizer the model was trained with (``download``: v1's whisper vocabulary may
    be fetched when it is not in the cache)."""
    if spec(model.version).text_tokenizer == "whisper":
        from ..frontend.tokenizer import WhisperTextTokenizer

        return WhisperTextTokenizer(whisper_vocab_path(download))
    from ..frontend.qwen_tokenizer import QwenTextTokenizer

    return QwenTextTokenizer(model.path / "CosyVoice-BlankEN", model.config.tokenizer.version)


def load_network(
    model: ModelDir,
    part: str,
    filename: str,
    placement: Placement,
    kernels: bool = True,
    finish: Callable[[torch.nn.Module], object] | None = None,
) -> torch.nn.Module:
    """Build one network from the yaml and load its checkpoint strictly; ``kernels``: with the
    load-time decoding kernels (precision.apply_precision), as the engine runs it; ``finish``:
    a last step while the tensors the kernels did not replace are still the file's pages (what
    it releases is never copied into memory)."""
    spec = getattr(model.config, part)
    path = model.path / filename
    if not path.is_file():
        raise ModelDirError(f"{path} is missing")
    network = build_for_checkpoint(spec)
    state = load_checkpoint(path)
    if part == "hift":
        from ..networks.hift import load_hift_state_dict

        load_hift_state_dict(network, state)
    else:  # the kernels below copy from the file's pages (assign_state)
        load_strict(network, state, path, assign=True)
    network = apply_precision(network.to(placement.device).eval(), part, placement, kernels)
    if kernels and placement.device.type == "cpu":
        map_tables(network, path)  # the sparse text tables stay in the file's pages
    if finish is not None:
        finish(network)
    copy_out_of_file(network, state)
    if placement.device.type == "cpu":
        release_freed_memory()  # the kernels' transient copies: not the next network's peak
    return network


def flow_declares_int8_products(model: ModelDir) -> bool:
    """Whether the model's flow has products that ``quantize="int8"`` runs in W8A8 (the classes
    that declare ``int8_products``: CosyVoice3's DiT), known before any weight is loaded: the
    flow's modules built on the meta device (no memory; ~0.1 s at full size)."""
    with torch.device("meta"):
        flow = build_network(model.config.flow)
    return declares_int8_products(flow)


def fix_schedule(flow: torch.nn.Module, steps: int) -> None:
    """The engine's flow schedule, final from load: ``steps`` Euler steps (a quality/speed
    trade-off, official 10); what the flow derives from t alone is computed now and the weights
    only that reads are released (CosyVoice3 full size: 570 MB in float32)."""
    flow.decoder.set_steps(steps)
    flow.decoder.fix_time_conditioning()


def build_pipeline(
    model: ModelDir,
    placement: Placement,
    llm_checkpoint: str = "llm.pt",
    flow_steps: int = OFFICIAL_STEPS,
    prompt_cache_bytes: int = DEFAULT_BUDGET_BYTES,
    stream_cache_bytes: int | None = None,
    cache_dtype: torch.dtype | None = None,
):
    llm = load_network(model, "llm", llm_checkpoint, placement)
    flow = load_network(
        model, "flow", "flow.pt", placement, finish=lambda flow: fix_schedule(flow, flow_steps)
    )
    hift = load_network(model, "hift", "hift.pt", placement)
    if spec(model.version).pipeline == "v1":
        from .v1 import V1Pipeline

        pipeline = V1Pipeline(
            llm,
            flow,
            hift,
            model.config.token_frame_rate,
            model.config.sample_rate,
        )
    else:
        from .v2 import V2Pipeline

        pipeline = V2Pipeline(
            llm,
            flow,
            hift,
            model.config.sample_rate,
            model.version,
            prompt_cache_bytes,
            stream_cache_bytes,
            cache_dtype,
        )
    # where its weights come from: an export installed on it later is checked against them
    pipeline.model_path = model.path
    return pipeline
