"""Sans-IO CoAP over reliable transports (RFC 8323): framing, signalling, hostile-stream bounds.

``CoapStream`` is one TCP (or TLS) connection, an ``interfaces.StreamCore``
(the h11-style twin of the datagram contract): bytes and the time
go in (``receive_data(data, now)``, ``handle_timer(now)``), bytes, one timer
and events come out (``data_to_send()``, ``get_timer()``, ``next_event()``).
It never imports ``twisted.internet`` and never reads a clock.

Framing is RFC 8323 section 3.2: Len/TKL byte, 0-4 bytes extended length,
code, token, then options and payload exactly as in RFC 7252 (decoded by
``message.py``). Signalling (section 5): CSM is the first message of each
side, Ping is answered by Pong, Release and Abort end the connection.

Hostile input is bounded: a message longer than our Max-Message-Size is
refused from its header alone (Abort, nothing buffered), a peer without CSM
within ``csm_timeout`` is aborted, a partial message not completed within
``message_timeout`` (slowloris) closes the connection. Every end carries a
short reason key the adapter counts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from nettester.protocols.coap.message import (
    NON,
    CoapDecodeError,
    Code,
    DecodeFailure,
    Message,
    Option,
    decode_after_header,
    encode_options,
    encode_uint,
    is_request,
    make_code,
)

#: RFC 8323 section 5.3.1: the Max-Message-Size a peer assumes until our CSM says otherwise.
DEFAULT_MAX_MESSAGE_SIZE = 1152
_GET = 1  # RFC 7252 section 12.1.1


class SignalCode:
    """Signalling codes (RFC 8323 section 11.1), class 7."""

    CSM = make_code(7, 1)
    PING = make_code(7, 2)
    PONG = make_code(7, 3)
    RELEASE = make_code(7, 4)
    ABORT = make_code(7, 5)


class SignalOption:
    """Signalling option numbers (RFC 8323 section 11.2); they mean something per code."""

    MAX_MESSAGE_SIZE = 2  # CSM
    BLOCK_WISE_TRANSFER = 4  # CSM
    CUSTODY = 2  # Ping, Pong
    ALTERNATIVE_ADDRESS = 2  # Release
    HOLD_OFF = 4  # Release
    BAD_CSM_OPTION = 2  # Abort


#: The signalling options each code knows (section 5); any other critical one aborts.
_KNOWN_SIGNAL_OPTIONS: dict[int, frozenset[int]] = {
    SignalCode.CSM: frozenset((SignalOption.MAX_MESSAGE_SIZE, SignalOption.BLOCK_WISE_TRANSFER)),
    SignalCode.PING: frozenset((SignalOption.CUSTODY,)),
    SignalCode.PONG: frozenset((SignalOption.CUSTODY,)),
    SignalCode.RELEASE: frozenset((SignalOption.ALTERNATIVE_ADDRESS, SignalOption.HOLD_OFF)),
    SignalCode.ABORT: frozenset((SignalOption.BAD_CSM_OPTION,)),
}


# ---------------------------------------------------------------- framing


def encode_frame(code: int, token: bytes = b"", options: list[Option] | tuple[Option, ...] = (),
                 payload: bytes = b"") -> bytes:
    """Wire bytes of one message (RFC 8323 section 3.2)."""
    if len(token) > 8:
        raise ValueError("token longer than 8 bytes")
    body = encode_options(options) if options else b""
    if payload:
        body = b"".join((body, b"\xff", payload))
    return frame_header(len(body), len(token), code) + token + body


def frame_header(length: int, tkl: int, code: int) -> bytes:
    """Len/TKL, extended length and code for a body (options and payload) of ``length`` bytes."""
    if length < 13:
        return bytes(((length << 4) | tkl, code))
    if length < 269:
        return bytes((0xD0 | tkl, length - 13, code))
    if length < 65805:
        return bytes((0xE0 | tkl,)) + (length - 269).to_bytes(2, "big") + bytes((code,))
    return bytes((0xF0 | tkl,)) + (length - 65805).to_bytes(4, "big") + bytes((code,))


def frame_from_datagram(datagram: bytes) -> bytes | None:
    """The frame carrying what an RFC 7252 datagram carries, without type and message id.

    The message layer encodes datagrams; over TCP only code, token, options
    and payload travel. Empty messages (ACK, RST: no meaning on a reliable
    transport, RFC 8323 section 2) give None.
    """
    if len(datagram) < 4 or not datagram[1]:
        return None
    tkl = datagram[0] & 0x0F
    return frame_header(len(datagram) - 4 - tkl, tkl, datagram[1]) + datagram[4:]


def parse_frame_header(buffer: bytes | bytearray, offset: int = 0) -> tuple[int, int, int, int] | None:
    """(header length, token length, code, body length) of the frame at ``offset``, None while incomplete."""
    available = len(buffer) - offset
    if available < 2:
        return None
    first = buffer[offset]
    nibble = first >> 4
    tkl = first & 0x0F
    if nibble < 13:
        return 2, tkl, buffer[offset + 1], nibble
    extra = 1 if nibble == 13 else 2 if nibble == 14 else 4
    if available < 2 + extra:
        return None
    length = int.from_bytes(buffer[offset + 1:offset + 1 + extra], "big") + (13, 269, 65805)[nibble - 13]
    return 2 + extra, tkl, buffer[offset + 1 + extra], length


def decode_frame(frame: bytes | bytearray) -> Message:
    """One complete frame as a ``Message`` (type NON, message id 0: a reliable transport has neither).

    Raises ``CoapDecodeError`` as ``message.decode`` does; a reserved token
    length is a format error.
    """
    header = parse_frame_header(frame)
    if header is None:
        raise CoapDecodeError(DecodeFailure.FORMAT, "truncated frame header")
    header_length, tkl, code, length = header
    if header_length + tkl + length != len(frame):
        raise CoapDecodeError(DecodeFailure.FORMAT, "frame length does not match its Len field")
    return _decode_checked(as_datagram(bytes(frame), header_length, tkl, code), tkl, code)


def as_datagram(frame: bytes, header_length: int, tkl: int, code: int) -> bytes:
    """The RFC 7252 datagram (type NON, message id 0) carrying what the frame carries: the message
    codec's input, and the key of ``static.StaticAnswers``."""
    return bytes((0x50 | (tkl & 0x0F), code, 0, 0)) + frame[header_length:]


