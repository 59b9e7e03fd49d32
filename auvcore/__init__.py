"""auvcore: aleatoric uncertainty of medical segmentation data sets from foundation-model features."""
from ._backend import has_cuda_kernels, has_native
from .duo import DUOLoss, NoiseHead
from .scores import AUVAccumulator, auv, keep_mask, keep_mask_per_class, sample_scale
from .scale import energy_spectrum, masked_semantic_scale, semantic_scale

__version__ = "0.1.0"

__all__ = [
    "semantic_scale",
    "masked_semantic_scale",
    "energy_spectrum",
    "sample_scale",
    "auv",
    "keep_mask",
    "keep_mask_per_class",
    "AUVAccumulator",
    "DUOLoss",
    "NoiseHead",
    "has_native",
    "has_cuda_kernels",
]
