"""anomalib models of this package; importing this module registers them with anomalib's model lookup."""

from .hypertrans import HyperTrans, HyperTransModel

__all__ = ["HyperTrans", "HyperTransModel"]
