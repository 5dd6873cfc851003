"""Expert kinds; importing this package registers them in ``moiie.EXPERTS``."""

from moiie.experts import gelu_mlp, swiglu  # noqa: F401
from moiie.experts.base import DenseFFNWeights, grouped_linear

__all__ = ["DenseFFNWeights", "grouped_linear"]
