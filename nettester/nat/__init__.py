"""NAT / UDP load-balancer emulator: sans-IO table, Twisted UDP proxy, console."""
