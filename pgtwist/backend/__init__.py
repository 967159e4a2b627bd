"""Connections to PostgreSQL nodes: the protocol, one server connection's life, its login, cancel delivery."""
