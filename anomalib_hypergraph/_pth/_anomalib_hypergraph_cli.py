"""Make the stock ``anomalib`` command know anomalib-hypergraph's models.

anomalib 2.x has no plugin registry: ``anomalib train --model NAME`` only resolves ``AnomalibModule`` subclasses
that are already imported when its argument parser is built. Python runs this module at start-up through the
``anomalib_hypergraph_cli.pth`` file installed beside it in site-packages; it imports the plugin only when the
running program is the ``anomalib`` command, so every other Python process pays nothing.
"""

import os
import sys

ANOMALIB_EXECUTABLES = frozenset({"anomalib", "anomalib.exe", "anomalib-script.py"})


def running_anomalib_cli() -> bool:
    """Whether this interpreter was started as the ``anomalib`` console script."""
    return bool(sys.argv) and os.path.basename(sys.argv[0]) in ANOMALIB_EXECUTABLES


if running_anomalib_cli():
    import anomalib_hypergraph  # noqa: F401  (importing registers the models as AnomalibModule subclasses)
