"""Unit tests of pgtwist/routing/."""
