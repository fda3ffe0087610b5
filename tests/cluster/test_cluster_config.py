"""Californium's cluster option syntax: static, dynamic, Kubernetes; secrets; clear errors."""

from __future__ import annotations

import base64
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.python.usage import UsageError

from nettester.cluster.config import (
    ClusterConfig,
    ClusterOptionsMixin,
    cluster_config,
    k8s_node_id,
    parse_dtls_cluster,
    parse_group,
    parse_k8s_cluster,
)
from nettester.options import RoleOptions


class DemoOptions(ClusterOptionsMixin, RoleOptions):
    post_options_called: ClassVar[list[bool]] = []

    def postOptions(self) -> None:
        super().postOptions()
        self.post_options_called.append(True)


def values(**given: Any) -> dict[str, Any]:
    base = {"dtls-cluster": "", "dtls-cluster-group": "", "k8s-dtls-cluster": "",
            "dtls-cluster-group-security": "", "no-dtls-cluster-backward": 0}
    base.update({key.replace("_", "-"): value for key, value in given.items()})
    return base


def test_static_cluster_of_californias_example() -> None:
    assert parse_dtls_cluster(":15784;localhost:15884;1,---;localhost:25884;2") == (
        1, ("", 15784), ("localhost", 15884), {2: ("localhost", 25884)}
    )
    config = cluster_config(values(dtls_cluster=":15784;localhost:15884;1,---;localhost:25884;2,---;[::1]:35884;3"),
                            {}, "host")
    assert config == ClusterConfig("static", 1, ("", 15784), ("localhost", 15884),
                                   nodes={2: ("localhost", 25884), 3: ("::1", 35884)})


def test_dynamic_cluster() -> None:
    config = cluster_config(values(dtls_cluster=":15784;localhost:15884;1",
                                   dtls_cluster_group="localhost:15884,localhost:25884"), {}, "host")
    assert config is not None and config.mode == "dynamic"
    assert config.group == (("localhost", 15884), ("localhost", 25884))
    assert parse_group("a:1, b:2,") == (("a", 1), ("b", 2))


def test_k8s_cluster_node_id_from_env_or_ordinal() -> None:
    assert parse_k8s_cluster(":5784;:5884;5884") == (("", 5784), ("", 5884), 5884)
    config = cluster_config(values(k8s_dtls_cluster=":5784;:5884;5884"), {}, "coap-cluster-2")
    assert config is not None and (config.mode, config.node_id, config.external_management_port) == ("k8s", 2, 5884)
    assert k8s_node_id({"KUBECTL_NODE_ID": "7"}, "coap-cluster-2") == 7
    with pytest.raises(ValueError, match="set KUBECTL_NODE_ID"):
        k8s_node_id({}, "laptop")
    with pytest.raises(ValueError, match="KUBECTL_NODE_ID: expected a node id 0-255"):
        k8s_node_id({"KUBECTL_NODE_ID": "300"}, "x-1")


def test_secret_from_option_or_base64_env() -> None:
    config = cluster_config(values(dtls_cluster=":1;:2;1", dtls_cluster_group_security="pw"), {}, "h")
    assert config is not None and config.secret == b"pw"
    env = {"DTLS_CID_MGMT_SECRET_BASE64": base64.b64encode(b"\x00\x01secret").decode()}
    config = cluster_config(values(dtls_cluster=":1;:2;1"), env, "h")
    assert config is not None and config.secret == b"\x00\x01secret"
    with pytest.raises(ValueError, match="not valid base64"):
        cluster_config(values(dtls_cluster=":1;:2;1"), {"DTLS_CID_MGMT_SECRET_BASE64": "%%%"}, "h")
    config = cluster_config(values(dtls_cluster=":1;:2;1", no_dtls_cluster_backward=1), {}, "h")
    assert config is not None and config.backward is False and config.secret is None


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"dtls_cluster": ":1;:2"}, "entry 1 ':1;:2': expected <dtls-interface>;<mgmt-interface>;<node-id>"),
        ({"dtls_cluster": ":1;:2;x"}, "expected a node id 0-255, got 'x'"),
        ({"dtls_cluster": ":1;:2;256"}, "expected a node id 0-255"),
        ({"dtls_cluster": "---;a:2;1"}, "no own entry"),
        ({"dtls_cluster": ":1;:2;1,:3;:4;2"}, "a second own entry"),
        ({"dtls_cluster": ":1;:2;1,---;b:2;1"}, "node id 1 appears twice"),
        ({"dtls_cluster": ":1;:2;1,---;b;2"}, "entry 2 '---;b;2': expected host:port"),
        ({"dtls_cluster": ":x;:2;1"}, "dtls interface: expected host:port"),
        ({"dtls_cluster_group": "a:1"}, "--dtls-cluster-group needs --dtls-cluster"),
        ({"dtls_cluster": ":1;:2;1", "k8s_dtls_cluster": ":1;:2;3"}, "not both"),
        ({"dtls_cluster": ":1;:2;1,---;b:2;2", "dtls_cluster_group": "a:1"}, "only this node's own"),
        ({"dtls_cluster": ":1;:2;1", "dtls_cluster_group": ","}, "--dtls-cluster-group: expected at least one"),
        ({"k8s_dtls_cluster": ":1;:2"}, "expected <dtls-interface>;<mgmt-interface>;<external-mgmt-port>"),
        ({"k8s_dtls_cluster": ":1;:2;0"}, "external management port: expected 1-65535"),
    ],
)
def test_errors_say_what_is_wrong(given: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        cluster_config(values(**given), {}, "node-1")
    assert message in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(":;,-[]0123456789abc. ")), max_size=40))
def test_any_cluster_text_parses_or_raises_value_error(text: str) -> None:
    for option in ("dtls_cluster", "k8s_dtls_cluster"):
        try:
            cluster_config(values(**{option: text}), {}, "node-3")
        except ValueError:
            pass


def test_mixin_in_role_options(monkeypatch: pytest.MonkeyPatch) -> None:
    options = DemoOptions()
    options.parseOptions(["--dtls-cluster", ":15784;localhost:15884;1,---;localhost:25884;2"])
    assert options["cluster"].nodes == {2: ("localhost", 25884)} and options.post_options_called
    plain = DemoOptions()
    plain.parseOptions([])
    assert plain["cluster"] is None
    with pytest.raises(UsageError, match="--dtls-cluster: entry 1"):
        DemoOptions().parseOptions(["--dtls-cluster", "nonsense"])
    monkeypatch.setenv("K8S_DTLS_CLUSTER", ":5784;:5884;5884")
    monkeypatch.setenv("KUBECTL_NODE_ID", "4")
    options = DemoOptions()
    options.parseOptions([])
    assert options["cluster"].mode == "k8s" and options["cluster"].node_id == 4
