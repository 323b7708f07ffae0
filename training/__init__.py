"""The hashing network and how it learns: `create_model`, `load_model`, `save_model`, and `training.train`."""
from training.model import HashingNet, ModelConfig, create_model, load_model, save_model

__all__ = ["HashingNet", "ModelConfig", "create_model", "load_model", "save_model"]
