"""The project's own small Fashion-MNIST models (training script + committed safetensors)."""

from reparq.zoo.registry import list_models, load_model, model_card

__all__ = ["list_models", "load_model", "model_card"]
