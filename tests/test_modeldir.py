"""Model directories: detection, validation and strict loading, with clear errors for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cosyvoice_lite.engine import Engine
from cosyvoice_lite.errors import ModelDirError, ModelDownloadError
from cosyvoice_lite.hub import DOWNLOADING_MARK, resolve_model
from cosyvoice_lite.modeldir import detect_version, open_model_dir, required_files


@pytest.fixture()
def model_copy(v1_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(v1_dir, tmp_path / "CosyVoice-300M-SFT"))


def test_official_directory_opens(v1_dir: Path) -> None:
    model = open_model_dir(v1_dir)
    assert model.version == 1
    assert model.config.sample_rate == 22050


def test_variants_are_told_apart(v1_variants: dict[str, Path]) -> None:
    assert {k: open_model_dir(p).variant for k, p in v1_variants.items()} == {
        "base": "base",
        "sft": "sft",
        "instruct": "instruct",
    }


def test_a_variant_applies_to_v1_only() -> None:
    """CosyVoice2 has one release: --variant sft on it was accepted and reported as 'sft'."""
    v2 = Path(__file__).resolve().parent / "data" / "models" / "v2-tiny"
    assert open_model_dir(v2, "base").variant == "base"
    with pytest.raises(ModelDirError, match="CosyVoice-300M releases"):
        open_model_dir(v2, "sft")


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="not a CosyVoice model directory"):
        detect_version(tmp_path)
    with pytest.raises(ModelDirError, match="does not exist"):
        detect_version(tmp_path / "nowhere")


def test_every_missing_file_is_listed_at_once(model_copy: Path) -> None:
    for name in ("flow.pt", "campplus.onnx", "speech_tokenizer_v1.onnx"):
        (model_copy / name).unlink()
    (model_copy / "hift.pt").write_bytes(b"")
    with pytest.raises(ModelDirError) as info:
        open_model_dir(model_copy)
    message = str(info.value)
    for name in (
        "flow.pt: missing",
        "campplus.onnx: missing",
        "speech_tokenizer_v1.onnx: missing",
        "hift.pt: empty",
    ):
        assert name in message
    assert "llm.pt" not in message


def test_required_files_per_version() -> None:
    assert "speech_tokenizer_v1.onnx" in required_files(1)
    assert "CosyVoice-BlankEN/vocab.json" in required_files(2)
    assert "cosyvoice3.yaml" in required_files(3)


def test_two_yamls_are_ambiguous(model_copy: Path) -> None:
    shutil.copy(model_copy / "cosyvoice.yaml", model_copy / "cosyvoice2.yaml")
    with pytest.raises(ModelDirError, match="several model yamls"):
        detect_version(model_copy)


def test_truncated_checkpoint_is_a_clear_error(model_copy: Path) -> None:
    data = (model_copy / "llm.pt").read_bytes()
    (model_copy / "llm.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelDirError, match="llm.pt"):
        Engine.load(model_copy)


def test_garbage_checkpoint_is_a_clear_error(model_copy: Path) -> None:
    (model_copy / "flow.pt").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ModelDirError, match="flow.pt"):
        Engine.load(model_copy)


def test_checkpoint_with_wrong_keys_names_them(model_copy: Path) -> None:
    state = torch.load(model_copy / "flow.pt", weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    state.pop(next(iter(state)))
    torch.save(state, model_copy / "flow.pt")
    with pytest.raises(ModelDirError, match="unexpected keys.*extra.weight"):
        Engine.load(model_copy)


def test_yaml_that_does_not_match_the_checkpoints(model_copy: Path) -> None:
    yaml_file = model_copy / "cosyvoice.yaml"
    text = yaml_file.read_text(encoding="utf-8")
    yaml_file.write_text(
        text.replace("llm_input_size: 64", "llm_input_size: 48", 1), encoding="utf-8"
    )
    with pytest.raises(ModelDirError, match="shape mismatches"):
        Engine.load(model_copy)


def test_unknown_model_name(tmp_path: Path) -> None:
    with pytest.raises(ModelDownloadError, match="neither an existing directory nor a known model"):
        resolve_model("CosyVoice-9000B")


def test_offline_download_names_the_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("COSYVOICE_LITE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: like no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ModelDownloadError) as info:
        resolve_model("CosyVoice-300M-SFT")
    message = str(info.value)
    assert str(tmp_path / "models" / "CosyVoice-300M-SFT") in message
    # both hubs were tried (ModelScope needs its package, not installed here) and are named
    assert "Hugging Face FunAudioLLM/CosyVoice-300M-SFT" in message
    assert "ModelScope iic/CosyVoice-300M-SFT" in message and "pip install modelscope" in message


def test_a_model_directory_counts_as_downloaded_only_when_whole(
    tmp_path: Path, monkeypatch
) -> None:
    """An interrupted download (some files there, no completion mark) is downloaded again
    (resumed), where it was loaded and failed on a missing file; a copy placed by hand is used."""
    monkeypatch.setenv("COSYVOICE_LITE_CACHE", str(tmp_path))
    target = tmp_path / "models" / "CosyVoice2-0.5B"
    shutil.copytree(Path(__file__).resolve().parent / "data" / "models" / "v2-tiny", target)
    assert resolve_model("CosyVoice2-0.5B", download=False) == target
    (target / "flow.pt").unlink()  # as a download cut short would leave it
    with pytest.raises(ModelDownloadError, match="downloading is disabled"):
        resolve_model("CosyVoice2-0.5B", download=False)
    # a download cut short while only optional files (spk2info.pt, llm.rl.pt) were left, or one
    # another process is still making, is not whole either: it was taken as a copy by hand and
    # never resumed (an SFT model without its voices)
    shutil.copy(Path(__file__).resolve().parent / "data" / "models" / "v2-tiny" / "flow.pt", target)
    (target / DOWNLOADING_MARK).touch()
    with pytest.raises(ModelDownloadError, match="downloading is disabled"):
        resolve_model("CosyVoice2-0.5B", download=False)
    (target / DOWNLOADING_MARK).unlink()
    unfinished = target / ".cache" / "huggingface" / "download"
    unfinished.mkdir(parents=True)
    (unfinished / "spk2info.pt.1a2b.incomplete").touch()
    with pytest.raises(ModelDownloadError, match="downloading is disabled"):
        resolve_model("CosyVoice2-0.5B", download=False)
    (unfinished / "spk2info.pt.1a2b.incomplete").unlink()
    assert resolve_model("CosyVoice2-0.5B", download=False) == target  # a whole copy


def test_a_hubs_leftovers_do_not_undo_a_whole_download(tmp_path: Path) -> None:
    """A first hub that fails part-way leaves a half-written file; the second hub then fetches
    every file: the download is whole (it was refused, run after run, for the first one's
    leftover), and leftovers of files no longer fetched are removed. A fetch that leaves a
    half-written file itself is not whole."""
    from cosyvoice_lite.hub import COMPLETE_MARK, download_model

    tiny = Path(__file__).resolve().parent / "data" / "models" / "v2-tiny"
    target = tmp_path / "CosyVoice2-0.5B"
    scratch = target / ".cache" / "huggingface" / "download"
    old = scratch / "CosyVoice-BlankEN" / "5f1c0de2.f00d.incomplete"  # an earlier version's
    old.parent.mkdir(parents=True)
    old.write_bytes(b"half of 1 GB")

    def fails_part_way(repo: str, into: Path) -> None:
        (scratch / "a1b2c3d4.abc123.incomplete").write_bytes(b"part of flow.pt")
        raise OSError("Connection reset by peer")

    def fetches_all(repo: str, into: Path) -> None:
        shutil.copytree(tiny, into, dirs_exist_ok=True)

    def returns_what_it_has(repo: str, into: Path) -> None:
        fetches_all(repo, into)
        (scratch / "e5f6a7b8.abc123.incomplete").write_bytes(b"part of spk2info.pt")

    with pytest.raises(ModelDownloadError, match=r"half-written"):
        download_model("CosyVoice2-0.5B", target, [("A", "x", returns_what_it_has)])
    (scratch / "e5f6a7b8.abc123.incomplete").unlink()
    download_model("CosyVoice2-0.5B", target, [("A", "x", fails_part_way), ("B", "y", fetches_all)])
    assert (target / COMPLETE_MARK).read_text().strip() == "B y"
    assert not list(scratch.rglob("*.incomplete"))  # ~1 GB each, of no use now
    assert resolve_model(str(target)) == target


def test_a_fetched_vocabulary_is_readable_by_the_caches_other_users(tmp_path: Path) -> None:
    """whisper's vocabulary was placed with a temporary file's mode (0600): another user or
    service account sharing the cache could not read it, and offline could not fetch it."""
    import subprocess
    import sys

    source = tmp_path / "got"
    source.write_bytes(b"vocabulary")
    script = (
        "import os, sys; from pathlib import Path; from cosyvoice_lite.hub import place_file; "
        "os.umask(0o022); place_file(Path(sys.argv[1]), Path(sys.argv[2]))"
    )
    target = tmp_path / "multilingual.tiktoken"
    subprocess.run([sys.executable, "-c", script, source, target], check=True, timeout=60)
    assert target.read_bytes() == b"vocabulary" and target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got", "multilingual.tiktoken"]


def test_a_missing_path_is_not_taken_for_a_model_name(tmp_path: Path, monkeypatch) -> None:
    """A mount that is missing or a typo in a path ending in an official name started a
    download of gigabytes into the cache."""
    monkeypatch.setenv("COSYVOICE_LITE_CACHE", str(tmp_path))
    for path in ("/mnt/models/CosyVoice2-0.5B", "./CosyVoice2-0.5B", "a/b/CosyVoice2-0.5B"):
        with pytest.raises(ModelDownloadError, match="neither an existing directory"):
            resolve_model(path, download=False)
    for name in ("CosyVoice2-0.5B", "FunAudioLLM/CosyVoice2-0.5B"):  # names
        with pytest.raises(ModelDownloadError, match="downloading is disabled"):
            resolve_model(name, download=False)


def test_loading_without_downloads_fetches_nothing(tmp_path: Path, monkeypatch) -> None:
    """``download=False`` held for the model only: v1's whisper vocabulary was still fetched
    (from GitHub, then through pip, up to minutes offline)."""
    monkeypatch.setenv("COSYVOICE_LITE_CACHE", str(tmp_path))  # no vocabulary in this cache
    with pytest.raises(ModelDownloadError, match="downloading is disabled"):
        Engine.load(Path(__file__).resolve().parent / "data" / "models" / "v1-tiny", download=False)


def test_a_release_is_named_as_given_through_links_and_the_hub_cache(
    v1_dir: Path, tmp_path: Path
) -> None:
    """A link named after the release, or the Hugging Face cache's layout, named the release
    after what it resolves to (a commit's hash): CosyVoice-300M-Instruct loaded as -SFT."""
    real = Path(shutil.copytree(v1_dir, tmp_path / "store" / "0123abcd"))
    (tmp_path / "CosyVoice-300M-Instruct").symlink_to(real)
    hub = tmp_path / "models--FunAudioLLM--CosyVoice-300M-Instruct" / "snapshots"
    hub.mkdir(parents=True)
    (hub / "0123abcd").symlink_to(real)
    for given in (tmp_path / "CosyVoice-300M-Instruct", hub / "0123abcd"):
        opened = open_model_dir(given)
        assert (opened.variant, opened.name) == ("instruct", "CosyVoice-300M-Instruct")
    # "sub/.." was named "..": the OpenAI model id, /info's model, the export manifest's
    (real / "sub").mkdir()
    assert open_model_dir(real / "sub" / "..").name == "0123abcd"


def test_a_damaged_speaker_table_is_a_clear_error_at_load(model_copy: Path) -> None:
    """A voice with an x-vector of the wrong size loaded and failed inside a network at its
    first request; others gave raw AttributeError / KeyError."""
    from cosyvoice_lite.modeldir import load_speakers

    path = model_copy / "spk2info.pt"
    table = torch.load(path, weights_only=True)
    name = next(iter(table))
    for entry, message in [
        ({"embedding": torch.zeros(1, 100)}, "100 values"),
        ({"embedding": [0.0] * 192}, "no tensor 'embedding'"),
        ({"llm_prompt_speech_token": torch.zeros(1, 4)}, "no tensor 'flow_prompt_speech_token'"),
    ]:
        torch.save({**table, name: entry}, path)
        with pytest.raises(ModelDirError, match=f"voice '{name}' has .*{message}"):
            load_speakers(path)


def test_a_speaker_table_that_is_no_file_is_an_error_not_a_hang_or_base(
    v1_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A FIFO made the load wait forever; a dangling link or a link loop was taken for no
    table (an -SFT release became 'base'); entries that are not dicts were dropped silently;
    a file its reader may not open was called corrupt."""
    import os

    from cosyvoice_lite.modeldir import load_speakers

    model = Path(shutil.copytree(v1_dir, tmp_path / "CosyVoice-300M"))  # (no 'sft' in the name)
    path = model / "spk2info.pt"
    table = torch.load(path, weights_only=True)
    path.unlink()
    for make, message in [
        (os.mkfifo, "not a regular file"),
        (lambda p: os.symlink("nowhere.pt", p), "broken symbolic link"),
        (lambda p: os.symlink(p.name, p), "broken symbolic link"),
    ]:
        make(path)
        for load in (load_speakers, lambda p: open_model_dir(p.parent)):
            with pytest.raises(ModelDirError, match=message):
                load(path)
        path.unlink()
    assert open_model_dir(model).variant == "base"  # absent: the base release
    torch.save({**table, "odd": 3}, path)
    with pytest.raises(
        ModelDirError, match=r"spk2info\.pt: voice 'odd' is not a dict of tensors \(int\)"
    ):
        load_speakers(path)

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "load", refused)  # (root reads a chmod 0 file all the same)
    with pytest.raises(ModelDirError, match=r"unreadable \(Permission denied\)"):
        load_speakers(path)


def test_the_qwen_config_read_is_the_models_own(tmp_path: Path) -> None:
    """A yaml naming another pretrain_path had its config.json read from there (outside the
    model, relative to the current directory); an unknown tokenizer version was a ValueError."""
    model = Path(
        shutil.copytree(Path(__file__).parent / "data" / "models" / "v3-tiny", tmp_path / "m")
    )
    yaml_file = model / "cosyvoice3.yaml"
    text = yaml_file.read_text(encoding="utf-8")
    pinned = text.replace("pretrain_path: !ref <qwen_pretrain_path>", "pretrain_path: /nowhere")
    assert pinned != text
    yaml_file.write_text(pinned, encoding="utf-8")
    assert open_model_dir(model).config is not None
    Engine.load(model, capture_graphs=False).close()  # reads <model>/CosyVoice-BlankEN's config
    unknown = text.replace("version: cosyvoice3", "version: cosyvoice9")
    assert unknown != text
    yaml_file.write_text(unknown, encoding="utf-8")
    with pytest.raises(ModelDirError, match="unsupported Qwen tokenizer version"):
        open_model_dir(model)


def test_a_download_fetches_the_files_the_engine_reads() -> None:
    """The whole repository was fetched: for CosyVoice2/3 also the ~1 GB Qwen weights of
    CosyVoice-BlankEN, whose config alone is read, and the official's TensorRT/JIT exports."""
    from cosyvoice_lite.hub import MODELS, download_patterns
    from cosyvoice_lite.modeldir import BLANK_EN

    versions = {"CosyVoice-300M": 1, "CosyVoice-300M-SFT": 1, "CosyVoice-300M-Instruct": 1,
                "CosyVoice2-0.5B": 2, "Fun-CosyVoice3-0.5B-2512": 3}  # fmt: skip
    assert set(versions) == set(MODELS)
    for name, version in versions.items():
        patterns = download_patterns(name)
        assert set(required_files(version)) <= set(patterns)
        assert "spk2info.pt" in patterns and f"{BLANK_EN}/model.safetensors" not in patterns


def test_a_hub_that_never_answers_fails_the_download_and_says_so(tmp_path: Path) -> None:
    """huggingface_hub's client has no timeout: against a hub (or proxy) that takes the
    connection and never answers, `download` (and any load of an official name) waited for
    good, saying nothing. Now it names what it fetches first and gives up after
    $COSYVOICE_LITE_HUB_TIMEOUT seconds without an answer."""
    import os
    import socket
    import subprocess
    import sys
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []  # accepted, never answered

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(
        COSYVOICE_LITE_CACHE=str(tmp_path / "cache"),
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}",
        HF_HUB_OFFLINE="0",
        COSYVOICE_LITE_HUB_TIMEOUT="0.5",
    )
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cosyvoice_lite", "download", "CosyVoice2-0.5B"],
            capture_output=True,
            text=True,
            timeout=30,  # (it waited for good)
            env=env,
        )
    finally:
        server.close()
        for connection in held:
            connection.close()
    took = time.perf_counter() - start
    assert done.returncode == 2, done.stderr
    assert "downloading CosyVoice2-0.5B from Hugging Face" in done.stderr
    assert str(tmp_path / "cache" / "models" / "CosyVoice2-0.5B") in done.stderr
    assert "could not download CosyVoice2-0.5B" in done.stderr and "Traceback" not in done.stderr
    assert held and took < 30, took  # (it reached the hub; ~5 s, mostly Python's imports)


