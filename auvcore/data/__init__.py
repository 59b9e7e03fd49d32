"""Medical volumes in: data set layouts, NIfTI/NRRD reading, RAS reorientation, resampling,
intensity windowing and the annotation-normalized image x̂ (docs/method.md §2).

Needs ``nibabel`` (NIfTI), ``pynrrd`` (NRRD) and ``scipy`` (the cohorts' corruptions and degradations; the
resampling is torch's, equal to scipy's); install them with the ``data`` extra. ``auvcore.data.cohorts``
(``build_demo``) builds small labelled CT and MR data sets with recorded label corruption or image degradation
from real volumes (``DEMO_SOURCES``: chest CT with the ``data`` extra; spine CT, spine MR and MNI152 brain MR
with the ``cohorts`` extra; see its ``sources`` for the others).
"""
from .dataset import MODALITIES, Case, Dataset, Volume, discover, load_case
from .cohorts import SOURCES as DEMO_SOURCES
from .cohorts import build_demo
from .io import read_image, resample, to_ras, voxel_spacing, write_image
from .preprocess import (
    CT_WINDOWS,
    crop_or_pad,
    foreground_bbox,
    foreground_center,
    normalized_image,
    scale_percentile,
    window_ct,
    window_named,
)

__all__ = [
    "Case", "Dataset", "Volume", "MODALITIES", "discover", "load_case",
    "read_image", "write_image", "to_ras", "resample", "voxel_spacing",
    "normalized_image", "window_ct", "window_named", "scale_percentile", "crop_or_pad",
    "foreground_bbox", "foreground_center", "CT_WINDOWS", "build_demo", "DEMO_SOURCES",
]
