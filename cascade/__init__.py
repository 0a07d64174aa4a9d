"""Cascade router core: answer each request with the cheapest tier that is confident enough.

This package must import fast and without torch: the rules and ONNX tiers serve on a machine
that has onnxruntime alone. Heavy tiers are imported lazily through `cascade.tiers`.
"""

from cascade.router import Cascade, CascadeError
from cascade.types import Prediction, Tier

__all__ = ["Cascade", "CascadeError", "Prediction", "Tier"]
__version__ = "0.1.0"
