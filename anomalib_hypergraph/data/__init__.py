"""Data for cross-domain and few-shot anomaly detection: few-shot sampling, cross-domain datamodules, depth images.

- Few-shot: :func:`select_shots`, :func:`few_shot_subset`, :class:`FewShot` (wraps any anomalib datamodule).
- Cross-domain: :class:`CrossDomainDataModule` (any two datamodules; the batch contract is in :mod:`.domains`).
- MVTec 3D-AD layout (:mod:`.mvtec3d`): :class:`MVTec3DCrossDomain` and :class:`MVTec3DDomain` (RGB and depth).
- :class:`XYZFolder` (:mod:`.xyz_folder`): predict on raw point clouds.
- Depth rendering (:mod:`.depth`), the depth cache (:mod:`.depth_cache`), image checks and 16-bit reading
  (:mod:`.image_files`), and the built-in synthetic MVTec 3D-AD-style dataset (:mod:`.synthetic`).
"""

from anomalib_hypergraph.data.cross_domain import CrossDomainDataModule
from anomalib_hypergraph.data.depth import XYZFormatError, read_xyz, render_depth_image, xyz_to_depth
from anomalib_hypergraph.data.few_shot import FewShot, few_shot_subset, select_shots
from anomalib_hypergraph.data.image_files import ImageFileError
from anomalib_hypergraph.data.mvtec3d import MVTec3DCrossDomain, MVTec3DDomain
from anomalib_hypergraph.data.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec3d
from anomalib_hypergraph.data.xyz_folder import XYZFolder

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "CrossDomainDataModule",
    "FewShot",
    "ImageFileError",
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
