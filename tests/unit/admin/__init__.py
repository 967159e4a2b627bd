"""Unit tests of pgtwist/admin/."""
