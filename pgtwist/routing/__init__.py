"""Routing: one SQL analysis (routing.analysis), node choice (routing.policy, pure) and the per-database router.

Nothing is re-exported here: a package attribute ``classify`` would shadow a function's module.
"""
