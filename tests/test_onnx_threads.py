"""onnxruntime's threads: sessions with pools of their own (the default) or the process's one
shared pool (onnx_threads.share_threads, what the CLI and the server use) give the same floats,
bit for bit:
the speech tokenizer's tokens, the speaker embedding and an int8 LLM's audio. The shared pool is
a property of the process, so each way runs in a process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent / "data"

SCRIPT = """
import sys
import numpy as np
from cosyvoice_lite.device import resolve_placement
from cosyvoice_lite.onnx_threads import session_options, share_threads, shared_threads
from cosyvoice_lite.precision import int8_product_kernel

way = sys.argv[1]
if way == "shared":
    assert share_threads(2) == 2 and share_threads(3) == 2  # the first call decides
    assert not session_options(1).use_per_session_threads
else:
    assert shared_threads() is None and session_options(3).intra_op_num_threads == 3
from cosyvoice_lite import Engine, Mode, SynthesisRequest

engine = Engine.load(
    sys.argv[2], quantize="int8", capture_graphs=False, download=False,
    share_onnx_threads=way == "load",
)
if way == "own":  # not asked: the load leaves the pools per session
    assert shared_threads() is None
if way == "load":  # shared unless the flow's int8 products run on onnxruntime: CosyVoice3's
    # DiT (the U-Nets declare none) on a CPU without VNNI or AMX
    kernel = int8_product_kernel(resolve_placement("cpu", "float32", "int8"))
    own = engine.version == 3 and kernel == "onnxruntime"
    assert (shared_threads() is None) == own, (kernel, shared_threads())
voice = engine.encode_prompt(sys.argv[3], "希望你以后能够做的比我还好呦。")
request = SynthesisRequest(
    Mode.ZERO_SHOT, "今天天气很好。", seed=3, max_speech_tokens=20, ignore_eos=True
)
chunks = engine.synthesize(request, prompt=voice)
audio = np.concatenate([np.asarray(c.samples).reshape(-1) for c in chunks])
np.savez(
    sys.argv[4],
    tokens=voice.speech_tokens.numpy(),
    embedding=voice.embedding.numpy(),
    audio=audio,
)
engine.close()
"""


def _run(way: str, model: Path, out: Path) -> dict[str, np.ndarray]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, way, str(model), str(DATA / "audio/zh_16k.wav"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as saved:
        return dict(saved)


@pytest.mark.parametrize(
    ("model", "ways"),
    [
        ("v2-tiny", ("shared", "load")),  # share_threads, and Engine.load(share_onnx_threads=True)
        ("v3-tiny", ("load",)),  # its DiT's int8 products: a shared pool or not, by the CPU
    ],
)
def test_a_shared_pool_gives_the_same_floats(
    model: str, ways: tuple[str, ...], tmp_path: Path
) -> None:
    path = DATA / "models" / model
    own = _run("own", path, tmp_path / "own.npz")
    assert own["audio"].size > 0
    for way in ways:
        shared = _run(way, path, tmp_path / f"{way}.npz")
        for name in ("tokens", "embedding", "audio"):
            np.testing.assert_array_equal(own[name], shared[name], err_msg=f"{way}: {name}")


def test_flows_declare_their_int8_products_before_loading() -> None:
    """The load decides onnxruntime's pool before any session, from the flow's structure alone:
    it agrees with the loaded int8 flow (CosyVoice3's DiT has W8A8 products, the U-Nets none)."""
    from cosyvoice_lite.device import resolve_placement
    from cosyvoice_lite.modeldir import open_model_dir
    from cosyvoice_lite.pipelines.factory import flow_declares_int8_products, load_network
    from cosyvoice_lite.precision import has_int8_products

    int8 = resolve_placement("cpu", "float32", "int8")
    for name, declared in (("v1-tiny", False), ("v2-tiny", False), ("v3-tiny", True)):
        model = open_model_dir(DATA / "models" / name)
        assert flow_declares_int8_products(model) == declared, name
        assert has_int8_products(load_network(model, "flow", "flow.pt", int8)) == declared, name


def test_only_an_int8_llm_asks_for_a_shared_pool() -> None:
    """Without int8 decoding (or with another backend), or with a flow computing on onnxruntime,
    the load leaves onnxruntime's pools as they are, asked or not (safe to check in this
    process: nothing is shared)."""
    from cosyvoice_lite.device import resolve_placement
    from cosyvoice_lite.engine import _share_onnx_threads
    from cosyvoice_lite.modeldir import open_model_dir
    from cosyvoice_lite.onnx_threads import shared_threads
    from cosyvoice_lite.precision import int8_product_kernel

    float32 = resolve_placement("cpu", "float32", None)
    int8 = resolve_placement("cpu", "float32", "int8")
    v2, v3 = (open_model_dir(DATA / "models" / name) for name in ("v2-tiny", "v3-tiny"))
    assert not _share_onnx_threads(float32, "torch", v2)
    assert not _share_onnx_threads(int8, "onnxruntime", v2)
    if int8_product_kernel(int8) == "onnxruntime":  # a CPU without VNNI or AMX
        assert not _share_onnx_threads(int8, "torch", v3)  # the DiT's products there
    assert shared_threads() is None
