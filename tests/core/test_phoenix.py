"""The sans-IO Phoenix session and reconnect policy."""

from __future__ import annotations

import json
import random

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core.phoenix import (
    MAX_FRAME_BYTES,
    MAX_LOGGED_CHARS,
    Fatal,
    Ignored,
    InitReceived,
    Joined,
    PhoenixSession,
    Reconnect,
    ReconnectPolicy,
    SendText,
    encode_frame,
)

SECRET = "ab" * 32


def drain(session: PhoenixSession) -> list[object]:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def frames(events: list[object]) -> list[dict[str, object]]:
    return [json.loads(e.text) for e in events if isinstance(e, SendText)]


def reply(topic: str, ref: object, status: str = "ok", response: object = None) -> str:
    return json.dumps(
        {"topic": topic, "event": "phx_reply", "payload": {"status": status, "response": response or {}}, "ref": ref}
    )


class SessionTests(SynchronousTestCase):
    def opened(self) -> PhoenixSession:
        session = PhoenixSession({"stamp_secret": SECRET})
        session.connection_opened(100.0)
        return session

    def test_join_frame_exactly(self) -> None:
        session = self.opened()
        (join,) = drain(session)
        assert isinstance(join, SendText)
        self.assertEqual(
            join.text, '{"topic":"relay","event":"phx_join","payload":{"stamp_secret":"%s"},"ref":0}' % SECRET
        )
        self.assertEqual(session.poll_timeout(), 105.0)

    def test_join_ok_then_init(self) -> None:
        session = self.opened()
        drain(session)
        session.text_received(reply("relay", 0), 101.0)
        self.assertEqual(drain(session), [Joined()])
        self.assertTrue(session.joined)
        session.text_received('{"topic":"relay","event":"init","payload":{},"ref":null}', 101.5)
        self.assertEqual(drain(session), [InitReceived({})])
        self.assertEqual(session.poll_timeout(), 110.0)

    def test_join_timeout_reconnects(self) -> None:
        session = self.opened()
        drain(session)
        session.handle_timeout(104.9)
        self.assertEqual(drain(session), [])
        session.handle_timeout(105.0)
        self.assertEqual(drain(session), [Reconnect("join timed out")])

    def test_join_error_is_fatal_except_unmatched_topic(self) -> None:
        session = self.opened()
        drain(session)
        session.text_received(reply("relay", 0, "error", {"reason": "unmatched topic"}), 101.0)
        events = drain(session)
        self.assertIsInstance(events[0], Ignored)
        self.assertEqual(frames(events)[0]["ref"], 1)
        session.text_received(reply("relay", 1, "error", {"reason": "disabled"}), 102.0)
        (fatal,) = drain(session)
        assert isinstance(fatal, Fatal)
        self.assertIn("disabled", fatal.reason)

    def test_heartbeats_every_10s_and_reconnect_after_3_unanswered(self) -> None:
        session = self.opened()
        drain(session)
        session.text_received(reply("relay", 0), 100.5)
        drain(session)
        sent = []
        for t in (110.0, 120.0, 130.0):
            session.handle_timeout(t)
            sent += frames(drain(session))
        self.assertEqual(
            sent,
            [{"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": r} for r in (1, 2, 3)],
        )
        session.handle_timeout(140.0)
        self.assertEqual(drain(session), [Reconnect("too many heartbeats were unanswered")])

    def test_answered_heartbeats_keep_the_connection(self) -> None:
        session = self.opened()
        drain(session)
        session.text_received(reply("relay", 0), 100.5)
        drain(session)
        for i in range(10):
            session.handle_timeout(110.0 + 10 * i)
            (heartbeat,) = frames(drain(session))
            session.text_received(reply("phoenix", heartbeat["ref"]), 111.0 + 10 * i)
            self.assertEqual(drain(session), [])

    def test_token_expired_is_fatal_other_disconnect_reconnects(self) -> None:
        session = self.opened()
        drain(session)
        session.text_received('{"topic":"relay","event":"disconnect","payload":{"reason":"token_expired"},"ref":null}', 101)
        self.assertEqual(drain(session), [Fatal("portal token expired")])
        session.text_received('{"topic":"relay","event":"disconnect","payload":{"reason":"other"},"ref":null}', 101)
        self.assertIsInstance(drain(session)[0], Reconnect)

    def test_phx_close_reconnects(self) -> None:
        session = self.opened()
        drain(session)
        session.text_received('{"topic":"relay","event":"phx_close","payload":{},"ref":0}', 101)
        self.assertIsInstance(drain(session)[0], Reconnect)

    def test_garbage_is_ignored(self) -> None:
        session = self.opened()
        drain(session)
        for text in ["", "{", "[]", "1", '{"topic":1}', '{"topic":"relay","event":"x","payload":[],"ref":0}',
                     '{"topic":"relay","event":"something_new","payload":{},"ref":null}', "x" * (2 << 20),
                     '{"topic":"relay","event":"phx_reply","payload":{},"ref":true}']:
            session.text_received(text, 101.0)
            events = drain(session)
            self.assertEqual(len(events), 1, text[:40])
            self.assertIsInstance(events[0], Ignored)
        self.assertFalse(session.joined)

    @given(st.text(max_size=300))
    @settings(max_examples=300, deadline=None)
    def test_any_text_never_raises(self, text: str) -> None:
        session = PhoenixSession({"stamp_secret": SECRET})
        session.connection_opened(0.0)
        session.text_received(text, 1.0)
        session.handle_timeout(50.0)
        drain(session)

    def test_deeply_nested_json_is_ignored(self) -> None:
        """Issue 14 item 13: json.loads raises RecursionError (not ValueError) on deep nesting."""
        session = self.opened()
        drain(session)
        for text in ["[" * 100000, "[" * 100000 + "]" * 100000,
                     '{"topic":"relay","event":"disconnect","payload":{"reason":' + "[" * 50000 + "]" * 50000 + "}}"]:
            session.text_received(text, 101.0)
            (event,) = drain(session)
            self.assertIsInstance(event, Ignored)
        # Near the limit the frame parses and the value is then formatted:
        # every depth up to where parsing fails is handled without raising.
        for depth in range(850, 1100, 7):
            nested = "[" * depth + "]" * depth
            for text in ['{"topic":"relay","event":"disconnect","payload":{"reason":%s},"ref":null}' % nested,
                         reply("relay", 0, "error", {"reason": None}).replace('"reason": null', '"reason": %s' % nested),
                         reply("relay", 0, "error", None).replace('"response": {}', '"response": %s' % nested)]:
                session = self.opened()
                drain(session)
                session.text_received(text, 101.0)
                events = drain(session)
                self.assertEqual(len(events), 1, depth)
                self.assertLess(len(events[0].reason), 2 * MAX_LOGGED_CHARS)
        self.assertIsInstance(events[0], (Fatal, Ignored))

    def test_portal_text_is_truncated(self) -> None:
        """A ~1 MiB disconnect reason or join error reaches the events (and the logs) cut to 200 characters."""
        big = "r" * (MAX_FRAME_BYTES - 200)
        session = self.opened()
        drain(session)
        session.text_received(json.dumps({"topic": "relay", "event": "disconnect", "payload": {"reason": big}, "ref": None}), 101)
        (event,) = drain(session)
        assert isinstance(event, Reconnect)
        self.assertEqual(event.reason, "portal asked to disconnect: " + "r" * MAX_LOGGED_CHARS + "...(cut)")
        for response in ({"reason": big}, {"other": big}, {"reason": {"k%d" % i: [big[:1000]] * 3 for i in range(300)}},
                         {"reason": 10**4000}):
            session = self.opened()
            drain(session)
            session.text_received(reply("relay", 0, "error", response), 101.0)
            (event,) = drain(session)
            assert isinstance(event, Fatal), event
            self.assertTrue(event.reason.startswith("portal rejected the join: "), event.reason[:80])
            self.assertLessEqual(len(event.reason), len("portal rejected the join: ") + MAX_LOGGED_CHARS + 8)
        # Short reasons are kept whole.
        session = self.opened()
        drain(session)
        session.text_received(reply("relay", 0, "error", {"reason": "disabled"}), 101.0)
        self.assertEqual(drain(session), [Fatal("portal rejected the join: disabled")])

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
            max_leaves=40,
        ),
        st.sampled_from(["payload", "reason", "response", "ref", "status", "topic", "event"]),
        st.sampled_from(["phx_reply", "disconnect", "init", "phx_close", "phx_error", "heartbeat"]),
    )
    @settings(max_examples=300, deadline=None)
    def test_any_json_value_anywhere_never_raises(self, value: object, where: str, event: str) -> None:
        frame: dict[str, object] = {"topic": "relay", "event": event, "payload": {"status": "error", "response": {}}, "ref": 0}
        payload = frame["payload"]
        assert isinstance(payload, dict)
        if where in ("reason", "response", "status"):
            payload[where] = value if where != "reason" else None
            if where == "reason":
                payload["response"] = {"reason": value}
                payload["reason"] = value
        else:
            frame[where] = value
        for topic in ("relay", "phoenix"):
            if where != "topic":
                frame["topic"] = topic
            session = PhoenixSession({"stamp_secret": SECRET})
            session.connection_opened(0.0)
            session.text_received(json.dumps(frame), 1.0)
            session.handle_timeout(50.0)
            for e in drain(session):
                if not isinstance(e, (SendText, InitReceived)):
                    self.assertLess(len(e.reason), 2 * MAX_LOGGED_CHARS, e)

    def test_refs_restart_at_zero_per_connection(self) -> None:
        session = self.opened()
        drain(session)
        session.connection_lost()
        self.assertIsNone(session.poll_timeout())
        session.connection_opened(200.0)
        self.assertEqual(frames(drain(session))[0]["ref"], 0)

    def test_encode_frame_order(self) -> None:
        self.assertEqual(encode_frame("phoenix", "heartbeat", {}, 3), '{"topic":"phoenix","event":"heartbeat","payload":{},"ref":3}')


