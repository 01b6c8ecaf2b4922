"""WaveCLIP PyTorch model: config, tower, checkpoint format and teacher adapters."""
from model.config import PRESETS, WaveCLIPConfig, get_preset

__all__ = ["PRESETS", "WaveCLIPConfig", "get_preset"]
