"""Data for cross-domain and few-shot anomaly detection: few-shot sampling, cross-domain datamodules, depth images.

- Few-shot: :func:`select_shots`, :func:`few_shot_subset`, :class:`FewShot` (wraps any anomalib datamodule).
- Cross-domain: :class:`CrossDomainDataModule` (any two datamodules), :class:`MVTec3DCrossDomain` and
  :class:`MVTec3DDomain` (MVTec 3D-AD layout, RGB and depth), :class:`XYZFolder` (predict on raw point clouds).
- Depth rendering (:mod:`.depth`) and the built-in synthetic MVTec 3D-AD-style dataset (:mod:`.synthetic`).
"""

from anomalib_hypergraph.data.cross_domain import CrossDomainDataModule, MVTec3DCrossDomain, MVTec3DDomain, XYZFolder
from anomalib_hypergraph.data.depth import XYZFormatError, read_xyz, render_depth_image, xyz_to_depth
from anomalib_hypergraph.data.few_shot import FewShot, few_shot_subset, select_shots
from anomalib_hypergraph.data.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec3d

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "CrossDomainDataModule",
    "FewShot",
    "MVTec3DCrossDomain",
    "MVTec3DDomain",
    "XYZFolder",
    "XYZFormatError",
    "few_shot_subset",
    "generate_synthetic_mvtec3d",
    "read_xyz",
    "render_depth_image",
    "select_shots",
    "xyz_to_depth",
]
