"""An exchange's tags (the facts its log lines carry): a filter that tags every exchange
alike shares one dict among them, so writing goes through the exchange, which copies a
shared dict before changing it."""

from __future__ import annotations

import re
from pathlib import Path

from sidecar.exchange import Exchange
from sidecar.http.message import RequestHead

SIDECAR = Path(__file__).resolve().parents[2] / "sidecar"


def exchange() -> Exchange:
    head = RequestHead(method="GET", target=b"/", path="/", authority="a", host="a", version="1.1", headers=[])
    return Exchange(request=head, listener="inbound", downstream_address="10.0.0.1", request_id="r", start=0.0)


def test_shared_tags_are_copied_before_an_exchange_changes_them() -> None:
    decided = {"rbac_rule": "reads", "rbac": "allow"}
    one, two = exchange(), exchange()
    one.share_tags(decided)
    two.share_tags(decided)
    assert one.tags is decided and two.tags is decided  # known by identity in the access log
    one.tag_once("filter", "authz_rbac")
    one.tag("rbac", "deny")
    assert one.tags == {"rbac_rule": "reads", "rbac": "deny", "filter": "authz_rbac"}
    assert two.tags == {"rbac_rule": "reads", "rbac": "allow"} and decided == {"rbac_rule": "reads", "rbac": "allow"}


def test_shared_tags_join_the_facts_an_exchange_has_already() -> None:
    decided = {"rbac_rule": "reads", "rbac": "allow"}
    ex = exchange()
    ex.tag("authn", "jwt")
    ex.share_tags(decided)
    assert ex.tags == {"authn": "jwt", "rbac_rule": "reads", "rbac": "allow"} and ex.tags is not decided
    ex.tag_once("authn", "api_key")  # the first to say keeps it
    assert ex.tags["authn"] == "jwt" and decided == {"rbac_rule": "reads", "rbac": "allow"}


def test_no_module_writes_an_exchange_s_tags_but_through_the_exchange() -> None:
    """A write into ``tags`` itself could change a dict every exchange of a rule shares."""
    write = re.compile(r"\.tags(\[[^\]]+\]\s*=[^=]|\.(setdefault|update|pop|popitem|clear)\()")
    offenders = [f"{path.relative_to(SIDECAR)}:{n}" for path in SIDECAR.rglob("*.py") if path.name != "exchange.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if write.search(line)]
    assert offenders == []
