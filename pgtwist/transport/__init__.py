"""How bytes move on Twisted: the reactor pgtwist installs, writes that skip a reactor turn, TLS contexts."""
