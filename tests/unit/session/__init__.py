"""Unit tests of pgtwist/session/."""