def _decode_checked(datagram: bytes, tkl: int, code: int) -> Message:
    """``decode_frame`` past the length check, from ``as_datagram``'s bytes."""
    if tkl > 8:
        raise CoapDecodeError(DecodeFailure.FORMAT, f"token length {tkl} is reserved", NON, code, 0)
    if not code:
        if len(datagram) > 4:
            raise CoapDecodeError(DecodeFailure.FORMAT, "empty message with token, options or payload", NON, 0, 0)
        return Message(NON, 0)
    # The body is an RFC 7252 message after its 4-byte header: reuse the codec.
    return decode_after_header(datagram, (NON, tkl, code, 0), signalling=code >> 5 == 7)


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """Base class of every event of a CoAP stream."""


@dataclass(frozen=True, slots=True)
class MessageReceived(StreamEvent):
    """A request or response (type NON, message id 0) for the message layer."""

    message: Message
    #: A request's ``as_datagram`` bytes (``static.StaticAnswers`` keeps answers by them), else None.
    datagram: bytes | None = None


@dataclass(frozen=True, slots=True)
class AnswerReady(StreamEvent):
    """``static_answer``'s frame for a request: the adapter writes it where its event comes."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class CsmReceived(StreamEvent):
    """The peer's capabilities (RFC 8323 section 5.3); the first one makes the stream ready."""

    max_message_size: int
    block_wise: bool


@dataclass(frozen=True, slots=True)
class PongReceived(StreamEvent):
    """The answer to one of our Pings (section 5.4)."""

    token: bytes


