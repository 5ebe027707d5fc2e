"""reparq: accurate post-training quantization through reparameterization.

Public API (kept small and stable): ``quantize``, ``evaluate``, ``save``, ``load``, ``export_onnx``, ``export_hf``, ``list_recipes``,
``register_merger``, ``QuantConfig``, ``ReparqError``; the zoo lives in ``reparq.zoo``.
Importing reparq does not import timm, transformers or onnx.
"""

from reparq.api import evaluate, quantize
from reparq.config import QuantConfig
from reparq.deploy.onnx_export import export_onnx
from reparq.deploy.hf_export import export_hf
from reparq.deploy.serialize import load, save
from reparq.errors import ReparqError
from reparq.info import QuantInfo, __version__
from reparq.model.merge import register_merger
from reparq.recipes.registry import list_recipes

__all__ = ["QuantConfig", "QuantInfo", "ReparqError", "__version__", "evaluate", "export_hf", "export_onnx", "list_recipes", "load",
           "quantize", "register_merger", "save"]
