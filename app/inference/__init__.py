"""Inference: one frozen base model per name, LoRA adapters hot-swapped per request.

Importing this package does not import torch; the engine loads it on first use.
"""

from app.inference.engine import InferenceEngine
from app.inference.types import AdapterIntegrityError, AdapterRef, Generation

__all__ = ["AdapterIntegrityError", "AdapterRef", "Generation", "InferenceEngine"]
