"""Unit tests of pgtwist/cluster/."""
