"""One description per CosyVoice model version: what differs between v1, v2 and v3, in one place.

The engine, the pipelines and the server read these facts instead of branching on the version
number, so a new version is a new entry here (plus its networks), not edits across the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

ENDOFPROMPT = "<|endofprompt|>"
SYSTEM_PROMPT = "You are a helpful assistant."  # CosyVoice3's canonical system prompt

# CosyVoice3: FSQ silence/breath tokens; runs longer than 5 are not sent to the flow (official llm_job)
V3_SILENT_TOKENS = frozenset({1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323})

# Instructions from the model cards and the official examples (the web page offers them as presets)
V2_INSTRUCTIONS = {
    "dialects": [
        "用粤语说这句话",
        "用四川话说这句话",
        "用上海话说这句话",
        "用天津话说这句话",
        "用东北话说这句话",
        "用河南话说这句话",
        "用山东话说这句话",
        "用长沙话说这句话",
    ],
    "emotions": [
        "用开心的语气说",
        "用伤心的语气说",
        "用惊讶的语气说",
        "用生气的语气说",
        "用恐惧的语气说",
        "用温柔的语气说",
        "用严肃的语气说",
    ],
    "style": ["用很快的语速说", "用很慢的语速说", "用小声说悄悄话的方式说", "像机器人一样说"],
}
V3_INSTRUCTIONS = {
    "dialects": [
        "请用广东话表达。",
        "请用四川话表达。",
        "请用上海话表达。",
        "请用东北话表达。",
        "请用天津话表达。",
        "请用河南话表达。",
        "请用山东话表达。",
        "请用陕西话表达。",
        "请用闽南话表达。",
        "请用湖南话表达。",
        "请用云南话表达。",
        "请用贵州话表达。",
    ],
    "emotions": [
        "请用开心的语气说。",
        "请用伤心的语气说。",
        "请用生气的语气说。",
        "请用惊讶的语气说。",
        "请用温柔的语气说。",
        "请用恐惧的语气说。",
    ],
    "style": [
        "请用尽可能快地语速说一句话。",
        "请用尽可能慢地语速说一句话。",
        "请用悄悄话的方式说。",
        "Please speak as fast as possible.",
        "Please speak in a happy tone.",
    ],
}


@dataclass(frozen=True)
class VersionSpec:
    """Facts about one model version (see the module docstring)."""

    version: int
    name: str
    yaml: str  # the yaml file that identifies the version in a model directory
    network_classes: tuple[str, str, str]  # the yaml's llm, flow and hift classes
    text_tokenizer: str  # "whisper" (tiktoken, v1) or "qwen" (CosyVoice-BlankEN, v2/v3)
    token_frame_rate: int  # speech tokens per second
    pipeline: str  # "v1" (fixed hops, cross-fades) or "v2" (chunk-causal flow, growing hops)
    # Instructions: v1 speaks them with a preset voice (and only the -Instruct release follows
    # them); v2/v3 with a prompt voice. The template wraps what the user wrote; an instruction
    # with its own <|endofprompt|> is taken as written.
    instruct_with_preset: bool
    instruct_template: str
    # CosyVoice3 needs <|endofprompt|> in its input: the system prompt is added where the user
    # wrote none.
    needs_system_prompt: bool
    streaming_text_in: bool  # the LLM can take text as it arrives (official inference_bistream)
    prompt_mel_ratio: int | None  # prompt mel frames per prompt token (None: not aligned, v1)
    silent_tokens: frozenset[int]  # long runs of these are not sent to the flow
    max_silent_run: int
    causal_vocoder: bool  # the vocoder streams by itself (v3) instead of cross-fading chunks
    # The LLM's ids after the speech tokens, as offsets from speech_token_size
    special_ids: tuple[tuple[str, int], ...]
    language_tags: bool  # the text may carry language tags (<|zh|>, <|en|>, ...: v1)
    # the most audio its vocoder makes in one call (v3: a fixed buffer of sine waves), or None
    vocoder_max_seconds: float | None = None
    # Releases sharing one yaml (v1: -300M, -SFT, -Instruct), told apart by name or metadata
    variants: tuple[str, ...] = ("base",)
    # Instructions the model follows, by group (the web page's presets)
    instruction_examples: Mapping[str, list[str]] = field(default_factory=dict, compare=False)

    def instruction(self, instruct: str) -> str:
        """The instruction as this version's LLM expects it."""
        if ENDOFPROMPT in instruct:
            return instruct
        return self.instruct_template.format(instruct)

    @property
    def chunk_causal_flow(self) -> bool:
        """The flow streams with chunk masks and fixed noise (v2/v3), instead of overlapping
        hops with drawn noise and a non-aligned prompt mel (v1)."""
        return self.pipeline == "v2"


SPECS: dict[int, VersionSpec] = {
    1: VersionSpec(
        version=1,
        name="CosyVoice-300M",
        yaml="cosyvoice.yaml",
        network_classes=("TransformerLM", "MaskedDiffWithXvec", "HiFTGenerator"),
        text_tokenizer="whisper",
        token_frame_rate=50,
        pipeline="v1",
        instruct_with_preset=True,
        # CosyVoice-300M-Instruct ends an instruction with <|endofprompt|>, BPE text to whisper
        # (the official example writes it: "Theo 'Crimson', ... impulsiveness.<|endofprompt|>")
        instruct_template="{}" + ENDOFPROMPT,
        needs_system_prompt=False,
        streaming_text_in=False,
        prompt_mel_ratio=None,
        silent_tokens=frozenset(),
        max_silent_run=0,
        causal_vocoder=False,
        special_ids=(("eos", 0),),
        language_tags=True,
        variants=("base", "sft", "instruct"),
    ),
    2: VersionSpec(
        version=2,
        name="CosyVoice2-0.5B",
        yaml="cosyvoice2.yaml",
        network_classes=("Qwen2LM", "CausalMaskedDiffWithXvec", "HiFTGenerator"),
        text_tokenizer="qwen",
        token_frame_rate=25,
        pipeline="v2",
        instruct_with_preset=False,
        instruct_template="{}" + ENDOFPROMPT,
        needs_system_prompt=False,
        streaming_text_in=True,
        prompt_mel_ratio=2,
        silent_tokens=frozenset(),
        max_silent_run=0,
        causal_vocoder=False,
        special_ids=(("eos", 0), ("fill", 2)),
        language_tags=False,
        instruction_examples=V2_INSTRUCTIONS,
    ),
    3: VersionSpec(
        version=3,
        name="Fun-CosyVoice3-0.5B",
        yaml="cosyvoice3.yaml",
        network_classes=("CosyVoice3LM", "CausalMaskedDiffWithDiT", "CausalHiFTGenerator"),
        text_tokenizer="qwen",
        token_frame_rate=25,
        pipeline="v2",
        instruct_with_preset=False,
        instruct_template=f"{SYSTEM_PROMPT} {{}}{ENDOFPROMPT}",
        needs_system_prompt=True,
        streaming_text_in=True,
        prompt_mel_ratio=2,
        silent_tokens=V3_SILENT_TOKENS,
        max_silent_run=5,
        causal_vocoder=True,
        vocoder_max_seconds=300.0,
        special_ids=(("sos", 0), ("eos", 1), ("task_id", 2), ("fill", 3)),
        language_tags=False,
        instruction_examples=V3_INSTRUCTIONS,
    ),
}


def spec(version: int) -> VersionSpec:
    return SPECS[version]
