"""Unit tests of pgtwist/transport/."""
