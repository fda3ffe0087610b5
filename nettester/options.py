"""The options every role shares, environment variables, and value checks.

Each role's options subclass L{RoleOptions}. An option listed in a class's
``envVars`` also reads the environment variable the original Kubernetes
manifests used (``TCP_SERVER_IP``, ``STUN_CLIENT_COUNT``, ``LOG_LEVEL``...);
the command line wins over the environment, the environment over the default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from twisted.python import reflect, usage

import nettester
from nettester.logs import parse_level

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


def port_number(value: str) -> int:
    """A TCP/UDP port, 0-65535 (0 lets the OS choose)."""
    try:
        port = int(value)
    except ValueError:
        raise ValueError(f"expected a port number 0-65535, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"expected a port number 0-65535, got {port}")
    return port


port_number.coerceDoc = "A port number, 0-65535."  # type: ignore[attr-defined]


def _number(kind: Callable[[str], Any], minimum: float, what: str) -> Callable[[str], Any]:
    def coerce(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"expected {what}, got {value!r}") from None
        if number < minimum:
            raise ValueError(f"expected {what}, got {value!r}")
        return number

    coerce.__name__ = what.replace(" ", "_")
    return coerce


positive_int = _number(int, 1, "a whole number of at least 1")
non_negative_int = _number(int, 0, "a whole number of at least 0")
non_negative_float = _number(float, 0.0, "a number of at least 0")


def positive_float(value: str) -> float:
    """A number strictly above 0 (an interval, a timeout)."""
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise ValueError(f"expected a number above 0, got {value!r}")
    return number


def choice(*allowed: str) -> Callable[[str], str]:
    """A coercer accepting exactly one of C{allowed} (case-insensitive)."""

    def coerce(value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return lowered

    coerce.coerceDoc = f"One of: {', '.join(allowed)}."  # type: ignore[attr-defined]
    return coerce


def log_level_name(value: str) -> str:
    """Validate a log level name, keep it as given (lower case)."""
    parse_level(value)
    return value.strip().lower()


class RoleOptions(usage.Options):
    """Options shared by every role: logging, summaries and metrics."""

    longdesc = ""

    envVars: ClassVar[Mapping[str, str]] = {"log-level": "LOG_LEVEL", "log-format": "LOG_FORMAT"}

    optParameters: ClassVar[list[list[Any]]] = [
        ["log-format", None, "text", "'text' (HH:MM:SS.mmm [level] message) or 'json' (one object per line).",
         choice("text", "json")],
        ["log-level", None, "info", "debug, info, warn, error or critical.", log_level_name],
        ["stats-interval", None, 10.0, "Seconds between summary lines; 0 prints only the final one.",
         non_negative_float],
        ["metrics-port", None, 0, "Serve Prometheus metrics on http://<metrics-interface>:PORT/metrics (0 = off).",
         port_number],
        ["metrics-interface", None, "", "Interface for --metrics-port (default: all)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self._clarify_coercion_errors()
        env_vars: dict[str, str] = {}
        reflect.accumulateClassDict(type(self), "envVars", env_vars)
        for name, variable in env_vars.items():
            if name in self.docs:
                self.docs[name] = f"{self.docs[name]} [env: {variable}]"
        self._apply_environment(env_vars, os.environ)

    def _clarify_coercion_errors(self) -> None:
        """Make a bad value name its option and what was expected."""
        for name, dispatch in list(self._dispatch.items()):
            if not isinstance(dispatch, usage.CoerceParameter):
                continue
            coerce = dispatch.coerce

            def checked(option: str, value: str | None, coerce: Callable[[str], Any] = coerce) -> None:
                if value is None:
                    raise usage.UsageError(f"--{option} needs a value; see --help")
                try:
                    self.opts[option] = coerce(value)
                except ValueError as error:
                    raise usage.UsageError(f"--{option}: {error}; see --help") from None

            self._dispatch[name] = checked

    def _apply_environment(self, env_vars: Mapping[str, str], environ: Mapping[str, str]) -> None:
        flags = {flag[0] for flag in self._flags()}
        for name, variable in env_vars.items():
            raw = environ.get(variable)
            if raw is None:
                continue
            if name in flags:
                word = raw.strip().lower()
                if word not in TRUE_WORDS | FALSE_WORDS:
                    raise usage.UsageError(f"environment variable {variable}={raw!r}: expected true or false")
                self.opts[name] = 1 if word in TRUE_WORDS else 0
                continue
            try:
                self._dispatch[name](name, raw)
            except usage.UsageError as error:
                raise usage.UsageError(f"environment variable {variable}={raw!r}: {error}") from None

    def opt_version(self) -> None:
        """Display nettester's version and exit."""
        sys.stdout.write(f"nettester {nettester.__version__}\n")
        sys.exit(0)

    def _flags(self) -> list[list[Any]]:
        flags: list[list[Any]] = []
        reflect.accumulateClassList(type(self), "optFlags", flags)
        return flags
