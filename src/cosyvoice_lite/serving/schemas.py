"""Request bodies of the JSON endpoints (pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

AudioFormat = Literal["wav", "mp3", "flac", "opus", "ogg", "pcm"]
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
ModeName = Literal["preset", "zero_shot", "cross_lingual", "instruct"]


class TTSRequest(BaseModel):
    """``POST /tts``: the simple API."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="Text to speak.")
    speaker: str = Field(description="A preset voice or a saved voice (see GET /speakers).")
    instruct: str | None = Field(None, description="Style instruction (models that support it).")
    speed: float = Field(1.0, description="0.5 to 2.0.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Make the result reproducible.")
    format: AudioFormat = "wav"
    stream: bool = Field(False, description="Send audio while it is being synthesized.")
    mode: ModeName | None = Field(None, description="Override the mode chosen from the voice.")


class VoiceRef(BaseModel):
    id: str


class SpeechRequest(BaseModel):
    """``POST /v1/audio/speech``: the OpenAI speech API (unknown extra fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str
    voice: str | VoiceRef
    instructions: str | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    # extensions (OpenAI clients send them through extra_body)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = Field(None, description="Chunk-level streaming; default: on for sse.")
