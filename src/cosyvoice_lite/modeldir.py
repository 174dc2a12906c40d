"""Official model directories: which version, which files, and strict checkpoint loading."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import YAML_NAMES, ModelConfig, load_model_config
from .errors import InvalidRequestError, ModelDirError
from .files import not_utf8
from .versions import spec

log = logging.getLogger(__name__)

BLANK_EN = "CosyVoice-BlankEN"
BLANK_EN_FILES = ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def required_files(version: int) -> list[str]:
    """Files the engine opens for a model version (spk2info.pt and llm.rl.pt are optional)."""
    files = [
        YAML_NAMES[version],
        "llm.pt",
        "flow.pt",
        "hift.pt",
        "campplus.onnx",
        f"speech_tokenizer_v{version}.onnx",
    ]
    if spec(version).text_tokenizer == "qwen":
        files += [f"{BLANK_EN}/{name}" for name in BLANK_EN_FILES]
    return files


def detect_version(model_dir: Path) -> int:
    """The model version, from the yaml file present (as the official ``AutoModel`` does)."""
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} does not exist or is not a directory")
    found = [v for v, name in YAML_NAMES.items() if (model_dir / name).is_file()]
    if not found:
        names = ", ".join(YAML_NAMES.values())
        raise ModelDirError(
            f"{model_dir} is not a CosyVoice model directory: none of {names} is there"
        )
    if len(found) > 1:
        names = ", ".join(YAML_NAMES[v] for v in found)
        raise ModelDirError(f"{model_dir} holds several model yamls ({names}); keep exactly one")
    return found[0]


def _unreadable_reason(path: Path) -> str | None:
    if not path.exists():
        return "missing"
    if not path.is_file():
        return "not a file"
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if size == 0:
        return "empty"
    if path.suffix == ".pt" and head[:2] == b"PK" and not zipfile.is_zipfile(path):
        return "truncated or corrupt (broken zip archive)"
    return None


def check_files(model_dir: Path, version: int, extra: tuple[str, ...] = ()) -> None:
    """Raise one ModelDirError listing every missing or unreadable file, or return quietly."""
    problems = []
    for name in [*required_files(version), *extra]:
        reason = _unreadable_reason(model_dir / name)
        if reason:
            problems.append(f"  {name}: {reason}")
    if problems:
        raise ModelDirError(
            f"model directory {model_dir} (CosyVoice v{version}) is incomplete:\n"
            + "\n".join(problems)
        )


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load a ``torch.save(state_dict)`` file safely (weights only, memory-mapped)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt archives
        raise ModelDirError(
            f"cannot read checkpoint {path}: it is corrupt or truncated ({exc})"
        ) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ModelDirError(f"{path} is not a state_dict (a mapping of parameter names to tensors)")
    return dict(state)


def load_strict(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: Path,
    assign: bool = False,
) -> None:
    """``load_state_dict(strict=True)`` with one readable error naming every key and shape problem;
    ``assign``: the module takes the checkpoint's tensors themselves (``assign_state``)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the network described by the yaml:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        ):
            if items:
                shown = ", ".join(items[:8]) + (
                    f" ... (+{len(items) - 8} more)" if len(items) > 8 else ""
                )
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise ModelDirError("\n".join(lines))
    if assign:
        assign_state(module, state)
    else:
        module.load_state_dict(state, strict=True)


