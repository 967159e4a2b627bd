"""Unit tests of pgtwist/tools/."""