@dataclass(frozen=True, slots=True)
class ReleaseReceived(StreamEvent):
    """The peer released the connection (section 5.5), with where and when to come back, if it said.

    ``alternative_address``: the Alternative-Address option (a host, optionally
    with a port); ``hold_off``: the Hold-Off option, seconds before a reconnect.
    A ``StreamClosed`` (``released``) follows.
    """

    alternative_address: str | None
    hold_off: int | None

    def describe(self) -> str:
        """``Alternative-Address X, Hold-Off N s``, the parts the peer sent."""
        parts = [] if self.alternative_address is None else [f"Alternative-Address {self.alternative_address}"]
        if self.hold_off is not None:
            parts.append(f"Hold-Off {self.hold_off} s")
        return ", ".join(parts) or "no Alternative-Address, no Hold-Off"


@dataclass(frozen=True, slots=True)
class StreamClosed(StreamEvent):
    """The stream ended: the adapter closes the connection and counts ``reason``.

    ``reason`` is a short key (``no_csm``, ``csm_not_first``, ``too_large``,
    ``slowloris``, ``format``, ``bad_signal``, ``peer_abort``, ``released``,
    ``aborted``, ``closed``); ``detail`` says it for a log line.
    """

    reason: str
    detail: str


# ---------------------------------------------------------------- the stream


@dataclass(frozen=True, slots=True)
class StreamParameters:
    """Bounds of one stream."""

    #: What our CSM announces and what we accept per message (RFC 8323 section 5.3.1).
    max_message_size: int = 1152 + 8192
    #: Announce Block-Wise-Transfer (RFC 8323 section 5.3.2): we serve RFC 7959 block-wise.
    block_wise: bool = True
    #: Seconds the peer has to send its CSM (section 5.3.1: a missing CSM is a connection error).
    csm_timeout: float = 10.0
    #: Seconds a started message has to be completed (a slowloris sender is closed).
    message_timeout: float = 30.0


