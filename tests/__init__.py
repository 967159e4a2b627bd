"""Tests: unit/ mirrors pgtwist/ (a test module per module), integration/ is grouped by behaviour, harness/ is shared."""
