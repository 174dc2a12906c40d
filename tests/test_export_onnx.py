"""ONNX export (issue 13): every graph run in onnxruntime against the torch networks, the
onnxruntime backend, the CLI's errors and the float16 report. One export per model version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cosyvoice_lite.cli import main
from cosyvoice_lite.export.onnx_export import (
    OPSET,
    ExportError,
    check_options,
    export_onnx,
    load_networks,
)
from cosyvoice_lite.export.runtime import OrtVocoder, session, use_onnxruntime
from cosyvoice_lite.export.vocoder import draw_source_noise
from cosyvoice_lite.networks.flow_matching import time_span

MODELS = Path(__file__).parent / "data" / "models"
TOL = 1e-4
STATIC = 48
VERSIONS = (1, 2, 3)
_EXPORTS: dict[int, Path] = {}


@pytest.fixture(scope="session")
def export_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


def exported(version: int, root: Path) -> Path:
    """The export of the tiny model (once per session); v3 goes through the CLI."""
    if version not in _EXPORTS:
        out = root / f"v{version}"
        if version == 3:
            argv = ["export", "onnx", "--model", str(MODELS / "v3-tiny"), "-o", str(out),
                    "--static-frames", str(STATIC)]  # fmt: skip
            assert main(argv) == 0
        else:
            export_onnx(MODELS / f"v{version}-tiny", out, static_frames=STATIC)
        _EXPORTS[version] = out
    return _EXPORTS[version]


def networks(version: int) -> dict:
    return load_networks(MODELS / f"v{version}-tiny")[1]


def run(path: Path, **feeds: torch.Tensor) -> list[np.ndarray]:
    return session(path, threads=1).run(None, {k: v.numpy() for k, v in feeds.items()})


def ints(generator: torch.Generator, *shape: int, high: int = 100) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=generator)


# ------------------------------------------------------------------------------------ manifest


@pytest.mark.parametrize("version", VERSIONS)
def test_manifest_lists_standard_graphs_with_their_parity(version, export_root):
    out = exported(version, export_root)
    manifest = json.loads((out / "manifest.json").read_text())
    expected = {"llm_prefill", "llm_decode", "flow_encoder", "flow_estimator",
                "flow_estimator_static", "hift"}  # fmt: skip
    if version > 1:
        expected |= {"flow_encoder_chunk", "flow_estimator_chunk"}
    if version == 3:
        expected.add("hift_chunk")
    assert set(manifest["graphs"]) == expected
    assert manifest["opset"] == OPSET and manifest["model"]["version"] == version
    for name, entry in manifest["graphs"].items():
        model = onnx.load(str(out / entry["file"]))
        onnx.checker.check_model(model)
        assert {(o.domain or "ai.onnx", o.version) for o in model.opset_import} == {
            ("ai.onnx", OPSET)
        }
        assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
        assert [i["name"] for i in entry["inputs"]] == [i.name for i in model.graph.input]
        assert entry["check"]["finite"]
        # the v3 vocoder: see test_vocoder_v3_graph_matches_torch_vocoder
        limit = 1e-3 if (version == 3 and name.startswith("hift")) else TOL
        assert entry["check"]["max_abs_error"] < limit, (name, entry["check"])
    static = {i["name"]: i["shape"] for i in manifest["graphs"]["flow_estimator_static"]["inputs"]}
    assert static["x"] == [2, 80, STATIC]
    dynamic = {i["name"]: i["shape"] for i in manifest["graphs"]["flow_estimator"]["inputs"]}
    assert dynamic["x"] == [2, 80, "frames"]


# ------------------------------------------------------------------------------------ LLM


@pytest.mark.parametrize("version", VERSIONS)
def test_llm_prefill_and_decode_match_teacher_forced_logits(version, export_root):
    out = exported(version, export_root)
    lm = networks(version)["llm"]
    g = torch.Generator().manual_seed(version)
    prefill, decode = session(out / "llm_prefill.onnx", 1), session(out / "llm_decode.onnx", 1)
    caches = ["keys", "values", "positions"] if version == 1 else ["keys", "values"]
    for n_prompt_speech, speakers in ((0, 1), (7, 0 if version == 1 else 1)):
        text = ints(g, 1, 11, high=1000)
        if version == 3:
            text[0, 3] = lm.END_OF_PROMPT_ID
        speech_prompt = ints(g, 1, n_prompt_speech)
        speech = ints(g, 1, 5)
        embedding = torch.randn(speakers, 192, generator=g)
        with torch.inference_mode():
            if version == 1:
                want = lm.teacher_forced_logits(
                    text[:, 4:], text[:, :4], speech_prompt, embedding, speech
                )
            else:
                logits = lm.teacher_forced_logits(
                    text[0, 4:], text[0, :4], speech_prompt[0], speech[0]
                )
                want = logits.log_softmax(-1)[-speech.shape[1] - 1 :]
        feeds = {"text": text, "prompt_speech_token": speech_prompt}
        if version == 1:
            feeds["embedding"] = embedding
        logp, *cache = prefill.run(None, {k: v.numpy() for k, v in feeds.items()})
        errors = [np.abs(logp[0] - want[0].numpy()).max()]
        for step, token in enumerate(speech[0, :-1].tolist(), start=1):
            past = {f"past_{c}": x for c, x in zip(caches, cache, strict=True)}
            logp, *cache = decode.run(None, {"token": np.array([[token]]), **past})
            errors.append(np.abs(logp[0] - want[step].numpy()).max())
        assert max(errors) < TOL, errors
        assert cache[0].shape[2] == 1 + speakers * (version == 1) + 11 + 1 + n_prompt_speech + 4


# ------------------------------------------------------------------------------------ flow


def _flow_inputs(version: int, flow, g: torch.Generator, n_prompt: int, n_tokens: int):
    frames = int(n_prompt / flow.input_frame_rate * 22050 / 256) if version == 1 else 2 * n_prompt
    return (ints(g, 1, n_prompt), ints(g, 1, n_tokens), torch.randn(1, frames, 80, generator=g),
            torch.randn(1, 192, generator=g))  # fmt: skip


@pytest.mark.parametrize(
    "version, chunk", [(1, False), (2, False), (2, True), (3, False), (3, True)]
)
def test_flow_graphs_chained_match_flow_inference(version, chunk, export_root):
    """flow_encoder -> host Euler loop over flow_estimator (onnxruntime) == flow.inference."""
    out = exported(version, export_root)
    nets = networks(version)
    flow = nets["flow"]
    ort_flow = use_onnxruntime(networks(version), out, stages=("flow",))["flow"]
    g = torch.Generator().manual_seed(10 + version)
    for n_prompt, n_tokens in ((0, 9), (6, 47)):  # v1: > 40 new tokens resample in three parts
        prompt_token, token, prompt_feat, embedding = _flow_inputs(
            version, flow, g, n_prompt, n_tokens
        )
        lengths = [torch.tensor([t.shape[1]]) for t in (token, prompt_token, prompt_feat)]
        args = (token, lengths[0], prompt_token, lengths[1], prompt_feat, lengths[2], embedding)
        seed = 100 + n_tokens
        with torch.inference_mode():
            if version == 1:
                want, _ = flow.inference(*args, None, torch.Generator().manual_seed(seed))
            else:
                want, _ = flow.inference(*args, streaming=chunk, finalize=not chunk)
        encoder = out / ("flow_encoder_chunk.onnx" if chunk else "flow_encoder.onnx")
        mu, cond, spks = (torch.from_numpy(a) for a in run(
            encoder, prompt_token=prompt_token, token=token, prompt_feat=prompt_feat,
            embedding=embedding))  # fmt: skip
        cfm = ort_flow.decoder
        if version == 1:
            noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed))
        else:
            noise = cfm.rand_noise[:, :, : mu.shape[2]]
        with torch.inference_mode():
            mel = cfm.solve_euler(
                noise,
                time_span(cfm.steps, cfm.t_scheduler, mu),
                mu,
                torch.ones(1, 1, mu.shape[2]),
                spks,
                cond,
                streaming=chunk,
            )
        mel = mel[:, :, prompt_feat.shape[1] :]
        assert mel.shape == want.shape
        assert (mel - want).abs().max().item() < TOL


@pytest.mark.parametrize("version", VERSIONS)
def test_static_estimator_has_fixed_shapes(version, export_root):
    out = exported(version, export_root)
    estimator = networks(version)["flow"].decoder.estimator
    g = torch.Generator().manual_seed(5)
    names = ["x", "mask", "mu", "t", "spks", "cond"]

    def inputs(n: int):
        return (torch.randn(2, 80, n, generator=g), torch.ones(2, 1, n),
                torch.randn(2, 80, n, generator=g), torch.rand(2, generator=g),
                torch.randn(2, 80, generator=g), torch.randn(2, 80, n, generator=g))  # fmt: skip

    feeds = inputs(STATIC)
    with torch.inference_mode():
        want = estimator(*feeds)
    (got,) = run(out / "flow_estimator_static.onnx", **dict(zip(names, feeds, strict=True)))
    assert np.abs(got - want.numpy()).max() < TOL
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        run(out / "flow_estimator_static.onnx", **dict(zip(names, inputs(STATIC + 2), strict=True)))
    if version > 1:  # causal estimators: zero padding with mask 0 leaves the real frames alone
        real = inputs(STATIC - 11)
        with torch.inference_mode():
            want = estimator(*real)
        pad = [torch.nn.functional.pad(a, (0, 11)) if a.dim() == 3 else a for a in real]
        (got,) = run(out / "flow_estimator_static.onnx", **dict(zip(names, pad, strict=True)))
        assert np.abs(got[:, :, : STATIC - 11] - want.numpy()).max() < TOL


# ------------------------------------------------------------------------------------ vocoder


def test_vocoder_v3_graph_matches_torch_vocoder(export_root):
    """Within 1e-4, or within the torch network's own float32 noise floor where that is higher:
    the random tiny vocoder amplifies last-bit differences of its source STFT about 3000-fold
    (features reach ~150 before the iSTFT), so a one-ulp change of the source moves torch's own
    output by up to ~1e-4."""
    out = exported(3, export_root)
    hift = networks(3)["hift"]
    ort_hift = use_onnxruntime(networks(3), out, stages=("hift",))["hift"]
    assert isinstance(ort_hift, OrtVocoder)
    for seed in range(3):
        mel = torch.randn(1, 80, 23, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            want, source = hift.inference(mel)
            got, _ = ort_hift.inference(mel)
            nudged = source * (1 + 2.0**-23)  # one ulp
            floor = (hift.decode(mel, nudged) - hift.decode(mel, source)).abs().max().item()
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < max(TOL, 4 * floor)
        # the streaming call on a mel history (official: finalize=False)
        with torch.inference_mode():
            want, source = hift.inference(mel, finalize=False)
            look = hift.f0_predictor.look_ahead
            nudged = source * (1 + 2.0**-23)
            floor = (hift.decode(mel[:, :, :-look], nudged, finalize=False)
                     - hift.decode(mel[:, :, :-look], source, finalize=False)).abs().max().item()  # fmt: skip
        phase, noise = draw_source_noise(hift, 23)
        (got,) = run(out / "hift_chunk.onnx", mel=mel, phase=phase, noise=noise)
        assert got.shape == want.shape == (1, (23 - 8) * 480)
        assert np.abs(got - want.numpy()).max() < max(TOL, 4 * floor)


@pytest.mark.parametrize("version", (1, 2))
def test_vocoder_v1_v2_parity_by_part(version, export_root):
    """The v1/v2 source integrates phase over thousands of samples (v2 at frame rate, times
    2 pi x 480 before the sine), so a one-ulp difference in f0 (float32 convolutions summed in
    another order) moves samples by 1e-4 (v1) to 1e-3 (v2) on the random tiny weights. Each part
    is exact on its own: the source (same noise draws as torch), and the waveform given the
    source; and the backend object reproduces the torch call's draws."""
    out = exported(version, export_root)
    hift = networks(version)["hift"]
    ort_hift = use_onnxruntime(networks(version), out, stages=("hift",))["hift"]
    mel = torch.randn(1, 80, 23, generator=torch.Generator().manual_seed(1))
    cache = 0.1 * torch.randn(1, 1, 700, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want, source = hift.inference(mel, cache, torch.Generator().manual_seed(3))
        got, got_source = ort_hift.inference(mel, cache, torch.Generator().manual_seed(3))
    assert (got_source - source).abs().max().item() < TOL
    assert (got - want).abs().max().item() < 1e-2  # free running: see above
    phase, noise = draw_source_noise(hift, 23, torch.Generator().manual_seed(3))
    speech, _ = run(out / "hift.onnx", mel=mel, phase=phase, noise=noise, cache_source=source)
    assert np.abs(speech - want.numpy()).max() < TOL


# ------------------------------------------------------------------------------------ backend


def test_onnxruntime_backend_runs_the_engine_loop(export_root):
    """v3 end to end: the same engine and pipeline, estimator and vocoder through onnxruntime."""
    from cosyvoice_lite import Engine, Mode, SynthesisRequest

    out = exported(3, export_root)
    engine = Engine.load(MODELS / "v3-tiny")
    request = SynthesisRequest(Mode.ZERO_SHOT, "hello there", prompt_audio=_prompt_wav(),
                               prompt_text="a prompt", seed=7)  # fmt: skip
    want = np.concatenate([c.samples for c in engine.synthesize(request)])
    use_onnxruntime(engine.pipeline, out)
    assert isinstance(engine.pipeline.hift, OrtVocoder)
    got = np.concatenate([c.samples for c in engine.synthesize(request)])
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-3
    assert not np.array_equal(got, want)  # computed by onnxruntime, not torch


def test_onnxruntime_backend_streams(export_root):
    """A stream's incremental flow steps keep their per-stream caches, which the graphs cannot:
    they run the torch estimator the backend keeps (they once failed with "incremental streaming
    needs ..."); the voice's prompt frames go through the exported estimator, and streamed
    vocoder windows stay in torch (only whole-utterance vocoding has a graph)."""
    from cosyvoice_lite import Engine, Mode, SynthesisRequest

    out = exported(3, export_root)
    engine = Engine.load(MODELS / "v3-tiny")
    request = SynthesisRequest(Mode.ZERO_SHOT, "hello there, this streams", stream=True,
                               prompt_audio=_prompt_wav(), prompt_text="a prompt", seed=7)  # fmt: skip
    want = [c.samples for c in engine.synthesize(request)]
    use_onnxruntime(engine.pipeline, out)
    engine.pipeline.prompt_flows.clear()  # the voice's prompt frames computed again, by the backend
    got = [c.samples for c in engine.synthesize(request)]
    assert len(want) > 1 and [len(c) for c in got] == [len(c) for c in want]
    assert np.abs(np.concatenate(got) - np.concatenate(want)).max() < 1e-3
    # installed again (int8 over float32): it replaces the graphs, streams go on in torch (the
    # backend once wrapped itself and every stream failed)
    use_onnxruntime(engine.pipeline, out, int8=True)
    assert type(engine.pipeline.flow.decoder.estimator.incremental).__name__ != "OrtEstimator"
    assert not isinstance(engine.pipeline.hift.torch_vocoder, OrtVocoder)
    again = [c.samples for c in engine.synthesize(request)]
    assert [len(c) for c in again] == [len(c) for c in want]


def test_say_with_the_onnxruntime_backend(export_root, tmp_path, capsys):
    import soundfile

    out = exported(3, export_root)
    argv = ["say", "hello there", "--model", str(MODELS / "v3-tiny"), "--prompt-wav",
            str(_prompt_wav()), "--prompt-text", "a prompt", "--seed", "3"]  # fmt: skip
    assert main([*argv, "--backend", "onnxruntime", "-o", str(tmp_path / "a.wav")]) == 2
    assert "needs --onnx-dir" in capsys.readouterr().err
    v1_export = exported(1, export_root)
    wrong = [
        "--backend",
        "onnxruntime",
        "--onnx-dir",
        str(v1_export),
        "-o",
        str(tmp_path / "b.wav"),
    ]
    assert main([*argv, *wrong]) == 2
    assert "v1 export" in capsys.readouterr().err
    good = ["--backend", "onnxruntime", "--onnx-dir", str(out), "-o", str(tmp_path / "c.wav")]
    assert main([*argv, *good]) == 0
    samples, rate = soundfile.read(tmp_path / "c.wav")
    assert rate == 24000 and len(samples) > 0 and np.isfinite(samples).all()


def _prompt_wav() -> Path:
    return next((Path(__file__).parent / "data" / "audio").glob("*.wav"))


def test_int8_backend_quantises_once_and_stays_close(export_root):
    out = exported(1, export_root)
    flow = networks(1)["flow"]
    ort_flow = use_onnxruntime(networks(1), out, stages=("flow",), int8=True)["flow"]
    assert (out / "int8-matmul" / "flow_estimator.onnx").is_file()
    g = torch.Generator().manual_seed(4)
    args = (torch.randn(2, 80, 40, generator=g), torch.ones(2, 1, 40), torch.randn(2, 80, 40, generator=g),
            torch.rand(2, generator=g), torch.randn(2, 80, generator=g), torch.randn(2, 80, 40, generator=g))  # fmt: skip
    with torch.inference_mode():
        want = flow.decoder.estimator(*args)
        got = ort_flow.decoder.estimator(*args)
    relative = ((got - want).norm() / want.norm()).item()
    assert relative < 0.1


# ------------------------------------------------------------------------------------ CLI


def test_export_errors_come_before_any_work(tmp_path, capsys):
    model = str(MODELS / "v1-tiny")
    assert main(["export", "onnx", "--model", str(tmp_path), "-o", str(tmp_path / "a")]) == 2
    assert "not a CosyVoice model directory" in capsys.readouterr().err
    assert (
        main(["export", "onnx", "--model", model, "-o", str(tmp_path / "b"), "--dtype", "bfloat16"])
        == 2
    )
    assert "--dtype" in capsys.readouterr().err
    assert (
        main(
            ["export", "onnx", "--model", model, "-o", str(tmp_path / "c"), "--static-frames", "0"]
        )
        == 2
    )
    assert "--static-frames" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(["export", "onnx", "--model", model, "-o", str(existing)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (existing / "keep.txt").read_text() == "mine"
    assert main(["export", "onnx", "--model", model, "-o", "/proc/no-such-dir/x"]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not list(tmp_path.glob("*.partial"))


def test_export_never_deletes_what_it_was_not_asked_to_replace(tmp_path, capsys, monkeypatch):
    """A directory named like the staging one (<out>.partial) was deleted; --force into the
    directory holding the model deleted the model; a symbolic link with --force failed after the
    whole export; '-o .' failed; a failed export left the parents it had made."""
    import shutil

    models = tmp_path / "models"
    model = Path(shutil.copytree(MODELS / "v1-tiny", models / "v1-tiny"))
    for out in (models, model):
        argv = ["export", "onnx", "--model", str(model), "-o", str(out), "--force"]
        assert main(argv) == 2
        assert "holds the model" in capsys.readouterr().err
    assert (model / "flow.pt").is_file()
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(target)
    argv = ["export", "onnx", "--model", str(model), "-o", str(tmp_path / "link"), "--force"]
    assert main(argv) == 2 and "symbolic link" in capsys.readouterr().err
    assert (target / "keep.txt").read_text() == "mine"
    argv = ["export", "onnx", "--model", str(tmp_path), "-o", str(tmp_path / "new" / "deep")]
    assert main(argv) == 2 and not (tmp_path / "new").exists()  # (not a model: nothing made)
    mine = tmp_path / "here.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    export_onnx(model, ".", parts=("hift",))  # into the empty current directory
    assert (here / "manifest.json").is_file() and (mine / "notes.txt").read_text() == "mine"
    for holding in (".", ".."):  # replacing either would pull the directory from under us
        with pytest.raises(Exception, match="holds the current directory"):
            export_onnx(model, holding, parts=("hift",), force=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_export_is_staged_where_it_can_be_written_and_leaves_nothing_if_stopped(tmp_path):
    """An empty output (a mounted volume, whose parent may not be writable) is staged in
    itself, not beside it (checked writable, then a raw PermissionError after all the work); an
    export stopped part-way (Ctrl-C) left the parents it had made; a file on the path is an
    error before any work."""
    model = MODELS / "v1-tiny"
    volume = tmp_path / "volume"
    volume.mkdir()
    seen = []

    def look(_: str) -> None:
        seen.append(sorted(p.name.split("-")[0] for p in volume.iterdir()))
        seen.append(sorted(p.name for p in tmp_path.iterdir()))

    export_onnx(model, volume, parts=("hift",), progress=look)
    # (beside the staging, the lock that keeps a second export to the volume out)
    assert seen[0] == [".volume.export", ".volume.partial"] and seen[1] == ["volume"]
    assert (volume / "manifest.json").is_file()
    assert not [p for p in volume.iterdir() if p.name.startswith(".")]

    def interrupt(_: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, tmp_path / "new" / "deeper", parts=("hift",), progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ExportError, match="file is not a directory"):
        check_options(tmp_path / "file" / "out", "float32", None, False, ("hift",))


def test_an_export_stopped_by_sigterm_leaves_nothing(tmp_path):
    """SIGTERM (`timeout`, `docker stop`, systemd) killed the command outright: its hidden
    staging directory stayed behind (gigabytes for a real model), one more per stopped run."""
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "cosyvoice_lite", "export", "onnx", "--model",
               str(MODELS / "v1-tiny"), "-o", str(tmp_path / "new" / "deeper")]  # fmt: skip
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 120
        while not any(tmp_path.rglob("*partial*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()  # stopped while it works
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_float16_export_reports_error_and_overflow(tmp_path):
    from cosyvoice_lite.errors import ModelDirError

    manifest = json.loads(export_onnx(MODELS / "v3-tiny", tmp_path / "fp16", dtype="float16",
                                      parts=("flow",)).read_text())  # fmt: skip
    for name, entry in manifest["graphs"].items():
        assert entry["dtype"] == "float16"
        check = entry["check"]
        assert check["finite"] and 0 < check["max_abs_error"] < 0.2, (name, check)
        assert check["fp32_peak_activation"]["overflows_float16"] is False
    # the backend runs float32 graphs: a float16 export is refused, not run (its flow was off by
    # ~1), and no int8 copy is made of it (a broken one was, and kept)
    for int8 in (False, True):
        with pytest.raises(ModelDirError, match="float16 export"):
            use_onnxruntime(networks(3), tmp_path / "fp16", stages=("flow",), int8=int8)
    assert not (tmp_path / "fp16" / "int8-matmul").exists()


def _copy_export(version: int, export_root: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(exported(version, export_root), to))


def test_a_damaged_or_foreign_export_is_refused_before_the_networks_load(export_root, tmp_path):
    """A missing or truncated graph, a graph from another export, a damaged manifest, weights
    other than those exported: each a clear error before loading the networks, where they
    crashed onnxruntime after the whole load, or ran with the wrong weights."""
    from cosyvoice_lite import Engine
    from cosyvoice_lite.errors import ModelDirError

    model = MODELS / "v2-tiny"

    def load(onnx_dir: Path, model_dir: Path = model) -> None:
        Engine.load(model_dir, backend="onnxruntime", onnx_dir=onnx_dir).close()

    missing = _copy_export(2, export_root, tmp_path / "missing")
    (missing / "hift.onnx").unlink()
    truncated = _copy_export(2, export_root, tmp_path / "truncated")
    data = (truncated / "flow_estimator.onnx").read_bytes()
    (truncated / "flow_estimator.onnx").write_bytes(data[: len(data) // 2])
    swapped = _copy_export(2, export_root, tmp_path / "swapped")
    other = (exported(1, export_root) / "hift.onnx").read_bytes()
    size = (swapped / "hift.onnx").stat().st_size  # the same size, another graph's bytes
    (swapped / "hift.onnx").write_bytes((other * (size // len(other) + 1))[:size])
    listed = _copy_export(2, export_root, tmp_path / "listed")
    (listed / "manifest.json").write_text("[1, 2]")
    cases = [(missing, "hift.onnx is missing"), (truncated, "bytes"), (swapped, "not the graph"),
             (listed, "not a cosyvoice-lite export manifest")]  # fmt: skip
    for onnx_dir, message in cases:
        with pytest.raises(ModelDirError, match=message):
            load(onnx_dir)
    # a model of the same version with other weights (a fine-tune, another size)
    import shutil

    tuned = Path(shutil.copytree(model, tmp_path / "tuned"))
    state = torch.load(tuned / "flow.pt", map_location="cpu", weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()},
               tuned / "flow.pt")  # fmt: skip
    with pytest.raises(ModelDirError, match="other weights"):
        load(exported(2, export_root), tuned)
    # the same through the documented call on a loaded engine (it had been accepted)
    from cosyvoice_lite.export.runtime import check_graphs, read_manifest

    with Engine.load(tuned) as engine, pytest.raises(ModelDirError, match="other weights"):
        use_onnxruntime(engine.pipeline, exported(2, export_root))
    # an export without a graph the backend runs: refused before loading, not after
    flow_only = _copy_export(2, export_root, tmp_path / "flow-only")
    manifest = read_manifest(flow_only)
    del manifest["graphs"]["hift"]
    with pytest.raises(ModelDirError, match="no hift graph"):
        check_graphs(flow_only, manifest)
    load(exported(2, export_root))  # the export of this model loads


def test_an_int8_copy_is_made_again_for_other_graphs_copied_over_with_their_times(
    export_root, tmp_path
):
    """An export copied over a deployed one (cp -a, rsync -a keep file times) had run the
    previous model's int8 copy: it was reused whenever it was newer than its graph."""
    import shutil

    from cosyvoice_lite.export.runtime import quantized

    deployed = _copy_export(1, export_root, tmp_path / "deployed")
    first = quantized(deployed / "flow_estimator.onnx").read_bytes()
    other = exported(2, export_root)
    for graph in other.glob("flow_estimator.onnx*"):
        shutil.copy2(graph, deployed / graph.name)  # times kept: older than the int8 copy
    again = quantized(deployed / "flow_estimator.onnx").read_bytes()
    fresh = quantized(_copy_export(2, export_root, tmp_path / "fresh") / "flow_estimator.onnx")
    assert again != first and again == fresh.read_bytes()


def test_staging_left_by_a_killed_export_is_removed_once_stale(tmp_path):
    """A SIGKILLed export left a hidden .<name>.partial-<pid>-* directory: the output looked
    empty but was refused as not empty, for good. One whose process is gone and that has not
    changed for a while is removed; a recent one may be a live export's (another container)."""
    import os
    import time

    out = tmp_path / "out"
    leftover = out / ".out.partial-999999999-0123abcd"
    leftover.mkdir(parents=True)
    (leftover / "flow_estimator.onnx").write_bytes(b"half")
    with pytest.raises(ExportError, match="not empty"):  # recent: kept
        check_options(out, "float32", None, False)
    past = time.time() - 3600
    os.utime(leftover / "flow_estimator.onnx", (past, past))
    os.utime(leftover, (past, past))
    check_options(out, "float32", None, False)
    assert list(out.iterdir()) == []


def test_quantising_at_once_in_several_places_gives_one_whole_copy(export_root, tmp_path):
    """Replicas starting together quantise the same graph: each writes a copy of its own and
    moves it into place (a shared temporary name made them fail)."""
    import threading

    from cosyvoice_lite.export.runtime import quantized

    out = _copy_export(1, export_root, tmp_path / "v1")
    errors: list[BaseException] = []

    def quantise() -> None:
        try:
            quantized(out / "flow_estimator.onnx")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=quantise) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    session(out / "int8-matmul" / "flow_estimator.onnx", threads=1)  # whole
    made = sorted(p.name for p in (out / "int8-matmul").iterdir())
    assert made == ["flow_estimator.onnx", "flow_estimator.onnx.source"]  # (what it was made of)
    assert not list(out.glob("*-inferred.onnx"))


def test_missing_torch_device_points_to_the_export():
    from cosyvoice_lite.device import resolve_placement
    from cosyvoice_lite.errors import DeviceError

    with pytest.raises(DeviceError, match=r"export onnx.*EXPORT\.md"):
        resolve_placement("xpu:7")


def test_a_mistyped_manifest_is_damaged_not_a_crash(tmp_path):
    """A graph's files as a list or an entry as a string, the checkpoints as a string or a
    list: raw AttributeError / TypeError in the checks that read them."""
    from cosyvoice_lite.errors import ModelDirError
    from cosyvoice_lite.export.runtime import read_manifest

    def manifest(graph: dict | None = None, model: dict | None = None) -> dict:
        files = {"hift.onnx": {"bytes": 3, "fingerprint": "sampled-sha256:0"}}
        return {
            "format": "cosyvoice-lite-onnx",
            "graphs": {"hift": {"file": "hift.onnx", "files": files, **(graph or {})}},
            "model": {
                "version": 2,
                "checkpoints": {"hift.pt": "sampled-sha256:0"},
                **(model or {}),
            },
        }

    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest()))
    assert read_manifest(tmp_path)["model"]["version"] == 2
    path.write_text(json.dumps(manifest({"files": None}, {"checkpoints": None})))
    read_manifest(tmp_path)  # (an export made before they were recorded)
    for damage in (
        manifest({"files": ["hift.onnx"]}),
        manifest({"files": {"hift.onnx": "x"}}),
        manifest(model={"checkpoints": "flow.pt hift.pt"}),
        manifest(model={"checkpoints": ["flow.pt"]}),
    ):
        path.write_text(json.dumps(damage))
        with pytest.raises(ModelDirError, match="is damaged"):
            read_manifest(tmp_path)


def test_backend_options_are_checked_apart_from_the_export_directory(tmp_path):
    """``check_load_options`` (serve, Ray) refuses contradictory backend options without
    reading a file; the export directory is the load's (and serve's) own check."""
    from cosyvoice_lite.engine import Engine
    from cosyvoice_lite.errors import DeviceError, InvalidRequestError, ModelDirError
    from cosyvoice_lite.export.runtime import check_backend_dir

    for options, error, message in (
        (dict(backend="onnxruntime"), InvalidRequestError, "needs --onnx-dir"),
        (dict(onnx_dir=str(tmp_path)), InvalidRequestError, "only used with --backend"),
        (dict(backend="ONNX", onnx_dir=str(tmp_path)), InvalidRequestError, "unknown backend"),
        (dict(backend="onnxruntime", onnx_dir="x", dtype="bfloat16"), DeviceError, "float32"),
    ):
        with pytest.raises(error, match=message):
            Engine.check_load_options(**options)
    Engine.check_load_options(backend="onnxruntime", onnx_dir=str(tmp_path / "absent"))
    with pytest.raises(ModelDirError, match="not a readable cosyvoice-lite export manifest"):
        check_backend_dir("onnxruntime", tmp_path / "absent")
    check_backend_dir("torch", None)


# ------------------------------------------------------------------------------------ review 2


def test_long_calls_run_the_torch_estimator(export_root):
    """The graphs hold every head's T x T attention scores (onnxruntime's memory grew with the
    square of the frames: 4.95 GB against torch's 1.08 for 2,000 tokens of the tiny v3, and
    allocation errors at 4,000): past ``max_graph_frames`` the call runs the torch estimator the
    backend keeps, with the solver's fixed time conditioning (the engine's schedule releases the
    weights that compute it), and gives torch's mel."""
    from cosyvoice_lite.pipelines.factory import fix_schedule

    out = exported(3, export_root)
    flow = networks(3)["flow"]
    nets = networks(3)
    fix_schedule(nets["flow"], flow.decoder.steps)  # as Engine.load does
    cfm = use_onnxruntime(nets, out, stages=("flow",), max_graph_frames=40)["flow"].decoder
    g = torch.Generator().manual_seed(12)
    for n_tokens, by_torch in ((9, False), (31, True)):  # 18 and 62 frames
        prompt_token, token, prompt_feat, embedding = _flow_inputs(3, flow, g, 0, n_tokens)
        lengths = [torch.tensor([t.shape[1]]) for t in (token, prompt_token, prompt_feat)]
        args = (token, lengths[0], prompt_token, lengths[1], prompt_feat, lengths[2], embedding)
        with torch.inference_mode():
            want, _ = flow.inference(*args, streaming=False, finalize=True)
        mu, cond, spks = (torch.from_numpy(a) for a in run(
            out / "flow_encoder.onnx", prompt_token=prompt_token, token=token,
            prompt_feat=prompt_feat, embedding=embedding))  # fmt: skip
        solve = (cfm.rand_noise[:, :, : mu.shape[2]], time_span(cfm.steps, cfm.t_scheduler, mu),
                 mu, torch.ones(1, 1, mu.shape[2]), spks, cond)  # fmt: skip
        with torch.inference_mode():
            mel = cfm.solve_euler(*solve)
            torch_mel = flow.decoder.solve_euler(*solve)
        assert (mel - want).abs().max().item() < TOL
        # the torch layers give torch's floats; the graph's differ in the last bits
        assert torch.equal(mel, torch_mel) == by_torch


def test_static_frames_past_the_cap_are_refused_before_any_work(tmp_path):
    """--static-frames 8000 was accepted (up to 15,000) and died with std::bad_alloc after all
    the work: the export checks the graph at N frames, whose attention grows with N squared."""
    from cosyvoice_lite.export.onnx_export import MAX_STATIC_FRAMES

    assert MAX_STATIC_FRAMES <= 2000
    with pytest.raises(ExportError, match=f"between 1 and {MAX_STATIC_FRAMES}"):
        check_options(tmp_path / "s", "float32", MAX_STATIC_FRAMES + 1, False)
    check_options(tmp_path / "s", "float32", MAX_STATIC_FRAMES, False)


def _paused_export(out: Path, **options):  # noqa: ANN202
    """An export of the tiny v1 flow in a thread, paused after its first graph: (thread, go on,
    its error list)."""
    import threading

    paused, resume, errors = threading.Event(), threading.Event(), []

    def progress(_: str) -> None:
        paused.set()
        assert resume.wait(60)

    def export() -> None:
        try:
            export_onnx(MODELS / "v1-tiny", out, parts=("flow",), progress=progress, **options)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertions
            errors.append(exc)

    thread = threading.Thread(target=export)
    thread.start()
    assert paused.wait(120), errors
    return thread, resume, errors


def test_a_second_export_to_the_same_output_is_refused_up_front(tmp_path):
    """Two exports into one output without --force: the later one silently replaced the earlier
    (or, into an empty directory, wrote over it file by file). The first holds a lock for its
    whole export: the second is refused before any work, naming it; the first's staging is
    alive to everyone else however old it looks (a process id proved nothing)."""
    import os
    import time

    volume = tmp_path / "volume"
    volume.mkdir()
    for out in (tmp_path / "new", volume):
        thread, resume, errors = _paused_export(out)
        try:
            with pytest.raises(
                ExportError, match=f"being exported by another process .pid {os.getpid()}"
            ):
                export_onnx(MODELS / "v1-tiny", out, parts=("flow",), force=True)
            past = time.time() - 3600
            for path in (*tmp_path.rglob(".*partial*"), *tmp_path.rglob(".*partial*/*")):
                os.utime(path, (past, past), follow_symlinks=False)
            check_options(tmp_path / "other", "float32", None, False)  # (its leftover check)
            assert list(tmp_path.rglob(".*partial*"))
        finally:
            resume.set()
            thread.join()
        assert not errors, errors
        assert (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.rglob(".*")] == []


def test_an_export_never_replaces_an_output_that_appeared_meanwhile(tmp_path):
    """Without --force, an output that appeared while the export ran (made by hand, or by a
    process that takes no lock) was moved aside and deleted: now it stays, and the export fails
    saying so, leaving nothing of its own."""
    for staged_in_output in (False, True):
        out = tmp_path / f"out{int(staged_in_output)}"
        if staged_in_output:
            out.mkdir()
        thread, resume, errors = _paused_export(out)
        out.mkdir(exist_ok=True)
        (out / "keep.txt").write_text("mine")
        resume.set()
        thread.join()
        assert len(errors) == 1 and isinstance(errors[0], ExportError), errors
        assert "while the export ran; nothing was replaced" in str(errors[0])
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.rglob(".*")] == []


def test_staging_of_a_killed_export_running_as_pid_1_is_removed_once_stale(tmp_path):
    """In a container the export is PID 1 on every run (and our own pid is always alive): its
    staging, left by SIGKILL, was taken for a live export's and never removed, and the volume
    stayed unusable. Liveness is the export's lock: a leftover no one holds that has not
    changed for the age limit is removed, with the lock file it left."""
    import os
    import time

    out = tmp_path / "volume"
    out.mkdir()
    left = [out / f".volume.partial-{pid}-0123abcd" for pid in (1, os.getpid())]
    for leftover in left:
        leftover.mkdir()
        (leftover / "flow_estimator.onnx").write_bytes(b"half")
    (out / ".volume.export-lock").write_text("1\n")
    past = time.time() - 3600
    for path in out.rglob("*"):
        os.utime(path, (past, past))
    check_options(out, "float32", None, False)
    assert list(out.iterdir()) == []


def test_int8_work_directories_of_a_killed_process_are_removed_once_stale(export_root, tmp_path):
    """A process killed while making an int8 copy (the OOM killer: quantising is a start's
    memory peak) left its work directory in the export for good, one more per start."""
    import os
    import time

    from cosyvoice_lite.export.runtime import quantized

    out = _copy_export(1, export_root, tmp_path / "v1")
    work = out / "int8-matmul"
    stale, fresh = (work / f".flow_estimator.{pid}-0123abcd" for pid in (1, os.getpid()))
    for leftover in (stale, fresh):
        leftover.mkdir(parents=True)
        (leftover / "int8.onnx").write_bytes(b"half")
    past = time.time() - 3600
    for path in (stale / "int8.onnx", stale):
        os.utime(path, (past, past))
    made = [fresh.name, "flow_estimator.onnx", "flow_estimator.onnx.source"]
    quantized(out / "flow_estimator.onnx")
    assert sorted(p.name for p in work.iterdir()) == made  # (fresh: may not be locked yet)
    stale.mkdir()  # left while the copy is there: removed by the next start, which reuses it
    os.utime(stale, (past, past))
    quantized(out / "flow_estimator.onnx")
    assert sorted(p.name for p in work.iterdir()) == made


def test_an_int8_copy_that_cannot_be_written_says_why(export_root, tmp_path, monkeypatch):
    """A full volume while quantising read back as "protobuf DecodeError: Wire format was
    corrupt", which reads as a damaged export."""
    import shutil

    import onnxruntime.quantization
    from google.protobuf.message import DecodeError

    from cosyvoice_lite.errors import ModelDirError
    from cosyvoice_lite.export.runtime import quantized

    def cut_short(*_, **__) -> None:
        raise DecodeError("Error parsing message with type 'onnx.ModelProto'")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", cut_short)
    out = _copy_export(1, export_root, tmp_path / "v1")
    shutil.rmtree(out / "int8-matmul", ignore_errors=True)  # (another test's copy)
    with pytest.raises(ModelDirError, match=r"int8-matmul.*Is the volume full\? \d+ MB free"):
        quantized(out / "flow_estimator.onnx")
    assert sorted(p.name for p in (out / "int8-matmul").iterdir()) == []


def test_an_output_name_near_the_file_system_limit_is_exported(tmp_path):
    """A 240-character output name passed the checks, then failed after loading with Errno 36:
    the hidden staging name adds ~25 characters. Hidden names are shortened to fit; a name
    the file system cannot take at all is an error before any work."""
    long = "e" * 240
    for out in (tmp_path / "a" / long, tmp_path / "b" / long):
        if out.parent.name == "b":
            out.mkdir(parents=True)  # an empty directory: staged in it
        export_onnx(MODELS / "v1-tiny", out, parts=("flow",))
        assert (out / "manifest.json").is_file()
    with pytest.raises(ExportError, match="256 bytes long"):
        check_options(tmp_path / ("e" * 256), "float32", None, False)
    assert [p.name for p in tmp_path.rglob(".*")] == []