def test_a_bad_hub_timeout_is_a_clear_error(monkeypatch) -> None:
    from cosyvoice_lite.hub import hub_timeout

    for value in ("0", "-1", "nan", "inf", "soon"):
        monkeypatch.setenv("COSYVOICE_LITE_HUB_TIMEOUT", value)
        with pytest.raises(ModelDownloadError, match="COSYVOICE_LITE_HUB_TIMEOUT"):
            hub_timeout()
    monkeypatch.setenv("COSYVOICE_LITE_HUB_TIMEOUT", "2.5")
    assert hub_timeout() == 2.5


def test_the_files_and_options_a_load_needs_are_checked_before_it(
    model_copy: Path, tmp_path: Path
) -> None:
    """``check_model_for_load``: what Engine.load would refuse once loading, found from the
    directory alone (a server runs it before it listens)."""
    from cosyvoice_lite.errors import InvalidRequestError
    from cosyvoice_lite.modeldir import check_model_for_load

    v2 = Path("tests/data/models/v2-tiny")
    assert check_model_for_load(model_copy).version == 1
    with pytest.raises(InvalidRequestError, match="stream_cache_dtype applies to CosyVoice2/3"):
        check_model_for_load(model_copy, stream_cache_dtype="float16")
    assert check_model_for_load(v2, stream_cache_dtype="float16").version == 2
    with pytest.raises(ModelDirError, match="llm.rl.pt .*: missing"):
        check_model_for_load(v2, llm_checkpoint="llm.rl.pt")
    with pytest.raises(ModelDirError, match="variant 'sft'"):
        check_model_for_load(v2, variant="sft")
    (model_copy / "hift.pt").unlink()
    with pytest.raises(ModelDirError, match="hift.pt: missing"):
        check_model_for_load(model_copy)


def test_a_non_utf8_model_directory_is_named_not_called_corrupt(
    v1_dir: Path, tmp_path: Path
) -> None:
    """torch opens checkpoints by UTF-8 names only: an intact llm.pt under a GBK-named folder
    was "corrupt or truncated"."""
    import os

    model = Path(shutil.copytree(v1_dir, tmp_path / os.fsdecode(b"model\xff")))
    with pytest.raises(ModelDirError, match=r"model\\xff is not valid UTF-8.*rename it"):
        open_model_dir(model)
    link = tmp_path / "link"  # (a UTF-8 name that leads there: the same)
    link.symlink_to(model)
    with pytest.raises(ModelDirError, match="not valid UTF-8"):
        open_model_dir(link)
