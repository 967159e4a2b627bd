"""Unit tests of pgtwist/frontend/."""
