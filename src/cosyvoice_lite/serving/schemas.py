"""Request bodies of the JSON endpoints (pydantic)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AudioFormat = Literal["wav", "mp3", "flac", "opus", "ogg", "pcm"]
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
ModeName = Literal["preset", "zero_shot", "cross_lingual", "instruct"]
OPENAI_FORMATS = ["mp3", "opus", "flac", "wav", "pcm"]


def speed_field() -> Any:
    # checked by the engine, so every API answers 400 naming the range; documented here
    return Field(
        1.0,
        description="0.5 to 2.0 (the models' range).",
        json_schema_extra={"minimum": 0.5, "maximum": 2.0},
    )


class NullMeansDefault(BaseModel):
    """A body whose optional fields may be sent as ``null`` (Jackson, Newtonsoft and
    System.Text.Json write unset properties so): such a field takes its default."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optional = {name for name, field in cls.model_fields.items() if not field.is_required()}
        return {
            key: value for key, value in data.items() if value is not None or key not in optional
        }


class TTSRequest(NullMeansDefault):
    """``POST /tts``: the simple API."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="Text to speak.")
    speaker: str = Field(description="A preset voice or a saved voice (see GET /speakers).")
    instruct: str | None = Field(None, description="Style instruction (models that support it).")
    speed: float = speed_field()
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Make the result reproducible.")
    format: AudioFormat = "wav"
    stream: bool = Field(False, description="Send audio while it is being synthesized.")
    mode: ModeName | None = Field(None, description="Override the mode chosen from the voice.")


class VoiceRef(BaseModel):
    id: str


class SpeechRequest(NullMeansDefault):
    """``POST /v1/audio/speech``: the OpenAI speech API (unknown extra fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="The served model's name or an alias (see GET /v1/models).")
    input: str = Field(
        description="Text to speak; long text is split into sentences and sent "
        "segment by segment (limit: GET /info, limits.max_text_chars)."
    )
    voice: str | VoiceRef | None = Field(
        None,
        description="A preset or saved voice, or an OpenAI voice name mapped to one (GET "
        "/v1/audio/voices). Not needed with ref_audio.",
    )
    instructions: str | None = None
    # A plain string checked by the server (400 naming the formats), documented as an enum.
    response_format: str = Field("mp3", json_schema_extra={"enum": OPENAI_FORMATS})
    speed: float = speed_field()
    stream_format: Literal["audio", "sse"] = "audio"
    # extensions (OpenAI clients send them through extra_body)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = Field(None, description="Chunk-level streaming; default: on for sse.")
    ref_audio: str | None = Field(
        None,
        description="One-off prompt recording (vLLM-Omni style): a data URI "
        "(data:audio/wav;base64,...) or base64. Clones it without saving a voice.",
    )
    ref_text: str | None = Field(
        None,
        description="Transcript of ref_audio (zero-shot); without "
        "it the prompt is used cross-lingually.",
    )
    source_audio: str | None = Field(
        None,
        description="Voice conversion: speech (data URI or base64) re-spoken in the voice "
        'of ref_audio or of a saved or cloned voice; input is then ignored (send "").',
    )
