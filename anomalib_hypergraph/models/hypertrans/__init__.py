"""HyperTrans: hypergraph domain transfer for cross-domain few-shot anomaly detection (IJCAI 2025)."""

from .lightning_model import HyperTrans
from .torch_model import HyperTransModel

__all__ = ["HyperTrans", "HyperTransModel"]
