"""DeepSeek-V2 model math: single-device, stateless (any cache is an argument owned by the caller)."""

from dsv2.model.transformer import Transformer

__all__ = ["Transformer"]
