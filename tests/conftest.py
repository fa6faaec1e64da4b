"""Shared test settings.

Hypothesis: locally it explores new random examples every run (and remembers failures
in .hypothesis/); in CI ($WEFT_HYPOTHESIS_PROFILE=ci, set by .ci/run) it is derandomized
so a run is reproducible, and no test has a per-example deadline on either, because these
machines are shared and a slow example is not a failure (timings live in `weft bench`).
"""

import os

from hypothesis import settings

settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("WEFT_HYPOTHESIS_PROFILE", "dev"))
