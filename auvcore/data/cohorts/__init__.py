"""Small labelled CT and MR cohorts with known defects, built offline from real volumes.

``sources`` (the real volumes and each source's ranges and anatomy) -> ``variation`` (one realistic case
from the source) -> ``corruptions`` (what an annotator gets wrong: the label) and ``degradations`` (what goes
wrong with an acquisition: the image) -> ``builder`` (``build_demo``: the cohort, its record and its layout).
"""
from .builder import BUILDER_VERSION, build_demo
from .corruptions import DEFAULT_KINDS, KINDS, STRENGTHS
from .degradations import DEGRADATIONS
from .sources import (MRICRON_DEFAULT, MRICRON_ENV, MRICRON_INSTALL, PYRADIOMICS_DOWNLOAD, PYRADIOMICS_ENV, SOURCES,
                      describe, load_source, mricron_templates)

__all__ = ["build_demo", "BUILDER_VERSION", "SOURCES", "KINDS", "DEFAULT_KINDS", "STRENGTHS", "DEGRADATIONS",
           "describe", "load_source", "mricron_templates", "PYRADIOMICS_ENV", "PYRADIOMICS_DOWNLOAD", "MRICRON_ENV",
           "MRICRON_DEFAULT", "MRICRON_INSTALL"]
