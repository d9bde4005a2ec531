"""Hypothesis profiles for the reliability fuzz tests.

* ``ci`` (default): a bounded, derandomized run (25 examples per property,
  fewer for the slow Triton interpreter), reproducible run to run.
* ``long``: selected by ``VQFAST_FUZZ=long`` or by setting
  ``VQFAST_FUZZ_EXAMPLES`` (examples per property, default 500); random seeds.

The number of examples each property ran to completion is printed at the end of
the session (and written as JSON to ``$VQFAST_FUZZ_REPORT`` when set); per-phase
detail with ``pytest --hypothesis-show-statistics``.
"""
import json
import os
import sys
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


def pytest_terminal_summary(terminalreporter):
    fuzz = sys.modules.get("tests.reliability.test_fuzz")
    if fuzz is None or not fuzz.EXAMPLES_RUN:
        return
    counts = dict(sorted(fuzz.EXAMPLES_RUN.items()))
    profile = "long" if LONG else "ci"
    terminalreporter.write_sep("-", f"hypothesis examples run (profile {profile})")
    for name, n in counts.items():
        terminalreporter.write_line(f"{n:6d}  {name}")
    terminalreporter.write_line(f"{sum(counts.values()):6d}  total")
    path = os.environ.get("VQFAST_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"profile": profile, "examples_run": counts, "total": sum(counts.values())}, f, indent=2)
