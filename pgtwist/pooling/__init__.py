"""Server connections shared between clients: pools, the extended-protocol relay, prepared statements, session settings."""
