"""The states of a ClientSession, shared by the modules its state machine is written in."""

# IDLE exists in transaction mode only: logged in, holding no server connection.
LOGIN, IDLE, WAITING, PREPARING, LINKED, CLOSED = "login", "idle", "waiting", "preparing", "linked", "closed"
ADMIN = "admin"  # logged in to the admin console (dbname "pgbalance"): no pool, no server
