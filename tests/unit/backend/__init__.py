"""Unit tests of pgtwist/backend/."""
