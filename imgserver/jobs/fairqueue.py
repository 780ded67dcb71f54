"""A fair queue: the images of many jobs of many owners, handed out round-robin over the
owners, and within an owner's turn round-robin over its jobs.

    owner A, job a: a1 a2 a3 a4     pop order: a1 c1 b1 c2 a2 c3 b2 c4 a3 a4
    owner A, job b: b1 b2           (A and C take turns; A's turns go to a and b in turn;
    owner C, job c: c1 c2 c3 c4      within a job, the order pushed)

A job (or an owner) joins the back of the turns when its first item arrives and leaves them
when its last item is taken: a one-image job queued behind a batch of thousands waits for at
most one item of each other job, and a client's flood of jobs takes one turn among the
clients, not one per job. Without tokens every job has the same owner, and the queue is
round-robin over jobs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class _RoundRobin(Generic[T]):
    """Items grouped by key, popped round-robin over the keys that have items."""

    def __init__(self) -> None:
        self.items: dict[Hashable, deque[T]] = {}
        self.turns: deque[Hashable] = deque()

    def add(self, key: Hashable, item: T, *, front: bool) -> None:
        items = self.items.get(key)
        if items is None:
            items = self.items[key] = deque()
            if front:
                self.turns.appendleft(key)
            else:
                self.turns.append(key)
        if front:
            items.appendleft(item)
        else:
            items.append(item)

    def pop(self) -> T:
        key = self.turns.popleft()
        items = self.items[key]
        item = items.popleft()
        if items:
            self.turns.append(key)
        else:
            del self.items[key]
        return item

    def remove(self, key: Hashable) -> list[T]:
        items = self.items.pop(key, None)
        if items is None:
            return []
        self.turns.remove(key)
        return list(items)


class FairQueue(Generic[T]):
    """Items of jobs of owners, popped round-robin over owners, then over their jobs."""

    def __init__(self) -> None:
        self._owners: _RoundRobin[Hashable] = _RoundRobin()  # owner turns, by owner
        self._jobs: dict[Hashable, _RoundRobin[T]] = {}       # each owner's jobs
        self._count = 0

    def push(self, owner: Hashable, job: Hashable, item: T) -> None:
        """Queue ``item`` last of ``job``'s items."""
        self._add(owner, job, item, front=False)

    def push_front(self, owner: Hashable, job: Hashable, item: T) -> None:
        """Queue ``item`` first of ``job``'s items (it was taken and must run again); an
        owner and a job with no other items take the next turn."""
        self._add(owner, job, item, front=True)

    def pop(self) -> T:
        """The first item of the job whose turn it is, of the owner whose turn it is;
        IndexError when empty."""
        owner = self._owners.pop()
        jobs = self._jobs[owner]
        item = jobs.pop()
        self._count -= 1
        if jobs.turns:
            self._owners.add(owner, owner, front=False)
        else:
            del self._jobs[owner]
        return item

    def remove(self, owner: Hashable, job: Hashable) -> list[T]:
        """Take every item of ``job`` out of the queue; the items, in order."""
        jobs = self._jobs.get(owner)
        if jobs is None:
            return []
        items = jobs.remove(job)
        self._count -= len(items)
        if not jobs.turns:
            del self._jobs[owner]
            self._owners.remove(owner)
        return items

    def keys(self) -> Iterator[Hashable]:
        """The jobs with items waiting (their owners' turns first, then theirs)."""
        for owner in self._owners.turns:
            yield from self._jobs[owner].turns

    def __len__(self) -> int:
        return self._count

    def _add(self, owner: Hashable, job: Hashable, item: T, *, front: bool) -> None:
        jobs = self._jobs.get(owner)
        if jobs is None:
            jobs = self._jobs[owner] = _RoundRobin()
            self._owners.add(owner, owner, front=front)
        elif front and self._owners.turns[0] != owner:
            # It must run next: its owner takes the next turn.
            self._owners.turns.remove(owner)
            self._owners.turns.appendleft(owner)
        jobs.add(job, item, front=front)
        self._count += 1
