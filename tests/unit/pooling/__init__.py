"""Unit tests of pgtwist/pooling/."""
