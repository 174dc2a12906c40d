"""Read the official CosyVoice yaml files as data.

The official files are HyperPyYAML: tags such as ``!new:cosyvoice.llm.llm.TransformerLM`` make the
official loader import and instantiate classes (and ``!apply:torch.manual_seed`` runs code). We parse
them with ``yaml.SafeLoader`` plus constructors that only *record* what a tag names, resolve ``!ref``
references ourselves, and then turn the parts inference needs into typed, frozen configuration
objects. Nothing named in the file is ever imported or executed.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ModelDirError
from .versions import SPECS

YAML_NAMES = {version: spec.yaml for version, spec in SPECS.items()}


@dataclass(frozen=True)
class Tagged:
    """A yaml node carrying a HyperPyYAML tag: ``kind`` is new/name/apply, ``target`` the dotted name."""

    kind: str
    target: str
    value: Any

    @property
    def class_name(self) -> str:
        return self.target.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class _Ref:
    expression: str


class _SafeHyperLoader(yaml.SafeLoader):
    """SafeLoader that understands (but never executes) the HyperPyYAML tags, and refuses
    aliases (``*name``): the official files have none, and nested ones grow exponentially (a
    450-byte file took tens of GB)."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "yaml aliases (*name) are not read", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node, kind: str) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        scalar = loader.construct_scalar(node)
        value = {} if scalar in ("", None) else scalar
    return Tagged(kind, suffix, value)


# YAML 1.2 floats such as 1e-06 (HyperPyYAML reads them as numbers; PyYAML's 1.1 rules would not)
_SafeHyperLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

for _kind in ("new", "name", "apply"):
    _SafeHyperLoader.add_multi_constructor(
        f"!{_kind}:",
        lambda loader, suffix, node, _k=_kind: _construct_tagged(loader, suffix, node, _k),
    )
_SafeHyperLoader.add_constructor(
    "!ref", lambda loader, node: _Ref(str(loader.construct_scalar(node)))
)

_REF_NAME = re.compile(r"<([^<>]+)>")
# what a !ref expression may compute: numbers, + - * /, parentheses (no powers: 9**9**9 never ends)
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _arithmetic(text: str) -> int | float:
    """The value of plain arithmetic ``text``; ValueError for anything else."""

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            operand = value(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("not plain arithmetic")

    return value(ast.parse(text, mode="eval").body)


def _lookup(root: Mapping[str, Any], dotted: str) -> Any:
    node: Any = root
    for part in re.split(r"[.\[\]]+", dotted.strip()):
        if part == "":
            continue
        if isinstance(node, Tagged):
            node = node.value
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit():
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


MAX_REF_DEPTH = 64  # !ref chains in the official yamls are a few deep
MAX_REF_VALUE = 1e15  # sizes, rates, ratios: a larger result is not a model's


def _resolve(
    node: Any, root: Mapping[str, Any], memo: dict[str, Any], seen: tuple[str, ...] = ()
) -> Any:
    """``node`` with its ``!ref`` resolved; ``memo`` keeps each name's value once resolved (a
    chain of lines each referring twice to the one before would otherwise double the work per
    line), and a name referred to twice gives the same object both times."""
    if isinstance(node, _Ref):
        names = _REF_NAME.findall(node.expression)
        if len(names) == 1 and node.expression.strip() == f"<{names[0]}>":
            return _named(names[0], root, memo, seen)
        # an expression such as "<chunk_size> * <token_mel_ratio>": only plain arithmetic is allowed
        text = node.expression
        try:
            for name in names:
                text = text.replace(f"<{name}>", repr(_named(name, root, memo, seen)))
            result = _arithmetic(text)
            if not abs(result) <= MAX_REF_VALUE:  # (also NaN)
                raise ValueError("out of range")
            return result
        except (ValueError, SyntaxError, ArithmeticError, RecursionError):
            raise ModelDirError(
                f"unsupported !ref expression in the yaml: {node.expression!r}"
            ) from None
    if isinstance(node, Tagged):
        return Tagged(node.kind, node.target, _resolve(node.value, root, memo, seen))
    if isinstance(node, dict):
        return {k: _resolve(v, root, memo, seen) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, memo, seen) for v in node]
    return node


def _named(name: str, root: Mapping[str, Any], memo: dict[str, Any], seen: tuple[str, ...]) -> Any:
    if name in memo:
        return memo[name]
    if name in seen:
        raise ModelDirError(f"circular !ref <{name}> in the yaml")
    if len(seen) >= MAX_REF_DEPTH:
        raise ModelDirError(f"!ref <{name}>: references nested more than {MAX_REF_DEPTH} deep")
    memo[name] = value = _resolve(_lookup(root, name), root, memo, (*seen, name))
    return value


