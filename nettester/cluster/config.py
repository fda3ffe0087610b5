"""Cluster options in Californium's syntax, for any role serving DTLS.

- static: ``--dtls-cluster ":15784;localhost:15884;1,---;localhost:25884;2"``,
  entries ``<dtls-interface>;<mgmt-interface>;<node-id>``; ``---`` instead of
  the DTLS interface marks another node (only its management address matters).
- dynamic: ``--dtls-cluster ":15784;localhost:15884;1"`` (one own entry) and
  ``--dtls-cluster-group "localhost:15884,localhost:25884"``.
- Kubernetes: ``--k8s-dtls-cluster ":5784;:5884;5884"`` (DTLS interface,
  management interface, the management port other pods reach); the node id
  comes from ``KUBECTL_NODE_ID`` or the StatefulSet ordinal of the host name.

:class:`ClusterOptionsMixin` adds these options to a role's options class; after
parsing, ``options["cluster"]`` is a :class:`ClusterConfig` or None.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from twisted.python import usage

from nettester.addresses import parse_host_port

Address = tuple[str, int]

OTHER_NODE = "---"
SECRET_ENV = "DTLS_CID_MGMT_SECRET_BASE64"
_ORDINAL = re.compile(r"-(\d+)$")


@dataclass(frozen=True)
class ClusterConfig:
    """One node's cluster configuration, whatever the mode.

    :ivar mode: ``static``, ``dynamic`` or ``k8s``.
    :ivar dtls_address: (interface, port) of the public DTLS socket ("" = any).
    :ivar management_address: (interface, port) of the management socket.
    :ivar nodes: static mode: every other node id -> management (host, port).
    :ivar group: dynamic mode: the group's management addresses.
    :ivar external_management_port: k8s mode: the port other pods send to.
    """

    mode: str
    node_id: int
    dtls_address: Address
    management_address: Address
    nodes: Mapping[int, Address] = field(default_factory=dict)
    group: tuple[Address, ...] = ()
    external_management_port: int | None = None
    secret: bytes | None = None
    backward: bool = True


def _node_id(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 255:
        raise ValueError(f"expected a node id 0-255, got {text!r}")
    return int(text)


def _interface(text: str, what: str) -> Address:
    try:
        return parse_host_port(text, default_host="", lowest_port=0)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def parse_dtls_cluster(text: str) -> tuple[int, Address, Address, dict[int, Address]]:
    """``--dtls-cluster``: (own node id, own DTLS address, own management address, other nodes).

    :raises ValueError: saying which entry is wrong and why.
    """
    own: tuple[int, Address, Address] | None = None
    others: dict[int, Address] = {}
    for number, entry in enumerate(text.split(","), start=1):
        parts = [part.strip() for part in entry.split(";")]
        if len(parts) != 3:
            raise ValueError(f"entry {number} {entry!r}: expected <dtls-interface>;<mgmt-interface>;<node-id>")
        dtls, management, node_text = parts
        try:
            node_id = _node_id(node_text)
            if node_id in others or (own is not None and own[0] == node_id):
                raise ValueError(f"node id {node_id} appears twice")
            if dtls == OTHER_NODE:
                others[node_id] = parse_host_port(management)
                continue
            if own is not None:
                raise ValueError(f"a second own entry; mark other nodes with {OTHER_NODE!r}")
            own = (node_id, _interface(dtls, "dtls interface"), _interface(management, "management interface"))
        except ValueError as error:
            raise ValueError(f"entry {number} {entry!r}: {error}") from None
    if own is None:
        raise ValueError(f"no own entry: one entry must name this node's DTLS interface instead of {OTHER_NODE!r}")
    return own[0], own[1], own[2], others


def parse_group(text: str) -> tuple[Address, ...]:
    """``--dtls-cluster-group``: comma-separated management ``host:port`` addresses."""
    addresses = tuple(parse_host_port(part) for part in text.split(",") if part.strip())
    if not addresses:
        raise ValueError("expected at least one host:port")
    return addresses


def parse_k8s_cluster(text: str) -> tuple[Address, Address, int]:
    """``--k8s-dtls-cluster``: (DTLS address, management address, external management port)."""
    parts = [part.strip() for part in text.split(";")]
    if len(parts) != 3:
        raise ValueError(f"expected <dtls-interface>;<mgmt-interface>;<external-mgmt-port>, got {text!r}")
    dtls = _interface(parts[0], "dtls interface")
    management = _interface(parts[1], "management interface")
    if not (parts[2].isascii() and parts[2].isdigit()) or not 0 < int(parts[2]) <= 65535:
        raise ValueError(f"external management port: expected 1-65535, got {parts[2]!r}")
    return dtls, management, int(parts[2])


def k8s_node_id(environ: Mapping[str, str], hostname: str) -> int:
    """``KUBECTL_NODE_ID``, else the StatefulSet ordinal ending the host name (``cf-2`` -> 2)."""
    explicit = environ.get("KUBECTL_NODE_ID")
    if explicit:
        try:
            return _node_id(explicit.strip())
        except ValueError as error:
            raise ValueError(f"KUBECTL_NODE_ID: {error}") from None
    match = _ORDINAL.search(hostname)
    if match is None:
        raise ValueError(
            f"no node id: set KUBECTL_NODE_ID, or run in a StatefulSet (host name {hostname!r} has no -<ordinal>)"
        )
    return _node_id(match.group(1))


def group_secret(option: str | None, encoded: str) -> bytes | None:
    """The group secret: the option's text (UTF-8), else the base64 form (option or env variable), else None."""
    if option:
        return option.encode("utf-8")
    encoded = encoded.strip()
    if not encoded:
        return None
    try:
        secret = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError(f"{SECRET_ENV} is not valid base64") from None
    if not secret:
        raise ValueError(f"{SECRET_ENV} decodes to an empty secret")
    return secret


