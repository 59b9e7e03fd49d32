"""The demo cohorts' former home, kept so that ``from auvcore.data.demo import build_demo`` (and the other
names it offered) still works; the builder lives in ``auvcore.data.cohorts`` (sources, variation, label
corruptions, image degradations, builder)."""
from .cohorts import *  # noqa: F401,F403
from .cohorts import __all__  # noqa: F401
# the private names of the single module, for code written against it
from .cohorts.corruptions import applicable as _applicable, corrupt as _corrupt  # noqa: F401
from .cohorts.sources import SPECS as _SPECS, Spec as _Spec, _source_chest  # noqa: F401
from .cohorts.variation import make_case as _make_case  # noqa: F401
