"""Pieces shared by the version pipelines."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..decoding import (
    LengthPolicy,
    Task,
    TextSource,
    bistream_task,
    given_tokens_task,
    run_alone,
    speech_token_task,
)
from ..networks.crossfade import fade_in_out  # noqa: F401 - re-exported for callers


@dataclass(frozen=True)
class ModelInputs:
    """Everything the networks need for one text segment (the official ``model_input`` dict).

    Token tensors are int32 [1, T]; embeddings [1, 192] or [0, 192] when absent; the prompt mel is
    [1, T_mel, 80]. ``text`` may be an iterator of token tensors for streaming text input.
    """

    text: object
    prompt_text: torch.Tensor
    llm_prompt_speech_token: torch.Tensor
    llm_embedding: torch.Tensor
    flow_prompt_speech_token: torch.Tensor
    prompt_speech_feat: torch.Tensor
    flow_embedding: torch.Tensor
    source_speech_token: torch.Tensor | None = None


def decoding_task(lm, inputs: ModelInputs, sampler, policy: LengthPolicy) -> Task:
    """The speech-token task of one segment: given tokens (voice conversion), streaming text in
    (bistream), or the plain official decoding."""
    if inputs.source_speech_token is not None:
        return given_tokens_task(inputs.source_speech_token)
    if not isinstance(inputs.text, torch.Tensor):
        return bistream_task(
            lm,
            TextSource(inputs.text),
            inputs.prompt_text,
            inputs.llm_prompt_speech_token,
            sampler,
            policy,
        )
    return speech_token_task(
        lm,
        inputs.text,
        inputs.prompt_text,
        inputs.llm_prompt_speech_token,
        inputs.llm_embedding,
        sampler,
        policy,
    )


def run_task_alone(lm, task: Task) -> Iterator[int]:
    """A task's tokens computed as a batch of one."""
    tokens = run_alone(lm, task)
    while True:
        with torch.inference_mode():  # never held across a yield
            token = next(tokens, None)
        if token is None:
            return
        yield token
