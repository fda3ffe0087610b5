"""``stun-server --journal FILE``: one compact JSON line per received request, bounded by rotation.

A line: ``{"t": 1733220000.123456, "trid": "F2:E8:...", "from": "198.51.100.7:40211", "to": "0.0.0.0:3478"}``
(receive time in seconds since the epoch, the transaction id as the tester
logs it, the source address and port as the server saw it, the address the
server listens on). When ``FILE`` would pass ``max_bytes`` it becomes
``FILE.1`` (replacing the previous one) and a new ``FILE`` starts, so the
journal never takes more than twice ``max_bytes``. ``stun-report`` reads
``FILE.1`` then ``FILE``.
"""

from __future__ import annotations

import os
from typing import IO

# Lines are buffered and written in blocks; a crash loses at most this much.
_BUFFER = 64 * 1024


class JournalError(OSError):
    """The journal file cannot be opened or written: the message names it and says what to do."""


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Journal:
    """Appends request records to ``path``, rotating to ``path.1`` past ``max_bytes``."""

    def __init__(self, path: str, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.written = 0
        self.rotations = 0
        self._file: IO[str] = self._open()
        self._size = self._file.tell()

    def _open(self) -> IO[str]:
        try:
            return open(self.path, "a", encoding="ascii", buffering=_BUFFER)
        except OSError as error:
            raise JournalError(
                f"--journal {self.path}: cannot write it: {error.strerror}; choose a writable path"
            ) from None

    def record(self, now: float, transaction_id: bytes, source: tuple[str, int], listening: str) -> None:
        """One received request."""
        line = '{"t":%.6f,"trid":"%s","from":"%s","to":"%s"}\n' % (
            now,
            transaction_id.hex(":").upper(),
            format_address(source[0], source[1]),
            listening,
        )
        if self._size + len(line) > self.max_bytes:
            self._rotate()
        self._file.write(line)
        self._size += len(line)
        self.written += 1

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.path + ".1")
        self.rotations += 1
        self._file = self._open()
        self._size = 0

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
