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

CHUNK = 1000
"""Blocks per message at most, so no replica spends long on one message."""


def invalidations(pod: str, removed: list[tuple[str, int]], stored: list[tuple[str, int]],
                  stored_at: list[float] | None = None, *, cleared: bool = False, chunk: int = CHUNK) -> list[Invalidation]:
    """One change as messages of at most ``chunk`` blocks (``cleared`` on the last)."""
    messages = [Invalidation(pod, removed[start:start + chunk]) for start in range(0, len(removed), chunk)]
    for start in range(0, len(stored), chunk):
        messages.append(Invalidation(pod, [], stored[start:start + chunk],
                                     stored_at=list(stored_at[start:start + chunk]) if stored_at else []))
    if cleared:
        last = messages.pop() if messages else Invalidation(pod)
        messages.append(Invalidation(pod, last.removed, last.stored, cleared=True, stored_at=last.stored_at))
    return messages


encode = msgspec.msgpack.Encoder().encode
_decoder = msgspec.msgpack.Decoder(Invalidation)


def decode(data: bytes) -> Invalidation:
    """Raises msgspec.DecodeError (or UnicodeDecodeError) for a message that is not one."""
    return _decoder.decode(data)
