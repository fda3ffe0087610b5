"""The coap roles take their DTLS and cluster options from the shared mixins (issues 4, 5, 6)."""

from __future__ import annotations

import base64

import pytest
from twisted.python import usage

from nettester.options import RoleOptions
from nettester.protocols.coap.options import (
    CoapBenchOptions,
    CoapClientOptions,
    CoapReceiveTestOptions,
    CoapServerOptions,
)
from nettester.protocols.dtls.connection import ClientAuth

CLUSTER = ":15784;localhost:15884;3,---;localhost:25884;2"


def parse(options_class: type[RoleOptions], *arguments: str) -> RoleOptions:
    options = options_class()
    options.parseOptions(list(arguments))
    return options


def test_server_without_credentials_serves_plain_coap_only() -> None:
    options = parse(CoapServerOptions)
    assert options["dtls"] is None and options["cluster"] is None


def test_server_dtls_options_of_issue_4() -> None:
    options = parse(CoapServerOptions, "--psk-sandbox", "--cid-length", "8", "--max-connections", "50",
                    "--client-auth", "NONE")
    dtls = options["dtls"]
    assert dtls.psk_store.lookup(b"Client_identity") == b"secretPSK"
    assert dtls.cid_generator.length == 8 and dtls.cid_generator.node_id == 0
    assert options["max-connections"] == 50 and dtls.client_auth is ClientAuth.NONE


def test_server_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTLS_PSK_SANDBOX", "true")
    monkeypatch.setenv("DTLS_MAX_CONNECTIONS", "77")
    monkeypatch.setenv("DTLS_CID_LENGTH", "7")
    monkeypatch.setenv("DTLS_CLUSTER", CLUSTER)
    monkeypatch.setenv("DTLS_CID_MGMT_SECRET_BASE64", base64.b64encode(b"group secret").decode())
    monkeypatch.setenv("COAP_READY_PORT", "8080")
    options = parse(CoapServerOptions)
    assert options["max-connections"] == 77 and options["ready-port"] == 8080
    assert options["cluster"].node_id == 3 and options["cluster"].secret == b"group secret"
    # Cluster mode: the CIDs start with this node's id.
    assert options["dtls"].cid_generator.node_id == 3 and options["dtls"].cid_generator.length == 7
    # The command line wins over the environment.
    assert parse(CoapServerOptions, "--max-connections", "5")["max-connections"] == 5


def test_cluster_modes_and_flags() -> None:
    options = parse(CoapServerOptions, "--psk-sandbox", "--dtls-cluster", ":15784;localhost:15884;1",
                    "--dtls-cluster-group", "localhost:15884,localhost:25884",
                    "--dtls-cluster-group-security", "pw", "--no-dtls-cluster-backward")
    cluster = options["cluster"]
    assert (cluster.mode, cluster.node_id, cluster.secret, cluster.backward) == ("dynamic", 1, b"pw", False)
    assert cluster.group == (("localhost", 15884), ("localhost", 25884))


@pytest.mark.parametrize("arguments,message", [
    (["--dtls-cluster", CLUSTER], "a DTLS cluster serves coaps"),
    (["--psk-sandbox", "--cid-length", "5", "--dtls-cluster", CLUSTER], "at least 6 bytes"),
    (["--psk-sandbox", "--cid-length", "0", "--dtls-cluster", CLUSTER], "at least 6 bytes"),
    (["--psk-sandbox", "--dtls-cluster", "nonsense"], "--dtls-cluster: entry 1"),
    (["--dtls-only"], "--dtls-only needs"),
    (["--cert", "c.pem"], "--cert and --key go together"),
    (["--psk-sandbox", "--client-auth", "sometimes"], "--client-auth"),
    (["--psk-file", "/nonexistent/psk.txt"], "psk.txt"),
    (["--ready-port", "-1"], "--ready-port"),
])
def test_server_errors_say_what_to_do(arguments: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        parse(CoapServerOptions, *arguments)


@pytest.mark.parametrize("options_class", [CoapClientOptions, CoapBenchOptions, CoapReceiveTestOptions])
def test_client_roles_share_the_dtls_client_options(options_class: type[RoleOptions],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "coaps://127.0.0.1:5784/requests"
    options = parse(options_class, "--identity", "dev", "--secret", "hex:0102", "--cid-length", "4", uri)
    assert (options["dtls"].psk_identity, options["dtls"].psk, options["dtls"].cid_length) == (b"dev", b"\1\2", 4)
    assert parse(options_class, "--psk-sandbox", uri)["dtls"].psk_identity == b"Client_identity"
    assert parse(options_class, "--identity", "dev", "--secret", "s", "coap://127.0.0.1/requests")["dtls"] is None
    monkeypatch.setenv("DTLS_PSK_IDENTITY", "from-env")
    monkeypatch.setenv("DTLS_PSK_SECRET", "base64:c2VjcmV0")
    assert parse(options_class, uri)["dtls"].psk == b"secret"
    monkeypatch.delenv("DTLS_PSK_IDENTITY")
    monkeypatch.delenv("DTLS_PSK_SECRET")
    with pytest.raises(usage.UsageError, match="--identity/--secret"):
        parse(options_class, uri)
    with pytest.raises(usage.UsageError, match="--identity and --secret go together"):
        parse(options_class, "--identity", "dev", uri)
    with pytest.raises(usage.UsageError, match="--cert and --key go together"):
        parse(options_class, "--cert", "c.pem", uri)
