"""Client connections: the protocol that turns a client's bytes into session events, and the client's login exchange."""