class ClusterOptionsMixin:
    """Cluster options for a RoleOptions subclass: ``class O(ClusterOptionsMixin, RoleOptions)``.

    Its ``postOptions`` sets ``self["cluster"]`` (a :class:`ClusterConfig` or None)
    and then calls the next class's ``postOptions``.
    """

    optFlags: ClassVar[list[list[Any]]] = [
        ["no-dtls-cluster-backward", None, "Forwarded requests are answered directly by the owner node, "
                                           "not sent back through the node that received them."],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["dtls-cluster", None, "", "Static or dynamic DTLS CID cluster, Californium's syntax: "
                                   "\":15784;localhost:15884;1,---;localhost:25884;2\"."],
        ["dtls-cluster-group", None, "", "Dynamic cluster: management addresses of the group, "
                                         "\"localhost:15884,localhost:25884\"."],
        ["k8s-dtls-cluster", None, "",
         "Kubernetes cluster: \"<dtls-interface>;<mgmt-interface>;<external-mgmt-port>\", e.g. \":5784;:5884;5884\"."],
        ["dtls-cluster-group-security", None, "", "Secret authenticating management records and encrypting the "
                                                  "session snapshots that let a node take over a lost node's "
                                                  f"sessions (dynamic and k8s mode) (else env {SECRET_ENV})."],
        ["dtls-cluster-group-security-base64", None, "", "The same secret, base64; prefer its environment variable "
                                                         f"{SECRET_ENV}: a command line shows in ps."],
    ]
    envVars: ClassVar[dict[str, str]] = {
        "dtls-cluster": "DTLS_CLUSTER",
        "dtls-cluster-group": "DTLS_CLUSTER_GROUP",
        "k8s-dtls-cluster": "K8S_DTLS_CLUSTER",
        "no-dtls-cluster-backward": "DTLS_CLUSTER_NO_BACKWARD",
        "dtls-cluster-group-security-base64": SECRET_ENV,
    }

    def postOptions(self) -> None:
        try:
            self["cluster"] = cluster_config(cast("Mapping[str, Any]", self), os.environ, socket.gethostname())  # type: ignore[index]
        except ValueError as error:
            raise usage.UsageError(f"{error}; see --help") from None
        super().postOptions()  # type: ignore[misc]


def cluster_config(options: Mapping[str, Any], environ: Mapping[str, str], hostname: str) -> ClusterConfig | None:
    """Build the :class:`ClusterConfig` from parsed option values (None without a cluster option)."""
    static_text, group_text = options["dtls-cluster"], options["dtls-cluster-group"]
    k8s_text = options["k8s-dtls-cluster"]
    if not (static_text or k8s_text):
        if group_text:
            raise ValueError("--dtls-cluster-group needs --dtls-cluster with this node's own entry")
        return None
    if static_text and k8s_text:
        raise ValueError("use --dtls-cluster or --k8s-dtls-cluster, not both")
    encoded = options.get("dtls-cluster-group-security-base64") or environ.get(SECRET_ENV, "")
    secret = group_secret(options["dtls-cluster-group-security"] or None, encoded)
    backward = not options["no-dtls-cluster-backward"]
    if k8s_text:
        if group_text:
            raise ValueError("--k8s-dtls-cluster finds its group itself; drop --dtls-cluster-group")
        dtls, management, external = parse_k8s_cluster(k8s_text)
        return ClusterConfig("k8s", k8s_node_id(environ, hostname), dtls, management,
                             external_management_port=external, secret=secret, backward=backward)
    try:
        node_id, dtls, management, others = parse_dtls_cluster(static_text)
    except ValueError as error:
        raise ValueError(f"--dtls-cluster: {error}") from None
    if not group_text:
        return ClusterConfig("static", node_id, dtls, management, nodes=others, secret=secret, backward=backward)
    if others:
        raise ValueError("a dynamic cluster (--dtls-cluster-group) takes only this node's own --dtls-cluster entry")
    try:
        group = parse_group(group_text)
    except ValueError as error:
        raise ValueError(f"--dtls-cluster-group: {error}") from None
    return ClusterConfig("dynamic", node_id, dtls, management, group=group, secret=secret, backward=backward)