def assign_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True, assign=True)`` keeping what a copying load keeps: each
    tensor in the module's dtype, and parameters the module ties (one object under two names,
    Qwen2's ``lm_head`` and its table) tied, to the value a copying load leaves (the last).

    The point is memory: from a memory-mapped checkpoint, the module's tensors are then the file's
    pages, and the load-time kernels (casts, int8, packing) make their copies from those pages,
    where a copying load first filled the float32 parameters: a full-size float32 Qwen2 (2 GB)
    held twice while being quantised or packed. ``copy_out_of_file`` then gives what is left its
    own memory."""
    own = module.state_dict(keep_vars=True)
    values = {k: _as_built(v, own[k]) for k, v in state.items()}
    tied: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    module.load_state_dict(values, strict=True, assign=True)
    for names in (names for names in tied.values() if len(names) > 1):
        kept = module.get_parameter(names[-1])
        for name in names[:-1]:
            owner, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(owner), attribute, kept)


def _as_built(value: torch.Tensor, built: torch.Tensor) -> torch.Tensor:
    """``value`` in the dtype and layout a copying load would leave it in: ``built``'s dtype, and
    contiguous (a checkpoint may hold a strided view; the kernels read whole rows)."""
    if value.dtype != built.dtype:
        value = value.to(built.dtype)
    return value if value.is_contiguous() or not built.is_contiguous() else value.contiguous()


def copy_out_of_file(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> int:
    """Give every parameter and buffer of ``module`` still in the pages of ``state``'s memory-mapped
    checkpoint (assigned by ``assign_state`` and not replaced by a cast, int8 or packed copy since)
    its own memory, so that the loaded network does not depend on the file afterwards (the tables
    ``mapped_tables`` maps on purpose are another mapping). Returns the bytes copied."""
    storages = [t.untyped_storage() for t in state.values() if t.device.type == "cpu"]
    if not storages:
        return 0
    # torch maps the whole file once; its tensors' storages lie within that one mapping
    low = min(s.data_ptr() for s in storages)
    high = max(s.data_ptr() + s.nbytes() for s in storages)
    copied = 0
    for owner in module.modules():
        for store in (owner._parameters, owner._buffers):
            for key, tensor in store.items():
                if tensor is None or tensor.device.type != "cpu" or tensor.is_mkldnn:
                    continue  # a packed oneDNN weight is opaque, and always a copy
                if not low <= tensor.untyped_storage().data_ptr() < high:
                    continue
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = tensor.data.clone()  # the same object: ties stay
                else:
                    store[key] = tensor.clone()
                copied += tensor.numel() * tensor.element_size()
    return copied


def load_speakers(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Preset voices from spk2info.pt (``{name: {'embedding': Tensor[1,192], ...}}``); {} if absent."""
    if not speaker_file(path):
        return {}
    try:
        info = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:  # (permissions: the file is fine, its reader is not allowed)
        raise ModelDirError(
            f"cannot read {path}: it is unreadable ({exc.strerror or exc})"
        ) from exc
    except Exception as exc:
        raise ModelDirError(f"cannot read {path}: it is corrupt or truncated ({exc})") from exc
    if not isinstance(info, Mapping):
        raise ModelDirError(f"{path} is not a speaker table (expected a dict of voices)")
    for name, entry in info.items():
        if not isinstance(entry, Mapping):  # (was dropped silently: a table of no voices)
            raise ModelDirError(
                f"{path}: voice '{name}' is not a dict of tensors ({type(entry).__name__})"
            )
    voices = {str(k): dict(v) for k, v in info.items()}
    for name, entry in voices.items():
        problem = _voice_problem(entry)
        if problem is not None:
            raise ModelDirError(f"{path}: voice '{name}' {problem}")
    return voices


def speaker_file(path: Path) -> bool:
    """Whether the optional spk2info.pt is there (a regular file); a ModelDirError where the
    name is there but is no readable file: a dangling link or a link loop (taken for absent,
    they made an -SFT release 'base'), a FIFO (reading it waited forever), a directory."""
    if not os.path.lexists(path):
        return False
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ModelDirError(
            f"cannot read {path}: {exc.strerror or exc} (a broken symbolic link?)"
        ) from exc
    if not stat.S_ISREG(mode):
        raise ModelDirError(f"cannot read {path}: it is not a regular file")
    return True


# a preset voice (SFT) has an x-vector; a cloned one (the official add_zero_shot_spk) its prompt
_PRESET_KEYS = ("embedding",)
_CLONED_KEYS = ("flow_prompt_speech_token", "prompt_speech_feat", "flow_embedding", "prompt_text")


def _voice_problem(entry: Mapping) -> str | None:
    """What is wrong with a spk2info.pt entry, or None: checked at load, where a damaged one
    failed inside a network at its first request, or gave raw KeyErrors."""
    cloned = "llm_prompt_speech_token" in entry
    for key in _CLONED_KEYS if cloned else _PRESET_KEYS:
        if not isinstance(entry.get(key), torch.Tensor):
            return f"has no tensor '{key}'"
    embedding = entry["flow_embedding" if cloned else "embedding"]
    if embedding.numel() != 192 or not embedding.is_floating_point():
        return f"has an x-vector of {embedding.numel()} values; 192 floats are expected"
    if not bool(torch.isfinite(embedding).all()):
        return "has an x-vector that is not finite"
    if cloned and (
        entry["prompt_speech_feat"].dim() != 3 or entry["prompt_speech_feat"].shape[-1] != 80
    ):
        return "has a prompt mel that is not [1, T, 80]"
    return None


