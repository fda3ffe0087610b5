"""The keep-alive TCP/TLS tester: sans-IO wire core, server, client fleet, report."""
