"""The relay's side of the Firezone portal's Phoenix channel, sans-IO.

Wire format: Phoenix V1 JSON objects ``{"topic", "event", "payload", "ref"}``
with numeric refs counting from 0 on every connection.  The relay joins topic
``relay`` with ``{"stamp_secret": <secret>}``, heartbeats on topic
``phoenix`` every 10 s, gives the join 5 s, and asks for a reconnect when more
than 3 heartbeats are unanswered.  The portal pushes ``init`` after the join.

``PhoenixSession`` is one connection's worth of state: the adapter calls
``connection_opened``, ``text_received``, ``handle_timeout`` and
``connection_lost``, sends every ``SendText`` and acts on the other events.
``ReconnectPolicy`` decides how long to wait before the next attempt and when
to give up (SPEC §6).  Neither does I/O; time and randomness come in.
"""

from __future__ import annotations

import json
import reprlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

TOPIC = "relay"
HEARTBEAT_TOPIC = "phoenix"
HEARTBEAT_INTERVAL = 10.0
JOIN_TIMEOUT = 5.0
MAX_UNANSWERED_HEARTBEATS = 3
MAX_FRAME_BYTES = 1 << 20
#: Portal-supplied text (a ``disconnect`` reason, a join error payload) is cut
#: to this many characters before it goes into an event (and so a log line).
MAX_LOGGED_CHARS = 200


@dataclass(frozen=True)
class SendText:
    """Send this text frame."""

    text: str


@dataclass(frozen=True)
class Joined:
    """The portal acknowledged the join."""


@dataclass(frozen=True)
class InitReceived:
    """The portal's ``init`` push (the relay starts serving on the first)."""

    payload: dict[str, Any]


@dataclass(frozen=True)
class Reconnect:
    """Drop this connection and connect again after the policy's delay."""

    reason: str


@dataclass(frozen=True)
class Fatal:
    """Give up: the process should exit non-zero with this reason."""

    reason: str


@dataclass(frozen=True)
class Ignored:
    """A frame that was not acted upon; worth one log line."""

    reason: str


Event = Union[SendText, Joined, InitReceived, Reconnect, Fatal, Ignored]


class RandomFloat(Protocol):
    def getrandbits(self, k: int, /) -> int: ...


def encode_frame(topic: str, event: str, payload: dict[str, Any], ref: Optional[int]) -> str:
    """A V1 frame, keys in the order the upstream relay serialises them."""
    return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref}, separators=(",", ":"))


class PhoenixSession:
    """The Phoenix protocol state of one websocket connection."""

    def __init__(self, join_payload: dict[str, Any], topic: str = TOPIC) -> None:
        self._join_payload = join_payload
        self._topic = topic
        self._events: deque[Event] = deque()
        self._next_ref = 0
        self._join_ref: Optional[int] = None
        self._join_deadline: Optional[float] = None
        self._heartbeat_at: Optional[float] = None
        self._unanswered: set[int] = set()
        self.joined = False
        self.open = False

    # --- inputs -----------------------------------------------------------

    def connection_opened(self, now: float) -> None:
        self.open = True
        self._next_ref = 0
        self._unanswered.clear()
        self.joined = False
        self._heartbeat_at = now + HEARTBEAT_INTERVAL
        self._send_join(now)

    def connection_lost(self) -> None:
        self.open = False
        self.joined = False
        self._join_deadline = None
        self._heartbeat_at = None
        self._unanswered.clear()

    def text_received(self, text: str, now: float) -> None:
        """Handle one text frame; never raises, whatever the portal sends."""
        if not self.open:
            return
        try:
            self._text_received(text, now)
        except Exception as exc:  # a bug here must not take the portal connection's owner down
            self._events.append(Ignored("frame not handled (%s)" % type(exc).__name__))

    def _text_received(self, text: str, now: float) -> None:
        if len(text) > MAX_FRAME_BYTES:
            self._events.append(Ignored("frame of %d bytes ignored" % len(text)))
            return
        try:
            frame = json.loads(text)
        except ValueError:
            self._events.append(Ignored("malformed JSON frame"))
            return
        except RecursionError:  # nesting deeper than the interpreter's limit
            self._events.append(Ignored("JSON frame nested too deeply"))
            return
        if not isinstance(frame, dict):
            self._events.append(Ignored("frame is not a JSON object"))
            return
        topic = frame.get("topic")
        event = frame.get("event")
        payload = frame.get("payload")
        ref = frame.get("ref")
        if not isinstance(topic, str) or not isinstance(event, str) or not isinstance(payload, dict):
            self._events.append(Ignored("frame without topic/event/payload"))
            return
        if isinstance(ref, bool) or not (ref is None or isinstance(ref, (int, str))):
            self._events.append(Ignored("frame with a bad ref"))
            return
        ref_number = _ref_number(ref)
        if event == "phx_reply":
            self._on_reply(topic, payload, ref_number, now)
        elif topic == self._topic and event == "init":
            self._events.append(InitReceived(payload))
        elif topic == self._topic and event == "phx_close":
            self._events.append(Reconnect("portal closed the channel"))
        elif event == "disconnect":
            reason = payload.get("reason")
            if reason == "token_expired":
                self._events.append(Fatal("portal token expired"))
            else:
                self._events.append(Reconnect("portal asked to disconnect: %s" % (printable(reason),)))
        elif event == "phx_error":
            self._events.append(Ignored("phx_error on %s" % topic))
        else:
            self._events.append(Ignored("unknown event %r on %r" % (event[:64], topic[:64])))

    def handle_timeout(self, now: float) -> None:
        if not self.open:
            return
        if self._join_deadline is not None and now >= self._join_deadline:
            self._join_deadline = None
            self._events.append(Reconnect("join timed out"))
            return
        if self._heartbeat_at is not None and now >= self._heartbeat_at:
            if len(self._unanswered) > MAX_UNANSWERED_HEARTBEATS - 1:
                self._heartbeat_at = None
                self._events.append(Reconnect("too many heartbeats were unanswered"))
                return
            ref = self._take_ref()
            self._unanswered.add(ref)
            self._events.append(SendText(encode_frame(HEARTBEAT_TOPIC, "heartbeat", {}, ref)))
            self._heartbeat_at = now + HEARTBEAT_INTERVAL

    # --- outputs -------------------------------------------------------------

    def next_event(self) -> Optional[Event]:
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> Optional[float]:
        deadlines = [d for d in (self._join_deadline, self._heartbeat_at) if d is not None]
        return min(deadlines) if deadlines else None

    # --- internals ---------------------------------------------------------------

    def _take_ref(self) -> int:
        ref = self._next_ref
        self._next_ref += 1
        return ref

    def _send_join(self, now: float) -> None:
        self._join_ref = self._take_ref()
        self._join_deadline = now + JOIN_TIMEOUT
        self._events.append(SendText(encode_frame(self._topic, "phx_join", self._join_payload, self._join_ref)))

    def _on_reply(self, topic: str, payload: dict[str, Any], ref: Optional[int], now: float) -> None:
        status = payload.get("status")
        if topic == HEARTBEAT_TOPIC:
            if ref is not None and ref in self._unanswered:
                self._unanswered.discard(ref)
            else:
                self._events.append(Ignored("heartbeat reply with unknown ref %r" % (ref,)))
            return
        if topic != self._topic or ref is None or ref != self._join_ref:
            self._events.append(Ignored("reply to unknown ref %r on %r" % (ref, topic[:64])))
            return
        if status == "ok":
            if not self.joined:
                self.joined = True
                self._join_deadline = None
                self._events.append(Joined())
            return
        response = payload.get("response")
        reason = response.get("reason") if isinstance(response, dict) else None
        if reason == "unmatched topic":
            self._events.append(Ignored("join answered 'unmatched topic': joining again"))
            self._send_join(now)
            return
        self._events.append(
            Fatal("portal rejected the join: %s" % (printable(reason if reason is not None else payload),))
        )


