"""The JSON run report: one document per run, written at the end (``--report FILE``).

Schema ``nettester-report/1`` (keys always present; times are seconds since
the epoch, durations and RTTs as named):

- ``schema``, ``role`` (``coap-bench``, ``keepalive-client``...), ``started``,
  ``ended``, ``duration_s``
- ``configuration``: the options the run used (target, clients, mode...)
- ``counters``: the role's final summary fields, the same names as its summary line
- ``loss``: ``lost_forward``, ``lost_return``, ``lost_unattributed``
- ``rtt_ms``: ``p50``, ``p90``, ``p99``... ``max``, ``samples``, or null without samples
- ``episodes``: every loss episode: ``client``, ``key``, ``start``, ``end`` (null: open
  at stop), ``direction``, ``transmissions``, ``reached`` (null: unknown), ``detail``;
  ``episodes_dropped`` counts those past the in-memory bound (still in ``loss``)
- ``series``: samples ``{"t": ..., "rtt_p50_ms": ..., "rtt_p99_ms": ..., "open_connections": ...}``
- ``marks``: ``{"t", "kind", "client", "detail"}``, kinds ``nat_mapping_change``, ``close``
  (``detail.cause``)...; ``marks_dropped``
- ``thresholds``: ``max_loss_percent``, ``max_resets`` (null: not judged)
- ``verdict``: ``passed``, ``exit_status`` (0 pass, 1 fail), ``reasons``

New keys may be added within a schema version; a key's meaning never changes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

SCHEMA = "nettester-report/1"


class ReportError(Exception):
    """A report that cannot be written or read; the message names the file and what to do."""


def write_report(path: str, document: Mapping[str, Any]) -> None:
    """Write ``document`` to ``path`` atomically (a reader never sees half a report).

    :raises ReportError: when the file cannot be written.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        text = json.dumps(document, indent=1, allow_nan=False) + "\n"
    except ValueError as error:
        raise ReportError(f"--report {path}: the report holds a value JSON cannot carry: {error}") from None
    try:
        handle, temporary = tempfile.mkstemp(prefix=".report-", suffix=".json", dir=directory)
        try:
            # mkstemp's file is 0600: give the report the mode open() would (0666 less the umask), so a CI
            # job's artifact collector or `nettester plot` in a container can read it as another user.
            os.fchmod(handle, 0o666 & ~_umask())
            with os.fdopen(handle, "w") as stream:
                stream.write(text)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:
        raise ReportError(f"--report {path}: cannot write it: {error.strerror or error}; "
                          "choose a writable path") from None


def _umask() -> int:
    """The process's umask (reading it means setting it: it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_report(path: str) -> dict[str, Any]:
    """A report written by :func:`write_report`.

    :raises ReportError: naming ``path`` when it is unreadable, not JSON or not a nettester report.
    """
    try:
        with open(path) as stream:
            document = json.load(stream)
    except OSError as error:
        raise ReportError(f"{path}: cannot read it: {error.strerror or error}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: not a JSON document ({error}); give a file written by --report") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        found = document.get("schema") if isinstance(document, dict) else type(document).__name__
        raise ReportError(f"{path}: not a nettester report (schema {found!r}, expected {SCHEMA!r}); "
                          "give a file written by --report")
    return document
