"""Typed, versioned, rate-limited notices over gossipsub (topic `/mirador/notices/1`), with peer scoring.

Modules: `codec` (the Notice base, `@notice_type`, strict decoding, reasons), `bucket` (TokenBucket), `guard`
(PeerGuard: per-peer limits, scores, blacklist; config and counters), `board` (NoticeBoard). Import from here.

A notice is a small msgspec struct, JSON-encoded (at most 4 KiB), in a tagged union on `type` with a version
`v` and the time it was sent (`sent_at`, unix seconds). New notice types are declared with `@notice_type`.

`NoticeBoard` is the node's side of the topic. Its topic validator runs inside py-libp2p's `push_msg`, before a
message is delivered or forwarded, so a refused message goes no further. Per peer (the forwarder that handed us
the message, and its signed originator) it keeps a token bucket and a penalty that recovers with time; a peer
whose score falls below the threshold is blacklisted in pubsub and its connection is closed (again on every
reconnect). Our own notices leave through an outgoing token bucket: `publish` waits for a token, and refuses only
when too many notices are already waiting (`NoticeBacklog`), never dropping one silently.

py-libp2p 0.8.1 behaviour this relies on or works around:
- the validator gets `msg_forwarder` (the direct peer) and the message, whose `from_id` is the signed originator;
  our own publications reach it too, with our own ID as forwarder;
- a message a validator refuses is neither delivered nor forwarded, is not marked seen, and its refusal is cached
  by message ID (from_id + seqno) for 5 minutes, so the same message from another peer is refused unseen;
- gossipsub forwards at most `max_messages_per_topic_per_second` (10) messages per forwarder and topic in any
  one-second window, our own publications included, and drops the rest silently (after local delivery); so the
  outgoing bucket keeps `out_burst + out_rate` under that limit;
- `Pubsub.add_to_blacklist` drops the pubsub stream and ignores the peer's messages, but the connection stays
  up and the peer may reconnect (there is no peer-ID connection gate), so the board closes it, on every connect;
- the router's `PeerScorer` exists, but with its default parameters (all weights 0, thresholds -inf) it gates
  nothing, so the scoring here is our own;
- local delivery goes through a 32-message channel: handlers that fall behind lose notices (logged by libp2p).
"""

from node.p2p.notices.board import NoticeBoard
from node.p2p.notices.bucket import TokenBucket
from node.p2p.notices.codec import (
    MAX_AGE_S,
    MAX_FUTURE_S,
    MAX_NOTICE_BYTES,
    TOPIC,
    VERSION,
    NodeHello,
    Notice,
    NoticeBacklog,
    NoticeError,
    NoticeReason,
    decode_notice,
    encode_notice,
    notice_type,
    notice_types,
)
from node.p2p.notices.guard import NoticeConfig, NoticeStats, PeerGuard, ReceivedNotice

__all__ = [
    "MAX_AGE_S",
    "MAX_FUTURE_S",
    "MAX_NOTICE_BYTES",
    "TOPIC",
    "VERSION",
    "NodeHello",
    "Notice",
    "NoticeBacklog",
    "NoticeBoard",
    "NoticeConfig",
    "NoticeError",
    "NoticeReason",
    "NoticeStats",
    "PeerGuard",
    "ReceivedNotice",
    "TokenBucket",
    "decode_notice",
    "encode_notice",
    "notice_type",
    "notice_types",
]
