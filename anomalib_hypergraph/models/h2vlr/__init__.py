"""H2VLR: heterogeneous hypergraph vision-language reasoning for few-shot anomaly detection (arXiv 2604.14507)."""

from .lightning_model import H2VLR
from .torch_model import H2VLRModel

__all__ = ["H2VLR", "H2VLRModel"]
