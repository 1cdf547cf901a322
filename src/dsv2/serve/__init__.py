"""Serving: an OpenAI-compatible HTTP API over the continuous-batching engine (extra `[serve]`)."""
