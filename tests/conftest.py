import os

from hypothesis import HealthCheck, settings

# Thousands of examples in the nightly/profile run (HYPOTHESIS_PROFILE=thorough); CI keeps the suite short.
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
