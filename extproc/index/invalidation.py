"""The invalidation feed's message: which blocks a pod gained or lost.

Every index write that adds a pod to a block or removes it is announced, so serve replicas
can drop cached lookups that are no longer true. On Redis the message goes to channel
``{metaPrefix}invalidate`` as msgpack; the memory backend calls its listeners directly.

Wire format: a msgpack array ``[pod, removed, stored, cleared, stored_at]`` where ``removed``
and ``stored`` are arrays of ``[model, block key]`` and ``stored_at`` the unix seconds of each
stored block (so a replica can keep the entry as the index has it). Compatibility rule: fields are only ever
appended, each with a default, so a replica of an older release reads a newer message (the
extra fields are ignored) and a newer replica reads an older one (the defaults apply).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec


class Invalidation(msgspec.Struct, array_like=True, frozen=True):
    """A pod gained or lost blocks; sent to every serve replica."""

    pod: str
    removed: list[tuple[str, int]] = []
    stored: list[tuple[str, int]] = []
    cleared: bool = False
    """Everything of the pod was dropped (purge, AllBlocksCleared)."""
    stored_at: list[float] = []
    """Unix seconds of each ``stored`` block (empty from senders older than this field)."""


InvalidationListener = Callable[[Invalidation], None]

FEED_LOST = "*"
"""Pod name of the Invalidation delivered when the feed was down: anything may have changed."""

encode = msgspec.msgpack.Encoder().encode
_decoder = msgspec.msgpack.Decoder(Invalidation)


def decode(data: bytes) -> Invalidation:
    """Raises msgspec.DecodeError (or UnicodeDecodeError) for a message that is not one."""
    return _decoder.decode(data)
