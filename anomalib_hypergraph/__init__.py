"""anomalib-hypergraph: hypergraph few-shot anomaly detectors as an anomalib 2.x plugin.

Importing the package makes its models known to anomalib (``anomalib.models.get_model("HyperTrans")``,
``get_model("H2VLR")``); the stock
``anomalib`` command imports it by itself through a start-up hook installed with the package. Importing it also
makes anomalib's ``Engine.export`` name the ``--model.*`` options a checkpoint export of our models does not use
(:mod:`anomalib_hypergraph.engine_hooks`, the package's one change to anomalib's own code).
"""

from anomalib_hypergraph import engine_hooks
from anomalib_hypergraph.models import H2VLR, H2VLRModel, HyperTrans, HyperTransModel

engine_hooks.install()

__version__ = "0.1.0"

__all__ = ["H2VLR", "H2VLRModel", "HyperTrans", "HyperTransModel", "__version__"]