class ReconnectPolicyTests(SynchronousTestCase):
    def test_before_first_join_1s_for_15s_then_give_up(self) -> None:
        policy = ReconnectPolicy(random.Random(0), 0.0)
        now = 0.0
        delays = []
        while (delay := policy.next_delay(now)) is not None:
            delays.append(delay)
            now += delay
        self.assertEqual(set(delays), {1.0})
        self.assertEqual(len(delays), 15)

    def test_after_join_exponential_with_jitter_capped(self) -> None:
        policy = ReconnectPolicy(random.Random(0), 0.0)
        policy.joined()
        now = 1000.0
        delays = []
        for i in range(40):
            delay = policy.next_delay(now)
            assert delay is not None
            delays.append(delay)
            now += delay
        nominal = 0.5
        for delay in delays:
            self.assertGreaterEqual(delay, nominal * 0.5 - 1e-9)
            self.assertLessEqual(delay, nominal * 1.5 + 1e-9)
            nominal = min(nominal * 1.5, 60.0)
        self.assertLessEqual(max(delays), 90.0)

    def test_after_join_gives_up_after_24h(self) -> None:
        policy = ReconnectPolicy(random.Random(0), 0.0)
        policy.joined()
        self.assertIsNotNone(policy.next_delay(10.0))
        self.assertIsNone(policy.next_delay(10.0 + 24 * 3600))

    def test_retry_after_is_honoured(self) -> None:
        policy = ReconnectPolicy(random.Random(0), 0.0)
        self.assertEqual(policy.next_delay(0.0, retry_after=7.0), 7.0)
        policy.joined()
        self.assertEqual(policy.next_delay(5.0, retry_after=30.0), 30.0)

    def test_join_resets_backoff(self) -> None:
        policy = ReconnectPolicy(random.Random(0), 0.0)
        policy.joined()
        for i in range(20):
            policy.next_delay(float(i))
        policy.joined()
        delay = policy.next_delay(100.0)
        assert delay is not None
        self.assertLessEqual(delay, 0.75)
