"""Accuracy cost of each precision against float32, on one model directory (tiny or full size).

    python benchmarks/precision_accuracy.py tests/data/models/v2-tiny
    flock /tmp/heavy.lock python benchmarks/precision_accuracy.py /tmp/models-full/v2 --tokens 100

For every precision (bfloat16, float16 weights; int8: int8 LLM linear layers and the flow's declared
int8 products, float32 elsewhere; int8-bf16: the same with bfloat16 elsewhere, the fastest CPU
setting) it prints:
  LLM    teacher-forced log-probabilities of the float32-sampled tokens: max and mean absolute
         error, and how often the most likely token is the same;
         sampled tokens with the same seed: the share equal to float32 and the first position
         that differs (after one differs, the rest follow a different history);
  flow   relative L2 error and max abs error of the mel for the same tokens (non-streaming);
  stream (CosyVoice2/3) relative L2 error of the mel of the same tokens streamed incrementally
         (official chunk schedule), with the stream caches in the dtype the engine keeps them in
         for that precision (precision.stream_cache_dtype: float16 for int8 over float32); and,
         to isolate that rounding, float32 weights with float16 caches against float32 caches;
  hift   relative L2 error and max abs error of the waveform for the same float32 mel.
With random weights these bound the numeric error only; what it means for quality can only be
judged with real weights.

``--device cuda`` (a lent GPU) runs the precisions on that device against the same CPU float32
reference, float32 included: every draw (tokens, v1 flow noise, vocoder noise) comes from CPU
generators, so a difference is the device's arithmetic, not its random numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the package from this checkout where it is not installed (the lent GPU's run, benchmarks/README.md)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from cosyvoice_lite.decoding import LengthPolicy, run_alone, speech_token_task  # noqa: E402
from cosyvoice_lite.device import configure_backend, resolve_placement  # noqa: E402
from cosyvoice_lite.modeldir import ModelDir, open_model_dir  # noqa: E402
from cosyvoice_lite.pipelines.factory import load_network  # noqa: E402
from cosyvoice_lite.precision import stream_cache_dtype  # noqa: E402
from cosyvoice_lite.sampling import RasSampler  # noqa: E402

PRECISIONS = {  # name -> (dtype, quantize)
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "float16": ("float16", None),
    "int8": ("float32", "int8"),
    "int8-bf16": ("bfloat16", "int8"),
}
SEED = 1234


def llm_inputs(model: ModelDir, prompt_tokens: int = 30) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    ids = lambda n, high: torch.randint(0, high, (1, n), generator=g, dtype=torch.int32)  # noqa: E731
    prompt_text = ids(10, 1000)
    if model.version == 3:  # CosyVoice3 needs <|endofprompt|> in its input
        prompt_text = torch.cat([prompt_text, torch.tensor([[151646]], dtype=torch.int32)], dim=1)
    return {
        "text": ids(20, 1000),
        "prompt_text": prompt_text,
        "prompt_speech_token": ids(prompt_tokens, 4000),
        "embedding": torch.randn(1, 192, generator=g),
    }


def on(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def sample_tokens(model: ModelDir, lm, inputs: dict, n_tokens: int) -> list[int]:
    sampler = RasSampler(torch.Generator().manual_seed(SEED), **vars(model.config.sampling))
    task = speech_token_task(
        lm, *inputs.values(), sampler, LengthPolicy(max_tokens=n_tokens, ignore_eos=True)
    )
    return list(run_alone(lm, task))


def teacher_forced(model: ModelDir, lm, inputs: dict, tokens: list[int]) -> torch.Tensor:
    """Log-probabilities [T, V] each of ``tokens`` was drawn from, given the ones before."""
    speech = torch.tensor([tokens], dtype=torch.int32, device=inputs["text"].device)
    with torch.inference_mode():
        if model.version == 1:
            return lm.teacher_forced_logits(*inputs.values(), speech).float().cpu()
        logits = lm.teacher_forced_logits(
            inputs["text"], inputs["prompt_text"], inputs["prompt_speech_token"], speech
        )
        return logits[-len(tokens) - 1 : -1].float().log_softmax(dim=-1).cpu()


def run_flow(model: ModelDir, flow, inputs: dict, tokens: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    prompt = inputs["prompt_speech_token"]
    frames = int(prompt.shape[1] / 50 * 22050 / 256) if model.version == 1 else 2 * prompt.shape[1]
    device = prompt.device
    feat = (torch.randn(1, frames, 80, generator=g) * 2 - 6).to(device)
    token = torch.tensor([tokens], dtype=torch.int32, device=device)
    length = lambda x: torch.tensor([x.shape[1]], dtype=torch.int32, device=device)  # noqa: E731
    args = (token, length(token), prompt, length(prompt), feat, length(feat), inputs["embedding"])
    with torch.inference_mode():
        if model.version == 1:
            return flow.inference(*args, None, torch.Generator().manual_seed(SEED))[0].float().cpu()
        return flow.inference(*args, streaming=False, finalize=True)[0].float().cpu()


def run_stream(
    model: ModelDir, flow, inputs: dict, tokens: list[int], cache_dtype: torch.dtype | None
) -> torch.Tensor | None:
    """The mel of ``tokens`` streamed incrementally (first hop 25 tokens + 3 look-ahead, then 50
    per call, the rest final), with the prompt of ``run_flow``; None for CosyVoice-300M."""
    if model.version == 1:
        return None
    g = torch.Generator().manual_seed(SEED)
    prompt = inputs["prompt_speech_token"]
    feat = (torch.randn(1, 2 * prompt.shape[1], 80, generator=g) * 2 - 6).to(prompt.device)
    token = torch.tensor([tokens], dtype=torch.int32, device=prompt.device)
    with torch.inference_mode():
        state = flow.new_stream(prompt, feat, inputs["embedding"], cache_dtype=cache_dtype)
        mels, start = [], 0
        for end in (28, *range(78, token.shape[1], 50)):
            if end < token.shape[1]:
                mels.append(flow.stream_step(state, token[:, start:end]))
                start = end
        mels.append(flow.stream_step(state, token[:, start:], finalize=True))
    return torch.cat(mels, dim=2).float().cpu()


def run_hift(model: ModelDir, hift, mel: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The waveform of the float32 mel ``mel`` (on the CPU), the vocoder's input in its dtype."""
    mel = mel.to(device, next(hift.parameters()).dtype)
    with torch.inference_mode():
        if model.version == 3:
            return hift.inference(mel)[0].float().cpu()
        return hift.inference(mel, None, torch.Generator().manual_seed(SEED))[0].float().cpu()


def relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm())


def measure(path: Path, n_tokens: int, names: list[str], device: str = "cpu") -> list[dict]:
    """The errors of each precision in ``names`` on ``device`` against float32 on the CPU."""
    model = open_model_dir(path)
    rows, ref = [], {}
    candidates = [("cpu", "float32")]  # the reference first
    candidates += [(device, n) for n in names if (device, n) != ("cpu", "float32")]
    for index, (where, name) in enumerate(candidates):
        placement = resolve_placement(where, *PRECISIONS[name])
        configure_backend(placement, fresh=True)  # TF32 off in float32 on CUDA, as an engine
        inputs = on(llm_inputs(model), placement.device)
        lm = load_network(model, "llm", "llm.pt", placement)
        tokens = sample_tokens(model, lm, inputs, n_tokens)
        if index == 0:
            ref["tokens"] = tokens
        logp = teacher_forced(model, lm, inputs, ref["tokens"])
        del lm
        flow = load_network(model, "flow", "flow.pt", placement)
        mel = run_flow(model, flow, inputs, ref["tokens"])
        streamed = run_stream(model, flow, inputs, ref["tokens"], stream_cache_dtype(placement))
        if index == 0 and streamed is not None:
            half = run_stream(model, flow, inputs, ref["tokens"], torch.float16)
            ref["half_cache_rel"] = relative(half, streamed)
        del flow
        hift = load_network(model, "hift", "hift.pt", placement)
        wav = run_hift(model, hift, ref.get("mel", mel), placement.device)
        del hift
        if index == 0:
            ref.update(logp=logp, mel=mel, wav=wav, streamed=streamed)
            continue
        same = [a == b for a, b in zip(tokens, ref["tokens"], strict=True)]
        err = (logp - ref["logp"]).abs()
        rows.append(
            {
                "precision": name if where == "cpu" else f"{name} on {where}",
                "logp_max": float(err.max()),
                "logp_mean": float(err.mean()),
                "top1": float((logp.argmax(-1) == ref["logp"].argmax(-1)).float().mean()),
                "tokens_same": sum(same) / len(same),
                "first_diff": same.index(False) if False in same else len(same),
                "mel_rel": relative(mel, ref["mel"]),
                "mel_max": float((mel - ref["mel"]).abs().max()),
                "wav_rel": relative(wav, ref["wav"]),
                "wav_max": float((wav - ref["wav"]).abs().max()),
                "stream_rel": None if streamed is None else relative(streamed, ref["streamed"]),
            }
        )
    if "half_cache_rel" in ref:
        rows.append(
            {"precision": "float32, float16 stream caches", "stream_rel": ref["half_cache_rel"]}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="model directory (tests/data/models/v2-tiny, ...)")
    parser.add_argument("--tokens", type=int, default=50, help="speech tokens to sample")
    parser.add_argument("--precisions", default="bfloat16,float16,int8")
    parser.add_argument("--device", default="cpu", help="where the precisions run (cuda: a GPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows = measure(args.model, args.tokens, args.precisions.split(","), args.device)
    print(f"{args.model} ({args.tokens} tokens, seed {SEED}); errors against float32 on the CPU")
    print(
        "| precision | LLM logp max / mean abs err | top-1 same | sampled tokens same "
        "(first diff) | flow mel rel / max abs | hift wav rel / max abs | streamed mel rel |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        # .2e: a float16 cache's ~3e-6 showed as 0.00000
        stream = "-" if r["stream_rel"] is None else f"{r['stream_rel']:.2e}"
        if "logp_max" not in r:
            print(f"| {r['precision']} | - | - | - | - | - | {stream} |")
            continue
        print(
            f"| {r['precision']} | {r['logp_max']:.4f} / {r['logp_mean']:.5f} | {r['top1']:.1%} "
            f"| {r['tokens_same']:.1%} ({r['first_diff']}) | {r['mel_rel']:.4f} / "
            f"{r['mel_max']:.4f} | {r['wav_rel']:.4f} / {r['wav_max']:.4f} | {stream} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
