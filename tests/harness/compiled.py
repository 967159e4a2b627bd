"""The form of the core under test (pgtwist/compiled.py), and the mark for tests only the pure form takes.

A few unit tests put a stand-in where the core's annotations name its own class (a session
without the session), or patch a method of one of its classes: the compiled form checks the
first and refuses the second. They run in the pure pass of `./dev test` (PGTWIST_PURE=1), which
runs the same code; everything else runs in both.
"""

import pytest

from pgtwist import compiled

pure_only = pytest.mark.skipif(
    compiled.FORM == "compiled", reason="a stand-in or a patch the compiled core refuses: runs in the pure pass (PGTWIST_PURE=1)"
)
