"""Golden data for the v1 flow (U-Net estimator, CFM solvers, MaskedDiffWithXvec).

Runs the OFFICIAL CosyVoice code on tiny, randomly initialised modules and writes their
state_dicts, inputs and outputs to tests/data/golden/v1_flow/. Run it in the reference
environment, e.g.

    PYTHONPATH=/tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS \\
        /tmp/refenv/bin/python tools/golden/v1_flow.py

Files written (all float32 except token ids):
  estimator.npz         ConditionalDecoder: `state.*`, inputs x/mask/mu/t/spks/cond, `out`
  causal_estimator.npz  CausalConditionalDecoder: `state.*`, inputs, `out_full`, `out_stream`,
                        CausalConditionalCFM outputs `cfm_*` and the head of `rand_noise`
  flow.npz              MaskedDiffWithXvec state without `decoder.estimator.*` (the estimator
                        weights are those of estimator.npz)
  flow_cases.npz        inference inputs/outputs per case, keys `<case>.<name>`
  config.json           constructor kwargs of every module
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from cosyvoice.flow.decoder import CausalConditionalDecoder, ConditionalDecoder
from cosyvoice.flow.flow import MaskedDiffWithXvec
from cosyvoice.flow.flow_matching import CausalConditionalCFM, ConditionalCFM
from cosyvoice.flow.length_regulator import InterpolateRegulator
from cosyvoice.transformer.encoder import ConformerEncoder
from omegaconf import DictConfig

OUT_DIR = Path(__file__).resolve().parents[2] / "tests" / "data" / "golden" / "v1_flow"

CFM_PARAMS = {
    "sigma_min": 1e-06,
    "solver": "euler",
    "t_scheduler": "cosine",
    "training_cfg_rate": 0.2,
    "inference_cfg_rate": 0.7,
    "reg_loss_type": "l1",
}
ESTIMATOR = {
    "in_channels": 320,
    "out_channels": 80,
    "channels": [16, 16],
    "dropout": 0.0,
    "attention_head_dim": 8,
    "n_blocks": 1,
    "num_mid_blocks": 1,
    "num_heads": 2,
    "act_fn": "gelu",
}
CAUSAL_ESTIMATOR = {
    "in_channels": 320,
    "out_channels": 80,
    "channels": [16],
    "dropout": 0.0,
    "attention_head_dim": 8,
    "n_blocks": 1,
    "num_mid_blocks": 1,
    "num_heads": 2,
    "act_fn": "gelu",
    "static_chunk_size": 8,
    "num_decoding_left_chunks": -1,
}
ENCODER = {
    "input_size": 32,
    "output_size": 32,
    "attention_heads": 2,
    "linear_units": 64,
    "num_blocks": 2,
    "dropout_rate": 0.1,
    "positional_dropout_rate": 0.1,
    "attention_dropout_rate": 0.1,
    "normalize_before": True,
    "input_layer": "linear",
    "pos_enc_layer_type": "rel_pos_espnet",
    "selfattention_layer_type": "rel_selfattn",
    "use_cnn_module": False,
    "macaron_style": False,
}
LENGTH_REGULATOR = {"channels": 80, "sampling_ratios": [1, 1, 1, 1]}
CFM = {"in_channels": 240, "n_spks": 1, "spk_emb_dim": 80, "cfm_params": CFM_PARAMS}
FLOW = {
    "input_size": 32,
    "output_size": 80,
    "spk_embed_dim": 192,
    "output_type": "mel",
    "vocab_size": 64,
    "input_frame_rate": 50,
    "only_mask_loss": True,
}


def randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Perturb every parameter so that biases and norm affines are not trivially 0/1."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.mul_(0.8).add_(0.02 * torch.randn(p.shape, generator=generator))


def state_arrays(module: torch.nn.Module, skip_prefix: str | None = None) -> dict[str, np.ndarray]:
    return {
        f"state.{k}": v.detach().cpu().numpy()
        for k, v in module.state_dict().items()
        if skip_prefix is None or not k.startswith(skip_prefix)
    }


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def estimator_inputs(generator: torch.Generator, length: int) -> dict[str, torch.Tensor]:
    mask = torch.ones(2, 1, length)
    mask[1, :, length - 7 :] = 0  # padded second row
    return {
        "x": torch.randn(2, 80, length, generator=generator),
        "mask": mask,
        "mu": torch.randn(2, 80, length, generator=generator),
        "t": torch.rand(2, generator=generator),
        "spks": torch.randn(2, 80, generator=generator),
        "cond": torch.randn(2, 80, length, generator=generator),
    }


def run_estimator(out_dir: Path, generator: torch.Generator) -> ConditionalDecoder:
    estimator = ConditionalDecoder(**ESTIMATOR)
    randomize(estimator, generator)
    estimator.eval()
    inputs = estimator_inputs(generator, 37)  # odd length: exercises the down/up-sample trim
    with torch.inference_mode():
        out = estimator(**inputs)
    arrays = {**state_arrays(estimator), **{k: f32(v) for k, v in inputs.items()}, "out": f32(out)}
    np.savez(out_dir / "estimator.npz", **arrays)
    return estimator


def run_causal(out_dir: Path, generator: torch.Generator) -> None:
    estimator = CausalConditionalDecoder(**CAUSAL_ESTIMATOR)
    randomize(estimator, generator)
    estimator.eval()
    inputs = estimator_inputs(generator, 37)
    with torch.inference_mode():
        out_full = estimator(**inputs, streaming=False)
        out_stream = estimator(**inputs, streaming=True)
    arrays = {
        **state_arrays(estimator),
        **{k: f32(v) for k, v in inputs.items()},
        "out_full": f32(out_full),
        "out_stream": f32(out_stream),
    }

    # The CFM constructor reseeds the global RNG; our weights are already drawn.
    cfm = CausalConditionalCFM(
        in_channels=CFM["in_channels"],
        cfm_params=DictConfig(CFM_PARAMS),
        n_spks=1,
        spk_emb_dim=80,
        estimator=estimator,
    )
    cfm.eval()
    cfm_gen = torch.Generator().manual_seed(77)
    length = 29
    mu = torch.randn(1, 80, length, generator=cfm_gen)
    spks = torch.randn(1, 80, generator=cfm_gen)
    cond = torch.zeros(1, 80, length)
    cond[:, :, :9] = torch.randn(1, 80, 9, generator=cfm_gen)
    mask = torch.ones(1, 1, length)
    with torch.inference_mode():
        cfm_full, _ = cfm(mu.clone(), mask, 10, spks=spks, cond=cond, streaming=False)
        cfm_stream, _ = cfm(mu.clone(), mask, 10, spks=spks, cond=cond, streaming=True)
    arrays.update(
        {
            "cfm_mu": f32(mu),
            "cfm_spks": f32(spks),
            "cfm_cond": f32(cond),
            "cfm_mask": f32(mask),
            "cfm_full": f32(cfm_full),
            "cfm_stream": f32(cfm_stream),
            "rand_noise_head": f32(cfm.rand_noise[:, :, :64]),
        }
    )
    np.savez(out_dir / "causal_estimator.npz", **arrays)


def build_flow(estimator: ConditionalDecoder, generator: torch.Generator) -> MaskedDiffWithXvec:
    encoder = ConformerEncoder(**ENCODER)
    length_regulator = InterpolateRegulator(**LENGTH_REGULATOR)
    decoder = ConditionalCFM(
        in_channels=CFM["in_channels"],
        cfm_params=DictConfig(CFM_PARAMS),
        n_spks=1,
        spk_emb_dim=80,
        estimator=estimator,
    )
    flow = MaskedDiffWithXvec(
        **FLOW,
        encoder=encoder,
        length_regulator=length_regulator,
        decoder=decoder,
    )
    # Randomize everything except the estimator, whose weights are already stored.
    for name, child in flow.named_children():
        if name != "decoder":
            randomize(child, generator)
    flow.eval()
    return flow


def run_flow(out_dir: Path, estimator: ConditionalDecoder, generator: torch.Generator) -> None:
    flow = build_flow(estimator, generator)
    np.savez(out_dir / "flow.npz", **state_arrays(flow, skip_prefix="decoder.estimator."))

    vocab = FLOW["vocab_size"]
    prompt_token = torch.randint(0, vocab, (1, 10), generator=generator, dtype=torch.int32)
    prompt_feat = torch.randn(1, 17, 80, generator=generator)
    embedding = torch.randn(1, 192, generator=generator)
    no_prompt_token = torch.zeros(1, 0, dtype=torch.int32)
    no_prompt_feat = torch.zeros(1, 0, 80)

    cases = {}

    def infer(
        name: str,
        n_tokens: int,
        with_prompt: bool,
        seed: int,
        cache: torch.Tensor | None = None,
        token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if token is None:
            token = torch.randint(0, vocab, (1, n_tokens), generator=generator, dtype=torch.int32)
        p_token = prompt_token if with_prompt else no_prompt_token
        p_feat = prompt_feat if with_prompt else no_prompt_feat
        in_cache = torch.zeros(1, 80, 0, 2) if cache is None else cache
        torch.manual_seed(seed)  # the official flow draws randn_like(mu) from the global RNG
        with torch.inference_mode():
            mel, new_cache = flow.inference(
                token=token,
                token_len=torch.tensor([token.shape[1]], dtype=torch.int32),
                prompt_token=p_token,
                prompt_token_len=torch.tensor([p_token.shape[1]], dtype=torch.int32),
                prompt_feat=p_feat,
                prompt_feat_len=torch.tensor([p_feat.shape[1]], dtype=torch.int32),
                embedding=embedding,
                flow_cache=in_cache.clone(),
            )
        cases.update(
            {
                f"{name}.token": token.numpy(),
                f"{name}.prompt_token": p_token.numpy(),
                f"{name}.prompt_feat": f32(p_feat),
                f"{name}.embedding": f32(embedding),
                f"{name}.cache_in": f32(in_cache),
                f"{name}.seed": np.array(seed, dtype=np.int64),
                f"{name}.mel": f32(mel),
                f"{name}.cache_out": f32(new_cache),
            }
        )
        return new_cache

    infer("short_noprompt", 15, with_prompt=False, seed=1)
    infer("long_noprompt", 45, with_prompt=False, seed=2)
    infer("short_prompt", 30, with_prompt=True, seed=3)
    infer("long_prompt", 50, with_prompt=True, seed=4)
    # Streaming as in the official CosyVoiceModel: the next chunk starts with the last 20 tokens
    # of the previous one, and takes the noise/mu of the prompt and of those 20 tokens (34
    # frames) from the previous chunk's cache.
    first_tokens = torch.randint(0, vocab, (1, 45), generator=generator, dtype=torch.int32)
    more_tokens = torch.randint(0, vocab, (1, 30), generator=generator, dtype=torch.int32)
    cache = infer("stream_first", 45, with_prompt=True, seed=5, token=first_tokens)
    infer(
        "stream_second",
        50,
        with_prompt=True,
        seed=6,
        cache=cache,
        token=torch.cat([first_tokens[:, -20:], more_tokens], dim=1),
    )
    np.savez(out_dir / "flow_cases.npz", **cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1234)
    generator = torch.Generator().manual_seed(2024)
    estimator = run_estimator(args.out, generator)
    run_causal(args.out, generator)
    run_flow(args.out, estimator, generator)
    config = {
        "estimator": ESTIMATOR,
        "causal_estimator": CAUSAL_ESTIMATOR,
        "encoder": ENCODER,
        "length_regulator": LENGTH_REGULATOR,
        "cfm": CFM,
        "flow": FLOW,
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in sorted(args.out.iterdir()):
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
