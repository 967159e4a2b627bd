"""Routing: statement classification (routing.classify) and node choice (routing.policy), both pure.

Nothing is re-exported here: a package attribute ``classify`` would shadow the module of that name.
"""
