"""Operating a running pgtwist: plain-data views, operator actions, admin console, SSH manhole, metrics."""


class ManholeError(Exception):
    """The manhole cannot start as configured (missing authorized_keys, unreadable host key...)."""
