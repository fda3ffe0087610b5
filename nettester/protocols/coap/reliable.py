"""The CoAP message layer over a reliable transport (RFC 8323): no CON/ACK, no message ids, no deduplication.

``ReliableCoapLayer`` is ``CoapLayer`` for messages that arrive decoded, in
order and once (``receive_message``, fed by ``tcp.CoapStream``). Everything
above the message layer is shared: token matching, block-wise, observe,
4.02 for unsupported critical options. Requests and notifications go as
NON so nothing is ever retransmitted; the stream adapter drops type and
message id when it frames them (RFC 8323 section 3.2). BERT (section 6)
uploads are reassembled; BERT downloads are served in 1024-byte blocks.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import replace

from nettester.protocols.coap.exchanges import IncomingRequest, ObserveRelation, OutgoingRequest
from nettester.protocols.coap.layer import CoapLayer
from nettester.protocols.coap.message import NON, Code, Message, OptionNumber, Peer, encode_block, is_request
from nettester.protocols.coap.parameters import TransmissionParameters

#: RFC 8323 section 6: SZX 7 is BERT (blocks of multiples of 1024 bytes).
BERT_SZX = 7


class ReliableCoapLayer(CoapLayer):
    """One sans-IO CoAP endpoint whose peers are reliable connections (TCP, TLS)."""

    def __init__(self, now: float, params: TransmissionParameters | None = None,
                 rng: random.Random | None = None) -> None:
        # RFC 8323 section 7: notifications are never confirmable, so no CON check-ups either.
        params = replace(params or TransmissionParameters(), notification_check_count=sys.maxsize,
                         notification_check_interval=math.inf)
        super().__init__(now, params, rng)
        self._block1_uploads.bert = True  # RFC 8323 section 6

    def receive_message(self, message: Message, peer: Peer, now: float, datagram: bytes | None = None) -> None:
        """One request or response from ``peer``'s stream (a stream delivers once: no deduplication).

        ``datagram``: a request's bytes as ``tcp.as_datagram`` gives them; with them a static answer
        is remembered for ``static_frame``.
        """
        self.stats.received += 1
        if is_request(message.code):
            block2 = message.block2
            if block2 is not None and block2.szx == BERT_SZX:
                # RFC 8323 section 6 BERT asked for: answered with 1024-byte blocks, the
                # same offsets (RFC 7959 section 2.4 lets a server choose a smaller size).
                message.set_option(OptionNumber.BLOCK2, encode_block(block2.num, block2.more, 6))
            incoming = IncomingRequest(peer, message)
            if message.code == Code.GET:
                incoming._datagram = datagram
            self._receive_request(incoming, now)
        else:
            self._receive_separate_response(message, peer, None, now)

    def static_frame(self, token: bytes, after_token: bytes) -> bytes | None:
        """The answer frame to a GET of a static resource, counted as received and sent, or None
        (``tcp.CoapStream.static_answer``: the stream answers without an event)."""
        answer = self.static_answers.frame_answer(token, after_token)
        if answer is not None:
            stats = self.stats
            stats.received += 1
            stats.sent += 1
        return answer

    def notify(self, relation: ObserveRelation, notification: Message, now: float, confirmable: bool,
               final: bool = False) -> None:
        """Notifications go in order without CON/ACK (RFC 8323 section 7)."""
        super().notify(relation, notification, now, False, final)

    def request(self, peer: Peer, message: Message, now: float, response_timeout: float | None = None,
                timeout: float | None = None) -> OutgoingRequest:
        """Send a request; it is never retransmitted (the transport is reliable)."""
        message.mtype = NON
        return super().request(peer, message, now, response_timeout, timeout)

    def peer_closed(self, peer: Peer, now: float) -> None:
        """``peer``'s connection ended: its observers go, its requests fail (RFC 8323 section 7.1)."""
        for key, relation in list(self._relations.items()):
            if key[0] == peer:
                self.cancel_relation(relation, "connection closed")
        for outgoing in {outgoing for key, outgoing in self._requests.items() if key[0] == peer}:
            self._fail_request(outgoing, "connection closed", now)
