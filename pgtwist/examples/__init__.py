"""The example configuration (etc/pgbalance.toml), installed with the package so `pgtwist --help` can point at it."""
