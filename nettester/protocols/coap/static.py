"""A static resource's answers kept as bytes: the server's fast path for the common GET.

A resource marked ``static`` answers a GET from its options alone. Once it
has answered a plain CON GET (or a GET over TCP, RFC 8323), the request's
bytes after the token (the same bytes decode to the same request, hence the
same answer) map to the answer's code and bytes after the token; the next
identical request from any peer is answered from here with its own message
id and token (over TCP: its token, in a frame, ``frame_answer``), without
decoding, dispatch or encoding. Sans-IO, like the layer that holds it.
"""

from __future__ import annotations

from nettester.protocols.coap.exchanges import IncomingRequest
from nettester.protocols.coap.message import OptionNumber
from nettester.protocols.coap.tcp import frame_header

# Request options whose only effect is the answer (RFC 7252 section 5.10).
STATIC_OPTIONS = frozenset((OptionNumber.URI_HOST, OptionNumber.URI_PORT, OptionNumber.URI_PATH,
                            OptionNumber.URI_QUERY, OptionNumber.ACCEPT))
MAX_STATIC_ANSWERS = 1024  # distinct static requests remembered; then the memory starts afresh
_ACK_BITS = 0x20  # RFC 7252 section 3: type 2 (ACK) in bits 4-5 of the first byte; a CON has 0 there


class StaticAnswers:
    """Plain GETs of static resources and their piggybacked answers (see the module docstring)."""

    __slots__ = ("answers",)

    def __init__(self) -> None:
        #: the request's bytes after the token -> (the answer's code, its bytes after the token)
        self.answers: dict[bytes, tuple[int, bytes]] = {}

    def __len__(self) -> int:
        return len(self.answers)

    def answer(self, data: bytes, token_length: int) -> bytes | None:
        """The whole ACK answering the CON GET ``data``, or None when it must take the full path."""
        after_token = 4 + token_length
        static = self.answers.get(data[after_token:]) if token_length <= 8 and len(data) >= after_token else None
        if static is None:
            return None
        return bytes((data[0] | _ACK_BITS, static[0])) + data[2:after_token] + static[1]  # same MID and token

    def frame_answer(self, token: bytes, after_token: bytes) -> bytes | None:
        """The whole frame answering the GET frame with ``token`` and ``after_token`` (RFC 8323 section
        3.2), or None when it must take the full path. A frame has no type or message id: only the
        token is the request's own."""
        static = self.answers.get(after_token)
        if static is None:
            return None
        return frame_header(len(static[1]), len(token), static[0]) + token + static[1]

    def remember(self, incoming: IncomingRequest, data: bytes) -> None:
        """Keep ``data``, the piggybacked answer to ``incoming``, if the request is plain.

        Plain: Uri-Host, Uri-Port, Uri-Path, Uri-Query, Accept and no payload; every other option may
        have an effect beside the answer (Observe registers, Block2 stores a body, a tag is counted), and
        so does the last block of an upload (its Block1 option is gone from the request by now).
        """
        request, datagram = incoming.request, incoming._datagram
        if (datagram is None or request.payload or incoming._block1 is not None
                or not all(number in STATIC_OPTIONS for number, _ in request.options)):
            return
        if len(self.answers) >= MAX_STATIC_ANSWERS:
            self.answers.clear()
        after_token = 4 + len(request.token)
        self.answers[datagram[after_token:]] = (data[1], data[after_token:])

    def clear(self) -> None:
        """The resources changed: every request is answered in full again."""
        self.answers.clear()
