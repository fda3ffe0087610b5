"""DTLS Connection-ID cluster: management records, CID router, node table, discovery."""
