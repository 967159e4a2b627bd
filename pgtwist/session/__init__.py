"""One client's session: its state machine, where its work runs (placement), and replies the proxy gives in a node's place."""