@dataclass(frozen=True)
class ModelDir:
    """A validated official model directory."""

    path: Path
    version: int
    config: ModelConfig
    variant: str  # "base", "sft" or "instruct" (v1); "base" for v2/v3
    release: str = ""  # the name it was given (a link's, a hub cache's repository); path's else

    @property
    def name(self) -> str:
        return self.release or self.path.name


def _release_name(given: Path, model_dir: Path) -> str:
    """The release's name as the user named it: a Hugging Face cache's repository
    (``models--FunAudioLLM--CosyVoice-300M-Instruct/snapshots/<sha>``), else the directory's
    name as given (a symbolic link named after the release), not what it resolves to."""
    for part in (*given.absolute().parts, *model_dir.parts):
        if part.startswith("models--"):
            return part.split("--")[-1]
    name = given.absolute().name  # (pathlib keeps "..": "sub/.." is named by what it resolves to)
    return model_dir.name if name in ("", "..") else name


def _variant(model_dir: Path, version: int, release: str = "") -> str:
    """Which v1 release this is. The three v1 releases share one yaml, so the official code cannot
    tell them apart (it looks for '-Instruct' in the path as given); we use the ModelScope/HF
    metadata or the release's name."""
    if len(spec(version).variants) == 1:
        return "base"
    hints = [model_dir.name.lower(), release.lower()]
    meta = model_dir / "configuration.json"
    if meta.is_file():
        with contextlib.suppress(OSError, ValueError):
            hints.append(json.dumps(json.loads(meta.read_text(encoding="utf-8"))).lower())
    text = " ".join(hints)
    if "instruct" in text:
        return "instruct"
    if "sft" in text or speaker_file(model_dir / "spk2info.pt"):
        return "sft"
    return "base"


def open_model_dir(path: str | Path, variant: str | None = None) -> ModelDir:
    """Validate a directory: version from its yaml, every needed file present and readable,
    the yaml parsed as data into a typed configuration."""
    given = Path(path).expanduser()
    _check_utf8(given)
    try:
        model_dir = given.resolve()
        _check_utf8(model_dir)  # (through a link)
        version = detect_version(model_dir)
        check_files(model_dir, version)
        speaker_file(model_dir / "spk2info.pt")  # (optional, but not broken)
        config = load_model_config(model_dir, version)
    except OSError as exc:  # a directory this user may not read: a model-directory error
        raise ModelDirError(f"cannot read model directory {given}: {exc.strerror or exc}") from None
    if variant is not None and variant not in ("base", "sft", "instruct"):
        raise ModelDirError(f"unknown variant '{variant}': use base, sft or instruct")
    if variant is not None and variant not in spec(version).variants:
        raise ModelDirError(
            f"variant '{variant}' applies to CosyVoice-300M releases; a "
            f"{spec(version).name} directory has only {', '.join(spec(version).variants)}"
        )
    release = _release_name(given, model_dir)
    variant = variant or _variant(model_dir, version, release)
    return ModelDir(model_dir, version, config, variant, release)


def _check_utf8(path: Path) -> None:
    """A ModelDirError where ``path`` is not valid UTF-8: torch opens checkpoints by UTF-8
    names only, and called such a directory's intact llm.pt corrupt."""
    if (shown := not_utf8(path)) is not None:
        raise ModelDirError(
            f"model directory path {shown} is not valid UTF-8 (a name from another system's "
            "encoding?): rename it"
        )


def check_model_for_load(
    path: str | Path,
    variant: str | None = None,
    llm_checkpoint: str = "llm.pt",
    stream_cache_dtype: str | None = None,
) -> ModelDir:
    """``open_model_dir`` and the checks of ``Engine.load``'s options that need the directory,
    before any network loads: the chosen LLM checkpoint is there (``llm.rl.pt`` is optional),
    and ``stream_cache_dtype`` is for a model that streams through a flow cache (v2/v3). A
    server runs it before it listens: its model loads in the background, and these errors
    left it up and not ready for good."""
    model_dir = open_model_dir(path, variant)
    if llm_checkpoint != "llm.pt":  # (llm.pt itself: a required file, checked above)
        reason = _unreadable_reason(model_dir.path / llm_checkpoint)
        if reason is not None:
            raise ModelDirError(
                f"llm_checkpoint {llm_checkpoint} of model directory {model_dir.path}: {reason}"
            )
    if stream_cache_dtype is not None and spec(model_dir.version).pipeline == "v1":
        raise InvalidRequestError(  # (it was taken, and did nothing)
            f"stream_cache_dtype applies to CosyVoice2/3's streamed flow; {model_dir.name} "
            "keeps no stream caches"
        )
    return model_dir
