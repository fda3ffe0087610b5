"""Sans-IO observe (RFC 7641): the server's relations and the rules both sides apply.

The message layer sends the notifications (``CoapLayer.notify``); this module
holds what observe itself decides (the relation, ``ObserveRelation``, is a
handle in ``exchanges.py``):

- ``notification_for``: the Observe number of the next notification,
  and the 4.06 that ends a relation whose representation format changed
  (section 4.2);
- ``confirm_now``: when a NON notification turns CON so that an observer
  that went away is noticed (section 4.5);
"""

from __future__ import annotations

from nettester.protocols.coap.exchanges import ObserveRelation
from nettester.protocols.coap.message import Code, Message, OptionNumber

# RFC 7641 section 4.4: the Observe sequence number is 24 bits.
OBSERVE_MODULO = 1 << 24


def notification_for(relation: ObserveRelation, notification: Message, final: bool = False) -> bool:
    """Number ``notification`` for ``relation`` in place; True when it ends the relation.

    A non-2.xx notification, or one ``final`` by the server's choice, carries
    no Observe option and ends the relation (sections 3.2 and 4.2). A 2.xx in
    another Content-Format than the registration's becomes 4.06 Not
    Acceptable, which ends it too (section 4.2: "the server ... SHOULD send a
    notification with a 4.06 response code and subsequently MUST remove the
    associated entry").
    """
    if notification.code >> 5 == 2 and relation.content_format is not None:
        content_format = notification.content_format
        if content_format is not None and content_format != relation.content_format:
            notification.code = Code.NOT_ACCEPTABLE
            notification.payload = b""
            notification.options = []
    if final or notification.code >> 5 != 2:
        notification.remove_option(OptionNumber.OBSERVE)
        return True
    relation.sequence = (relation.sequence + 1) % OBSERVE_MODULO
    notification.set_uint_option(OptionNumber.OBSERVE, relation.sequence)
    return False


def confirm_now(relation: ObserveRelation, now: float, check_count: int, check_interval: float) -> bool:
    """Whether a NON notification must go CON this time (RFC 7641 section 4.5)."""
    return relation._non_in_a_row + 1 >= check_count or now - relation._last_con >= check_interval
