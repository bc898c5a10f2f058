"""Inference: one frozen base model per name, many LoRA adapters batched over it.

Importing this package does not import torch; the engine loads it on first use.
"""

from app.errors import AdapterIntegrityError
from app.inference.engine import InferenceEngine
from app.inference.types import AdapterRef, Delta, Generation

__all__ = ["AdapterIntegrityError", "AdapterRef", "Delta", "Generation", "InferenceEngine"]
