"""Hypothesis profiles for the reliability fuzz tests.

* ``ci`` (default): a bounded, derandomized run (25 examples per property,
  fewer for the slow Triton interpreter), reproducible run to run.
* ``long``: selected by ``VQFAST_FUZZ=long`` or by setting
  ``VQFAST_FUZZ_EXAMPLES`` (examples per property, default 500); random seeds.

Count the cases run with ``pytest --hypothesis-show-statistics``.
"""
import os
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

# No example database (database=None below), and Hypothesis' other caches go to a
# temporary folder instead of ./.hypothesis in the checkout.
set_hypothesis_home_dir(os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY")
                        or os.path.join(tempfile.gettempdir(), "vqfast-hypothesis"))

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("VQFAST_FUZZ_EXAMPLES") or 500),
                          derandomize=False, **_COMMON)

LONG = os.environ.get("VQFAST_FUZZ") == "long" or bool(os.environ.get("VQFAST_FUZZ_EXAMPLES"))
settings.load_profile("long" if LONG else "ci")
