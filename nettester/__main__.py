"""``python -m nettester <role> [options]``, the same as the console script."""

from nettester.cli import main

main()
