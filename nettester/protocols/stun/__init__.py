"""STUN (RFC 8489): codec, Binding server with RFC 5780 discovery, and the many-client loss tester."""
