"""Tensor parallelism: head layouts, process groups and the parallel layers the model is built from.

Imports torch only (no model code), so the layers can be tested and reused on their own.
"""

from neuronserve.parallel.group import SINGLE, GlooGroup, TPGroup
from neuronserve.parallel.heads import HeadLayout

__all__ = ["SINGLE", "GlooGroup", "HeadLayout", "TPGroup"]
