"""Unit tests of pgtwist/service/."""