_REPR = reprlib.Repr()
_REPR.maxlevel = 4
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = MAX_LOGGED_CHARS
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = 16


def printable(value: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """``value`` (a string as is, anything else as a bounded repr) cut to
    ``limit`` characters, with a marker when cut: portal text for a log line.
    Costs O(limit) whatever the size or depth of ``value``."""
    if isinstance(value, str):
        text = value[: limit + 1]
    else:
        try:
            text = _REPR.repr(value)
        except Exception:  # RecursionError included
            text = "<%s>" % type(value).__name__
    if len(text) > limit:
        return text[:limit] + "...(cut)"
    return text


def _ref_number(ref: object) -> Optional[int]:
    if isinstance(ref, int):
        return ref
    if isinstance(ref, str) and ref.isdigit() and len(ref) < 20:
        return int(ref)
    return None


class ReconnectPolicy:
    """How long to wait before reconnecting, and when to give up (SPEC §6).

    Before the first successful join: every 1 s for at most 15 s.  After a
    join: exponential backoff from 0.5 s, ×1.5, ±50 % jitter, at most 60 s
    between attempts, for at most 24 h since the connection was lost.  A
    ``Retry-After`` from the portal replaces the computed delay.
    """

    INITIAL_INTERVAL = 1.0
    INITIAL_MAX_ELAPSED = 15.0
    BACKOFF_START = 0.5
    BACKOFF_FACTOR = 1.5
    BACKOFF_JITTER = 0.5
    BACKOFF_MAX_INTERVAL = 60.0
    BACKOFF_MAX_ELAPSED = 24 * 3600.0

    def __init__(self, rng: RandomFloat, now: float) -> None:
        self._rng = rng
        self.ever_joined = False
        self._failing_since: Optional[float] = now
        self._interval = self.BACKOFF_START

    def joined(self) -> None:
        """A join succeeded: reset the backoff."""
        self.ever_joined = True
        self._failing_since = None
        self._interval = self.BACKOFF_START

    def next_delay(self, now: float, retry_after: Optional[float] = None) -> Optional[float]:
        """Seconds to wait before the next attempt, or ``None`` to give up."""
        if self._failing_since is None:
            self._failing_since = now
        elapsed = now - self._failing_since
        limit = self.BACKOFF_MAX_ELAPSED if self.ever_joined else self.INITIAL_MAX_ELAPSED
        if elapsed >= limit:
            return None
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, limit - elapsed)
        if not self.ever_joined:
            return self.INITIAL_INTERVAL
        jitter = (self._rng.getrandbits(32) / 2.0**32 * 2.0 - 1.0) * self.BACKOFF_JITTER
        delay = self._interval * (1.0 + jitter)
        self._interval = min(self._interval * self.BACKOFF_FACTOR, self.BACKOFF_MAX_INTERVAL)
        return delay
