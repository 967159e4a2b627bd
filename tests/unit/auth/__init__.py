"""Unit tests of pgtwist/auth/."""