def read_hyperpyyaml(path: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Parse a HyperPyYAML file into plain data with every ``!ref`` resolved (nothing executed)."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.load(text, Loader=_SafeHyperLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelDirError(f"cannot parse {path}: {exc}") from exc
    except RecursionError:  # PyYAML composes nested lists recursively: [[[[...]]]]
        raise _too_deep(path) from None
    if not isinstance(raw, dict):
        raise ModelDirError(f"{path} is not a CosyVoice yaml file (top level is not a mapping)")
    raw.update(overrides or {})
    resolved: dict[str, Any] = {}
    memo: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key.startswith("__"):  # (the __set_seed* !apply entries:
            continue  # side effects we do not perform)
        try:
            resolved[key] = _resolve(value, raw, memo)
        except RecursionError:
            raise _too_deep(path) from None
        except (KeyError, IndexError, TypeError) as exc:
            if key in _NEEDED_KEYS:
                raise ModelDirError(f"{path}: key '{key}' refers to undefined {exc}") from exc
            continue  # training-only entries may reference things we do not have
    return resolved


_NEEDED_KEYS = ("sample_rate", "llm", "flow", "hift", "get_tokenizer", "feat_extractor")


def _too_deep(path: Path) -> ModelDirError:
    """The error for a yaml nested deeper than Python's recursion limit: a broken yaml."""
    return ModelDirError(f"cannot parse {path}: it is nested too deeply to be a CosyVoice yaml")


# --------------------------------------------------------------------------- typed configuration


@dataclass(frozen=True)
class MelConfig:
    """Parameters of the flow's prompt-mel extractor (matcha ``mel_spectrogram``)."""

    n_fft: int
    num_mels: int
    sampling_rate: int
    hop_size: int
    win_size: int
    fmin: float
    fmax: float | None
    center: bool = False


@dataclass(frozen=True)
class SamplingConfig:
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str  # "whisper" (v1) or "qwen" (v2/v3)
    version: str = ""  # "cosyvoice2" / "cosyvoice3" for qwen
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Component:
    """One network from the yaml: the official class name and its keyword arguments.

    Child networks appear in ``kwargs`` as nested ``Component`` objects; ``cfm_params`` and similar
    DictConfig nodes become plain dicts.
    """

    class_name: str
    kwargs: Mapping[str, Any]

    def child(self, name: str) -> Component:
        value = self.kwargs.get(name)
        if not isinstance(value, Component):
            raise ModelDirError(f"{self.class_name} has no sub-network '{name}' in the yaml")
        return value


@dataclass(frozen=True)
class ModelConfig:
    version: int
    sample_rate: int
    llm: Component
    flow: Component
    hift: Component
    mel: MelConfig
    sampling: SamplingConfig
    tokenizer: TokenizerConfig
    allowed_special: str = "all"

    @property
    def token_frame_rate(self) -> int:
        return int(self.flow.kwargs.get("input_frame_rate", SPECS[self.version].token_frame_rate))


def _component(node: Any, where: str) -> Component:
    if not isinstance(node, Tagged) or node.kind != "new":
        raise ModelDirError(f"'{where}' in the yaml is not a !new: network definition")
    kwargs: dict[str, Any] = {}
    for key, value in (node.value or {}).items():
        if isinstance(value, Tagged) and value.kind == "new":
            if value.class_name == "DictConfig":  # omegaconf.DictConfig {content: {...}}
                kwargs[key] = dict(value.value.get("content", value.value))
            else:
                kwargs[key] = _component(value, f"{where}.{key}")
        elif isinstance(value, Tagged) and value.kind == "name":
            kwargs[key] = value  # e.g. the sampling function: kept as data
        else:
            kwargs[key] = value
    return Component(node.class_name, kwargs)


def _mel_config(node: Any) -> MelConfig:
    if not isinstance(node, Tagged):
        raise ModelDirError("'feat_extractor' in the yaml is not a !name: mel_spectrogram entry")
    p = node.value
    try:
        return MelConfig(
            n_fft=int(p["n_fft"]),
            num_mels=int(p["num_mels"]),
            sampling_rate=int(p["sampling_rate"]),
            hop_size=int(p["hop_size"]),
            win_size=int(p["win_size"]),
            fmin=float(p.get("fmin", 0)),
            fmax=None if p.get("fmax") is None else float(p["fmax"]),
            center=bool(p.get("center", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelDirError(f"'feat_extractor' in the yaml lacks or mistypes {exc}") from exc


def _tokenizer_config(node: Any) -> TokenizerConfig:
    if not isinstance(node, Tagged):
        raise ModelDirError("'get_tokenizer' in the yaml is not a !name: entry")
    params = dict(node.value or {})
    if node.target.startswith("whisper."):
        return TokenizerConfig("whisper", params=params)
    if node.class_name == "get_qwen_tokenizer":
        from .frontend.qwen_tokenizer import TOKENIZER_VERSIONS

        version = str(params.get("version", "cosyvoice2"))
        if version not in TOKENIZER_VERSIONS:
            raise ModelDirError(
                f"unsupported Qwen tokenizer version in the yaml: {version!r} (known: "
                f"{', '.join(TOKENIZER_VERSIONS)})"
            )
        return TokenizerConfig("qwen", version=version, params=params)
    raise ModelDirError(f"unsupported tokenizer in the yaml: {node.target}")


def parse_model_config(data: Mapping[str, Any], version: int, source: str = "yaml") -> ModelConfig:
    """Turn the resolved yaml data into a typed ``ModelConfig``, checking the network classes."""
    missing = [k for k in _NEEDED_KEYS if k not in data]
    if missing:
        raise ModelDirError(f"{source} lacks the keys: {', '.join(missing)}")
    llm = _component(data["llm"], "llm")
    flow = _component(data["flow"], "flow")
    hift = _component(data["hift"], "hift")
    expected = SPECS[version].network_classes
    found = (llm.class_name, flow.class_name, hift.class_name)
    if found != expected:
        raise ModelDirError(
            f"{source} describes networks {found}, but a {YAML_NAMES[version]} model needs {expected}"
        )
    rate = flow.kwargs.get("input_frame_rate")
    if rate is not None:  # (speech tokens per second: 0 divided by zero at each request)
        _positive_int(rate, "the flow's input_frame_rate", source)
    return ModelConfig(
        version=version,
        sample_rate=_positive_int(data["sample_rate"], "sample_rate", source),
        llm=llm,
        flow=flow,
        hift=hift,
        mel=_mel_config(data["feat_extractor"]),
        sampling=_sampling_config(llm.kwargs.get("sampling"), source),
        tokenizer=_tokenizer_config(data["get_tokenizer"]),
        allowed_special=str(data.get("allowed_special", "all")),
    )


def _positive_int(value: Any, what: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelDirError(f"{source}: {what} must be a positive whole number, got {value!r}")
    return value


# what the LLM's sampling (RAS) takes: a value outside these failed every request, raw
_SAMPLING_RANGES = {
    "top_p": ("a number above 0 and at most 1", lambda v: 0 < v <= 1),
    "top_k": ("a whole number of at least 1", lambda v: isinstance(v, int) and v >= 1),
    "win_size": ("a whole number of at least 1", lambda v: isinstance(v, int) and v >= 1),
    "tau_r": ("a number from 0 to 1", lambda v: 0 <= v <= 1),
}


def _sampling_config(node: Any, source: str) -> SamplingConfig:
    """The LLM's sampling parameters (the official defaults where the yaml has none), checked."""
    if not isinstance(node, Tagged) or not isinstance(node.value, Mapping):
        return SamplingConfig()
    known = {k: v for k, v in node.value.items() if k in _SAMPLING_RANGES}
    for name, value in known.items():
        wanted, fits = _SAMPLING_RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not fits(value):
            raise ModelDirError(
                f"{source}: the LLM's sampling {name} must be {wanted}, got {value!r}"
            )
    return SamplingConfig(**known)


def load_model_config(model_dir: Path, version: int) -> ModelConfig:
    path = model_dir / YAML_NAMES[version]
    qwen = SPECS[version].text_tokenizer == "qwen"
    blank_en = str(model_dir / "CosyVoice-BlankEN")
    overrides = {"qwen_pretrain_path": blank_en} if qwen else None
    data = read_hyperpyyaml(path, overrides)
    try:
        if qwen:  # the Qwen config read is the model's own, whatever path the yaml writes there
            _pin_pretrain_path(data.get("llm"), blank_en)
        return parse_model_config(data, version, source=str(path))
    except RecursionError:  # (the networks' definitions are walked recursively too)
        raise _too_deep(path) from None


def _pin_pretrain_path(node: Any, blank_en: str, visited: set[int] | None = None) -> None:
    """Every Qwen2Encoder below ``node`` reads ``blank_en``'s config.json. (A value referred to
    twice is one object, visited once: a yaml may refer to a list of lists of ... many times.)"""
    visited = set() if visited is None else visited
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, Tagged):
        if node.class_name == "Qwen2Encoder" and isinstance(node.value, dict):
            node.value["pretrain_path"] = blank_en
        _pin_pretrain_path(node.value, blank_en, visited)
    elif isinstance(node, dict):
        for child in node.values():
            _pin_pretrain_path(child, blank_en, visited)
    elif isinstance(node, list):
        for child in node:
            _pin_pretrain_path(child, blank_en, visited)