class CoapStream:
    """One CoAP over TCP/TLS connection, either end."""

    def __init__(self, now: float, params: StreamParameters | None = None) -> None:
        self.params = params or StreamParameters()
        #: The peer's Max-Message-Size and Block-Wise-Transfer, RFC 8323 defaults until its CSM.
        self.peer_max_message_size = DEFAULT_MAX_MESSAGE_SIZE
        self.peer_block_wise = False
        #: True once the peer's CSM arrived.
        self.ready = False
        #: The reason key once the stream ended (no more input is read, nothing more is sent).
        self.closed: str | None = None
        self._buffer = b""
        self._out: list[bytes] = []
        #: ``(token, bytes after the token) -> the answer frame or None``: a GET answered without decoding
        #: it, as an ``AnswerReady`` (the server's ``ReliableCoapLayer.static_frame``); None: all decoded.
        self.static_answer: Callable[[bytes, bytes], bytes | None] | None = None
        self._events: deque[StreamEvent] = deque()
        self._csm_deadline: float | None = now + self.params.csm_timeout
        self._partial_since: float | None = None
        self._send_csm()

    # ------------------------------------------------------------ sans-IO surface

    def data_to_send(self) -> bytes:
        """Bytes to write now (handed out once)."""
        out = b"".join(self._out)
        self._out = []
        return out

    def next_event(self) -> StreamEvent | None:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When ``handle_timer`` is due: the CSM deadline or the partial message's, or None."""
        if self.closed is not None or (self._csm_deadline is None and self._partial_since is None):
            return None
        deadlines = [deadline for deadline in (
            self._csm_deadline,
            None if self._partial_since is None else self._partial_since + self.params.message_timeout,
        ) if deadline is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Abort a peer that sent no CSM, close one whose message stays incomplete."""
        if self.closed is not None:
            return
        if self._csm_deadline is not None and now >= self._csm_deadline:
            self.abort("no_csm", f"no CSM within {self.params.csm_timeout:g} s")
        elif self._partial_since is not None and now >= self._partial_since + self.params.message_timeout:
            self._close("slowloris", f"a message stayed incomplete for {self.params.message_timeout:g} s")

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the peer; complete messages become events (or, with ``static_answer``, answers)."""
        if self.closed is not None or not data:
            return
        # bytes, not a bytearray: a frame is then one slice (none when the read is that one frame).
        buffer = self._buffer + data if self._buffer else data
        position = 0
        end = len(buffer)
        max_size = self.params.max_message_size
        static_answer = self.static_answer if self.ready else None
        while self.closed is None:
            header = parse_frame_header(buffer, position)
            if header is None:
                break
            header_length, tkl, code, length = header
            if length > max_size:
                # Refused from the header: nothing of the body is ever buffered.
                self.abort("too_large", f"message of {length} bytes above Max-Message-Size {max_size}",
                           SignalOption.MAX_MESSAGE_SIZE)
                break
            body_start = position + header_length + tkl
            frame_end = body_start + length
            if frame_end > end:
                break
            if code == _GET and static_answer is not None and tkl <= 8:
                answer = static_answer(buffer[position + header_length:body_start], buffer[body_start:frame_end])
                if answer is not None:
                    self._events.append(AnswerReady(answer))  # in order with the decoded requests' answers
                    position = frame_end
                    continue
            self._receive_frame(buffer if position == 0 and frame_end == end else buffer[position:frame_end],
                                header_length, tkl, code)
            position = frame_end
        if self.closed is not None:
            self._buffer = b""
            return
        self._buffer = buffer[position:] if position < end else b""
        if position == end:
            self._partial_since = None
        elif position or self._partial_since is None:
            self._partial_since = now  # a message started (or progressed to a new one) now

    def send_message(self, code: int, token: bytes = b"", options: list[Option] | tuple[Option, ...] = (),
                     payload: bytes = b"") -> None:
        """Queue one request or response."""
        if self.closed is None:
            self._out.append(encode_frame(code, token, options, payload))

    def send_frame(self, frame: bytes) -> None:
        """Queue an encoded frame (``frame_from_datagram``)."""
        if self.closed is None:
            self._out.append(frame)

    def ping(self, token: bytes = b"", custody: bool = False) -> None:
        """Send a Ping (section 5.4); a ``PongReceived`` with its token follows."""
        self.send_message(SignalCode.PING, token, [(SignalOption.CUSTODY, b"")] if custody else ())

    def release(self, detail: str = "released", alternative_address: str | None = None,
                hold_off: int | None = None) -> None:
        """Close gracefully (section 5.5): Release, with where and when the peer may come back, then
        the connection ends."""
        if self.closed is None:
            options: list[Option] = []
            if alternative_address is not None:
                options.append((SignalOption.ALTERNATIVE_ADDRESS, alternative_address.encode()))
            if hold_off is not None:
                options.append((SignalOption.HOLD_OFF, encode_uint(hold_off)))
            self._out.append(encode_frame(SignalCode.RELEASE, b"", options))
            self._close("released", detail)

    def abort(self, reason: str, detail: str, bad_csm_option: int | None = None) -> None:
        """Abort (section 5.6) with a diagnostic payload, and end the stream."""
        if self.closed is not None:
            return
        options = [] if bad_csm_option is None else [(SignalOption.BAD_CSM_OPTION, encode_uint(bad_csm_option))]
        self._out.append(encode_frame(SignalCode.ABORT, b"", options, detail.encode()))
        self._close(reason, detail)

    def connection_lost(self, detail: str) -> None:
        """The transport went away under us."""
        if self.closed is None:
            self._close("closed", detail)

    # ------------------------------------------------------------ receiving

    def _receive_frame(self, frame: bytes, header_length: int, tkl: int, code: int) -> None:
        if code not in (SignalCode.CSM, SignalCode.ABORT) and not self.ready:
            # RFC 8323 section 5.3.1: CSM is each side's first message; an Abort (section 5.6)
            # may come first (a peer refusing us at once), and its diagnostic is worth reading.
            self.abort("csm_not_first", f"first message {code >> 5}.{code & 0x1F:02d} is not a CSM")
            return
        datagram = as_datagram(frame, header_length, tkl, code)
        try:
            message = _decode_checked(datagram, tkl, code)
        except CoapDecodeError as error:
            self._reject(error)
            return
        if code >> 5 == 7:
            self._receive_signal(message)
        elif code:  # RFC 8323 section 3.4: an Empty message is ignored (a keep-alive).
            self._events.append(MessageReceived(message, datagram if code < 32 else None))

    def _reject(self, error: CoapDecodeError) -> None:
        """A bad critical option in a request gets 4.02 (RFC 7252 section 5.4.1); any other error aborts."""
        if error.failure is DecodeFailure.BAD_OPTION and error.code is not None and is_request(error.code):
            self.send_message(Code.BAD_OPTION, error.token or b"", (),
                              f"unrecognized critical option {error.option}".encode())
            return
        if error.failure is DecodeFailure.BAD_OPTION:
            return  # A response with a bad critical option: dropped (no Reset on a reliable transport).
        self.abort("format", f"message format error: {error.reason}")

    def _receive_signal(self, message: Message) -> None:
        code = message.code
        known = _KNOWN_SIGNAL_OPTIONS.get(code)
        if known is None:
            return  # An unknown signalling code is ignored.
        for number, _ in message.options:
            if number & 1 and number not in known:
                # RFC 8323 section 5.3: an unknown critical signalling option is a connection error.
                self.abort("bad_signal", f"unknown critical option {number} in signal {code & 0x1F}",
                           number if code == SignalCode.CSM else None)
                return
        if code == SignalCode.CSM:
            self._receive_csm(message)
        elif code == SignalCode.PING:
            custody = [(SignalOption.CUSTODY, b"")] if message.has_option(SignalOption.CUSTODY) else []
            self.send_message(SignalCode.PONG, message.token, custody)  # section 5.4
        elif code == SignalCode.PONG:
            self._events.append(PongReceived(message.token))
        elif code == SignalCode.RELEASE:
            self._receive_release(message)
        else:
            # Section 5.6: the diagnostic payload, and the CSM option the peer could not take.
            detail = "the peer aborted: " + message.payload.decode("utf-8", "replace")
            bad_option = message.uint_option(SignalOption.BAD_CSM_OPTION)
            if bad_option is not None:
                detail += f" (Bad-CSM-Option {bad_option})"
            self._close("peer_abort", detail)

    def _receive_release(self, message: Message) -> None:
        """Section 5.5: the peer goes; Alternative-Address (a string) and Hold-Off (seconds) say
        where to reconnect and when. They are reported; the stream ends either way."""
        address = message.option(SignalOption.ALTERNATIVE_ADDRESS)
        release = ReleaseReceived(None if address is None else address.decode("utf-8", "replace"),
                                  message.uint_option(SignalOption.HOLD_OFF))
        self._events.append(release)
        self._close("released", "the peer released the connection: " + release.describe())

    def _receive_csm(self, message: Message) -> None:
        """Section 5.3: the peer's limits; later CSMs update them."""
        size = message.uint_option(SignalOption.MAX_MESSAGE_SIZE)
        if size is not None:
            self.peer_max_message_size = size
        self.peer_block_wise = message.has_option(SignalOption.BLOCK_WISE_TRANSFER)
        self.ready = True
        self._csm_deadline = None
        self._events.append(CsmReceived(self.peer_max_message_size, self.peer_block_wise))

    # ------------------------------------------------------------ sending

    def _send_csm(self) -> None:
        options: list[Option] = [(SignalOption.MAX_MESSAGE_SIZE, encode_uint(self.params.max_message_size))]
        if self.params.block_wise:
            options.append((SignalOption.BLOCK_WISE_TRANSFER, b""))
        self._out.append(encode_frame(SignalCode.CSM, b"", options))

    def _close(self, reason: str, detail: str) -> None:
        self.closed = reason
        self._csm_deadline = None
        self._partial_since = None
        self._events.append(StreamClosed(reason, detail))
