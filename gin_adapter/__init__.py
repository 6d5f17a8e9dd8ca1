"""gin_adapter: Sparse GIN-Attention (Buehler 2025) as a PEFT adapter for Hugging Face causal language models.

    from gin_adapter import GinConfig, get_gin_model
    model = get_gin_model(base_model, GinConfig(hidden_dim=32))

Importing the package registers the ``"GIN"`` PEFT type, so ``peft.PeftModel.from_pretrained`` loads GIN adapters.
"""

from .config import GinConfig
from .io import load_gin_model, save_adapter
from .model import GinModel, count_trainable_parameters, get_gin_model, gin_layers, layer_scales, register

register()

__all__ = [
    "GinConfig",
    "GinModel",
    "count_trainable_parameters",
    "get_gin_model",
    "gin_layers",
    "layer_scales",
    "load_gin_model",
    "save_adapter",
    "register",
]
__version__ = "0.1.0"
