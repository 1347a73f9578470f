"""Hypothesis settings for the test suite; import this module before using ``@given``.

Under trial there is no per-example deadline that means anything (a shared CI
runner stalls now and then), so ``deadline=None``.  ``ci`` is loaded by
default; ``HYPOTHESIS_PROFILE=thorough`` runs many more examples, e.g.
``HYPOTHESIS_PROFILE=thorough python -m twisted.trial tests``.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", deadline=None, max_examples=100, print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=5000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
