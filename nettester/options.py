"""The options every role shares, environment variables, and value checks.

Each role's options subclass ``RoleOptions``. An option listed in a class's
``envVars`` also reads the environment variable the original Kubernetes
manifests used (``TCP_SERVER_IP``, ``STUN_CLIENT_COUNT``, ``LOG_LEVEL``...);
the command line wins over the environment, the environment over the default.

``RoleOptions`` also gives every role one command line: options may follow
the positional arguments (GNU style), a few spellings are accepted as
aliases (``--interfaces`` for ``--interface`` and back), every bad value
names its option and what it expects, and ``--help`` shows defaults as a
user types them.
"""

from __future__ import annotations

import getopt
import os
import re
import sys
import textwrap
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


def percentage(value: str) -> float:
    """A percentage, 0-100 (a drop probability, a loss threshold)."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 100.0:
        raise ValueError(f"expected a percentage 0-100, got {value!r}")
    return number


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
    """A coercer accepting exactly one of ``allowed`` (case-insensitive)."""

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


# Spellings accepted for one another wherever a role has one and not the other
# (alias -> canonical name): keepalive and stun say --interface, coap --interfaces.
OPTION_ALIASES: Mapping[str, str] = {"interfaces": "interface", "interface": "interfaces"}

# What Python's own int() and float() say about a bad value, and what a user reads instead.
_BUILTIN_NUMBER_ERRORS = (
    (re.compile(r"^invalid literal for int\(\) with base \d+: (?P<value>.*)$"), "a whole number"),
    (re.compile(r"^could not convert string to float: (?P<value>.*)$"), "a number"),
)


def _user_message(error: ValueError) -> str:
    """A coercer's error as a user reads it: Python's int()/float() wording becomes what was expected."""
    text = str(error)
    for pattern, expected in _BUILTIN_NUMBER_ERRORS:
        match = pattern.match(text)
        if match is not None:
            return f"expected {expected}, got {match['value']}"
    return text


# A quoted example in a help text: 'coap://host/path' or ":5784;host:5884;1".
_QUOTED = re.compile(r"(?<!\w)('[^'\s][^']*'|\"[^\"]+\")(?!\w)")
_UNBREAKABLE_SPACE = "\u00a0"


def wrap_help(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, never split inside a quoted example or a word."""
    joined = _QUOTED.sub(lambda match: match[0].replace(" ", _UNBREAKABLE_SPACE), text)
    lines = textwrap.wrap(joined, max(width, 20), break_long_words=False, break_on_hyphens=False)
    return [line.replace(_UNBREAKABLE_SPACE, " ") for line in lines] or [""]


def default_text(value: Any) -> str | None:
    """A default as a user would write it: ``a, b`` for a sequence, nothing for an empty one or None."""
    if value is None or value == "" or (isinstance(value, (tuple, list, set, frozenset)) and not value):
        return None
    if isinstance(value, (tuple, list)):
        return ", ".join(str(item) for item in value)
    return str(value)


def flag_help(doc: str) -> str:
    """A negated flag's help as a sentence: ``Do not: listen on IPv4`` reads ``Do not listen on IPv4.``"""
    if doc.startswith("Do not: "):
        doc = "Do not " + doc[len("Do not: "):]
        return doc if doc.endswith((".", ")")) else doc + "."
    return doc


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

    # ``nettester local`` sets this: its per-connection info lines are debug detail there.
    connection_lines_at_debug: ClassVar[bool] = False
    #: False for a role that serves no ``/metrics`` (a one-shot client, a log reader): its
    #: --metrics-port is refused rather than silently ignored.
    serves_metrics: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self._clarify_coercion_errors()
        self.aliases = {alias: name for alias, name in OPTION_ALIASES.items()
                        if name in self._dispatch and alias not in self.synonyms}
        env_vars: dict[str, str] = {}
        reflect.accumulateClassDict(type(self), "envVars", env_vars)
        for name, variable in env_vars.items():
            if name in self.docs:
                self.docs[name] = f"{self.docs[name]} [env: {variable}]"
        self._apply_environment(env_vars, os.environ)

    def postOptions(self) -> None:
        if not self.serves_metrics and (self["metrics-port"] or self["metrics-interface"]):
            raise usage.UsageError("--metrics-port: this role serves no metrics (it runs once and reports at the "
                                   "end: use --report FILE or --log-format json); see --help")

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
                    raise usage.UsageError(f"--{option}: {_user_message(error)}; see --help") from None

            self._dispatch[name] = checked

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse GNU style: options may also follow the positional arguments
        (``nat :5784 host:5684 -r``, ``coap-bench URI --clients 5``), and an
        alias spelling counts as its option. ``--`` ends the options."""
        if options is None:
            options = sys.argv[1:]
        if len(options) > 1 and options[-2] == "--_shell-completion":
            super().parseOptions(options)
            return
        takes_value = {long.rstrip("="): long.endswith("=") for long in self.longOpt}
        alias_opts = [alias + ("=" if takes_value[name] else "") for alias, name in self.aliases.items()]
        try:
            pairs, positional = getopt.gnu_getopt(options, self.shortOpt, [*self.longOpt, *alias_opts])
        except getopt.GetoptError as error:
            raise usage.UsageError(f"{error}; see --help") from None
        ordered: list[str] = []
        for option, value in pairs:
            if option.startswith("--"):
                name = self.aliases.get(option[2:], option[2:])
                ordered.append(f"--{name}={value}" if takes_value[name] else f"--{name}")
            else:
                ordered.extend((option, value) if f"{option[1]}:" in self.shortOpt else (option,))
        super().parseOptions([*ordered, "--", *positional])

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

    # -- help ----------------------------------------------------------------------

    def short_flags(self) -> dict[str, str]:
        """Short flag -> the long option it stands for."""
        return {short: name for short, name in self.synonyms.items() if len(short) == 1 and short != name}

    def getUsage(self, width: int | None = None) -> str:
        """The options table: defaults written as typed, examples kept whole, flags as sentences."""
        width = width or int(os.environ.get("COLUMNS", "80"))
        long_to_short = {name: short for short, name in self.short_flags().items()}
        rows = []
        for long in sorted(self.longOpt, key=lambda long: long.rstrip("=")):
            name = long.rstrip("=")
            short = long_to_short.get(name)
            left = f"  {'-' + short + ',' if short else '   '} --{name}{'=' if long.endswith('=') else ''}"
            doc = self.docs.get(name) or ""
            if long.endswith("="):
                shown = default_text(self.defaults.get(name))
                if shown is not None:
                    doc = f"{doc} [default: {shown}]"
            else:
                doc = flag_help(doc)
            rows.append((left, doc.strip()))
        column = min(max(len(left) for left, _ in rows) + 2, 34)
        lines = ["Options:"]
        for left, doc in rows:
            text = wrap_help(doc, width - column)
            if len(left) + 2 > column:
                lines.append(left)
            else:
                lines.append(f"{left:<{column}}{text.pop(0)}".rstrip())
            lines.extend(f"{'':<{column}}{line}" for line in text)
        longdesc = getattr(self, "longdesc", "") or ""
        description = "\n" + "\n".join(wrap_help(longdesc, width)) + "\n" if longdesc else ""
        return "\n".join(lines) + "\n" + description
