"""A fair queue: the images of many jobs, handed out round-robin over the jobs.

    job a: a1 a2 a3 a4             pop order: a1 b1 c1 a2 b2 a3 a4
    job b: b1 b2                   (each job takes a turn; within a job, the order pushed)
    job c: c1

A job joins the back of the turns when its first item arrives and leaves them when its last
item is taken, so a one-image job queued behind a batch of thousands waits for at most one
item of each other job, not for the batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Items grouped by key (a job), popped round-robin over the keys that have items."""

    def __init__(self) -> None:
        self._items: dict[Hashable, deque[T]] = {}
        self._turns: deque[Hashable] = deque()
        self._count = 0

    def push(self, key: Hashable, item: T) -> None:
        """Queue ``item`` last of ``key``'s items."""
        self._queue_of(key, front=False).append(item)
        self._count += 1

    def push_front(self, key: Hashable, item: T) -> None:
        """Queue ``item`` first of ``key``'s items (it was taken and must run again); a key
        with no other items takes the next turn."""
        self._queue_of(key, front=True).appendleft(item)
        self._count += 1

    def pop(self) -> T:
        """The first item of the key whose turn it is; IndexError when empty."""
        key = self._turns.popleft()
        items = self._items[key]
        item = items.popleft()
        self._count -= 1
        if items:
            self._turns.append(key)
        else:
            del self._items[key]
        return item

    def remove(self, key: Hashable) -> list[T]:
        """Take every item of ``key`` out of the queue; the items, in order."""
        items = self._items.pop(key, None)
        if items is None:
            return []
        self._turns.remove(key)
        self._count -= len(items)
        return list(items)

    def keys(self) -> Iterator[Hashable]:
        """The keys with items waiting, in the order of their turns."""
        return iter(self._turns)

    def __len__(self) -> int:
        return self._count

    def _queue_of(self, key: Hashable, *, front: bool) -> deque[T]:
        items = self._items.get(key)
        if items is None:
            items = self._items[key] = deque()
            if front:
                self._turns.appendleft(key)
            else:
                self._turns.append(key)
        return items
