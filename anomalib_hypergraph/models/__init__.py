"""anomalib models of this package; importing this module registers them with anomalib's model lookup."""

from .h2vlr import H2VLR, H2VLRModel
from .hypertrans import HyperTrans, HyperTransModel

__all__ = ["H2VLR", "H2VLRModel", "HyperTrans", "HyperTransModel"]
