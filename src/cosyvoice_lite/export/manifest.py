"""manifest.json: what a host needs besides the graphs (constants, chaining, streaming state).

docs/EXPORT.md explains the same in prose; the manifest is the machine-readable version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

from ..modeldir import ModelDir
from ..versions import VersionSpec, spec

FORMAT = "cosyvoice-lite-onnx"
MANIFEST_VERSION = 1
# A file's fingerprint: sha256 over its size and this many blocks spread over it. Different
# weights differ everywhere, so a sample tells them apart without reading gigabytes at each load.
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_BYTES = 64, 1 << 16


def file_fingerprint(path: Path) -> str:
    """The sampled sha256 of ``path`` (``FINGERPRINT_BLOCKS``): which weights a graph was
    exported from, and whether a graph file is the one exported."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}:".encode())
    with path.open("rb") as file:
        for block in range(FINGERPRINT_BLOCKS):
            file.seek(size * block // FINGERPRINT_BLOCKS)
            digest.update(file.read(FINGERPRINT_BLOCK_BYTES))
    return "sampled-sha256:" + digest.hexdigest()


def _llm_section(lm: nn.Module, version: VersionSpec, sampling) -> dict:
    size = int(lm.speech_token_size)
    ids = {name: size + offset for name, offset in version.special_ids}
    if version.needs_system_prompt:
        ids["end_of_prompt_text_id"] = int(lm.END_OF_PROMPT_ID)
    return {
        "speech_token_size": size,
        "special_ids": ids,
        "stop": "stop at the first sampled id >= speech_token_size (never passed on)",
        "min_max_tokens": "min_len = int(n_text * 2), max_len = int(n_text * 20) in float32, "
        "n_text = tokens of the text to speak (prompt text excluded); "
        f"while fewer than min_len were decoded set logp[{size}] = -inf",
        "sampling": {
            "method": "RAS: top-p/top-k nucleus sampling, re-drawn from the whole "
            "distribution when the token repeats too often in the window",
            **vars(sampling),
        },
        "prefill_text": "prompt_text tokens followed by text tokens"
        + (" (must contain <|endofprompt|>)" if version.needs_system_prompt else ""),
    }


def _flow_section(flow: nn.Module, version: VersionSpec) -> dict:
    cfm = flow.decoder
    section = {
        "n_timesteps": int(getattr(cfm, "steps", 10)),
        "t_scheduler": cfm.t_scheduler,
        "inference_cfg_rate": cfm.inference_cfg_rate,
        "euler": "t_span = linspace(0, 1, n + 1), cosine: 1 - cos(t * pi / 2); t = t_span[0], "
        "dt = t_span[1] - t_span[0]; each step: x_in = [x, x], t_in = [t, t], "
        "mu_in = [mu, 0], spks_in = [spks, 0], cond_in = [cond, 0], mask_in = [ones, ones]; "
        "v = velocity; x += dt * ((1 + r) * v[0] - r * v[1]); t += dt; "
        "dt = t_span[k + 1] - t",
        "mel": "the result x [1, 80, frames]; drop the first prompt_frames frames",
    }
    if not version.chunk_causal_flow:
        section["noise"] = (
            "x0 = standard normal [1, 80, frames] drawn per call (torch: randn "
            "from the request generator after the LLM's draws)"
        )
        section["mel_frames"] = "int(tokens / 50 * 22050 / 256) per chunk of new tokens"
    else:
        section["noise"] = (
            "x0 = the first `frames` columns of the fixed torch.randn(1, 80, 15000) "
            "drawn right after torch.manual_seed(0) (official rand_noise)"
        )
        section["mel_frames"] = f"{int(flow.token_mel_ratio)} per token"
        section["pre_lookahead_len"] = int(flow.pre_lookahead_len)
        section["static_chunk_size"] = int(getattr(cfm.estimator, "static_chunk_size", 0))
    return section


def _hift_section(hift: nn.Module, version: VersionSpec) -> dict:
    dim = int(hift.nb_harmonics) + 1
    section = {"samples_per_frame": int(hift.upsample_scale), "harmonics": dim}
    if version.causal_vocoder:
        section["phase"] = f"[1, {dim}]: the official fixed rand_ini (column 0 is 0)"
        section["noise"] = (
            "[1, samples, 9]: the first `samples` rows of the official fixed "
            "uniform buffer sine_waves [1, 7200000, 9] (FixedSourceRandomness); "
            "any uniform [0, 1) noise gives equally valid speech"
        )
    else:
        section["phase"] = f"[1, {dim}] uniform [0, 1) start phases (column 0 is ignored)"
        section["noise"] = (
            f"[1, samples, {dim}] standard normal; to reproduce torch draw "
            "them with draw_source_noise (order: phase, noise, one unused "
            "[1, samples, 1] normal draw)"
        )
    return section


CHAIN = [
    "llm_prefill(text, [embedding,] prompt_speech_token) -> logp, cache",
    "loop: sample a token from logp on the host (stop ids end it); "
    "llm_decode(token, cache) -> logp, cache",
    "flow_encoder(prompt_token, token = the sampled speech tokens, prompt_feat, embedding) "
    "-> mu, cond, spks",
    "Euler loop on the host calling flow_estimator n_timesteps times -> mel (drop prompt frames)",
    "hift(mel, phase, noise[, cache_source]) -> speech",
]


def _streaming(version: VersionSpec) -> dict:
    if not version.chunk_causal_flow:
        return {
            "llm": "the key/value/position caches are the only LLM state",
            "flow": "chunks of hop + 20 tokens overlapping by 20; carry the last 34 noise and mu "
            "frames (after the prompt frames) into the next call: they overwrite the "
            "first frames of its noise and mu (official flow_cache)",
            "mel": "cross-fade 34 overlapping mel frames with a Hamming window",
            "hift": "keep the last 20 mel frames and the last 20 * 256 source samples; pass "
            "those samples as cache_source with the next chunk's mel (prefixed by the "
            "kept frames) and cross-fade the waveform",
        }
    return {
        "llm": "the key/value caches are the only LLM state",
        "flow": "official scheme: first chunk 25 tokens + prompt padding to a multiple of 25, "
        "later hops double up to 100; each chunk re-runs flow_encoder_chunk and "
        "flow_estimator_chunk on prompt + all tokens so far (the last "
        "pre_lookahead_len tokens only as look-ahead) and keeps the new frames; "
        "the final call uses flow_encoder and flow_estimator",
        "hift": (
            "official scheme: call hift_chunk on the whole mel history at every chunk and emit "
            "the samples beyond those already emitted; hift on the whole history at the end"
            if version.causal_vocoder
            else "keep the last 8 mel frames and 8 * 480 source samples as cache_source, "
            "cross-fade the waveform (Hamming window)"
        ),
    }


def build_manifest(
    model_dir: ModelDir,
    nets: dict[str, nn.Module],
    graphs: dict,
    dtype: str,
    static_frames: int | None,
    opset: int,
    sources: dict[str, Path],
) -> dict:
    """``sources``: the checkpoints exported (file name -> path), fingerprinted so that the
    graphs are never used with other weights."""
    version = spec(model_dir.version)
    manifest = {
        "format": FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "opset": opset,
        "operator_domains": ["ai.onnx"],
        "dtype": dtype,
        "io_dtype": "float32 tensors and int64 token ids"
        + (" (weights and compute in float16 inside)" if dtype == "float16" else ""),
        "model": {
            "name": model_dir.name,
            "version": version.version,
            "variant": model_dir.variant,
            "sample_rate": model_dir.config.sample_rate,
            "token_frame_rate": model_dir.config.token_frame_rate,
            "mel_bins": 80,
            "checkpoints": {name: file_fingerprint(path) for name, path in sources.items()},
        },
        "static_frames": static_frames,
        "graphs": graphs,
        "chain": CHAIN,
        "streaming": _streaming(version),
        "docs": "docs/EXPORT.md in cosyvoice-lite",
    }
    if "llm" in nets:
        manifest["llm"] = _llm_section(nets["llm"], version, model_dir.config.sampling)
    if "flow" in nets:
        manifest["flow"] = _flow_section(nets["flow"], version)
    if "hift" in nets:
        manifest["hift"] = _hift_section(nets["hift"], version)
    return manifest
