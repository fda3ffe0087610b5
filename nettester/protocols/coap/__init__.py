"""CoAP (RFC 7252, 7959, 7641, 6690): codec, sans-IO layers and Twisted endpoint."""
