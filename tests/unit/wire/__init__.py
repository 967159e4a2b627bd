"""Unit tests of pgtwist/wire/."""
