"""Version-specific token -> waveform pipelines (LLM, flow, vocoder wiring and streaming state)."""
