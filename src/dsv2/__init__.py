"""dsv2: DeepSeek-V2 (Multi-head Latent Attention + DeepSeekMoE) in readable PyTorch."""

from dsv2.config import PRESETS, ConfigError, ModelConfig, preset
from dsv2.infer.engine import LLM, RequestOutput
from dsv2.infer.sampling import SamplingError, SamplingParams
from dsv2.model import Transformer
from dsv2.weights import CheckpointError, load_model, random_model, save_model

__all__ = [
    "LLM", "PRESETS", "CheckpointError", "ConfigError", "ModelConfig", "RequestOutput", "SamplingError",
    "SamplingParams", "Transformer", "load_model", "preset", "random_model", "save_model",
]
__version__ = "0.1.0"
