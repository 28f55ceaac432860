"""Grants kept in the metadata store (``/api/v1/grants``): what a valid one is, and the cache of
them that every process keeps.

A stored grant has the shape of a grant of the token's grants claim (``auth.Grant``: a topic
glob, actions, optionally consumer groups) and names the subject it is for. A principal's
permissions are the union of its roles, its claim grants and the stored grants of its subject:
nothing denies, so there is no precedence to resolve; a stored grant only ever adds, and
deleting one takes away only what it gave.

Permission checks never reach the store. ``GrantCache`` holds every subject's stored grants in
memory; ``auth.Authenticator`` adds them to a principal when it verifies a token, and the
verified principals are cached (by the authenticator and by the compiled core). So a change is
applied by reloading the cache and then dropping the cached principals of the subject whose
grants changed (``on_changed``): its next request is verified again and gets the new grants.
Changes reach every process through the store (``on_grants_changed``): PostgreSQL
``LISTEN/NOTIFY`` on the cluster, a change counter read about once a second by every process
sharing an SQLite file. A process that made the change applies it before it answers. While the
store cannot be read, the grants read last stay in force (reloads are retried every second).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final, Protocol

from mqfast import errors
from mqfast.auth import ACTIONS, Grant
from mqfast.groups import NOT_IN_ID, check_id
from mqfast.messages import CreateGrantRequest, StoredGrant

__all__ = ["MAX_STORED_GRANTS", "GrantCache", "GrantStore", "check_request", "glob_error"]

log = logging.getLogger("mqfast.auth")

# Per subject; as many as a token's grants claim may carry (auth._MAX_GRANTS).
MAX_STORED_GRANTS: Final = 256
MAX_SUBJECT: Final = 1024  # as auth._MAX_NAME
MAX_GROUPS: Final = 256
_MAX_GLOB: Final = 249  # a pattern longer than any topic name matches none but by '*'
_TOPIC_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
# A failed reload is tried again (as a full reload) after this long.
_RETRY_S: Final = 1.0


def glob_error(pattern: str) -> str | None:
    """Why ``pattern`` is not a topic glob (``fnmatchcase``), or None.

    Outside brackets: topic-name characters, ``*`` and ``?``; a ``[`` opens a set of topic-name
    characters (``!`` first negates, ``a-z`` is a range) that a ``]`` must close. Anything
    else could never match a topic name, so it is a mistake, not a grant.
    """
    if not pattern:
        return "must not be empty"
    if len(pattern) > _MAX_GLOB:
        return f"is longer than {_MAX_GLOB} characters"
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            start = j
            while j < n and pattern[j] != "]":
                if pattern[j] not in _TOPIC_CHARS:
                    return f"has {pattern[j]!r} in a '[...]' set (topic-name characters only)"
                j += 1
            if j >= n:
                return f"has an unclosed '[' at position {i}"
            if j == start:
                return f"has an empty '[]' set at position {i}"
            i = j + 1
            continue
        if c not in _TOPIC_CHARS and c not in "*?":
            return (
                f"has {c!r} at position {i}: a topic glob holds ASCII letters, digits, '.', '_',"
                " '-' and the wildcards '*', '?', '[...]'"
            )
        i += 1
    return None


def check_request(req: CreateGrantRequest) -> Grant:
    """The grant ``req`` asks for, in its one form; ``BadRequest`` naming the faulty field."""
    if not req.subject or len(req.subject) > MAX_SUBJECT or NOT_IN_ID.search(req.subject):
        raise errors.BadRequest(
            f"subject must be 1 to {MAX_SUBJECT} characters, none of them a control character",
            field="subject",
        )
    reason = glob_error(req.topics)
    if reason is not None:
        raise errors.BadRequest(f"topics {reason} (got {req.topics[:64]!r})", field="topics")
    if not req.actions:
        raise errors.BadRequest(
            f"actions must not be empty (any of {', '.join(ACTIONS)})", field="actions"
        )
    for i, action in enumerate(req.actions):
        if action not in ACTIONS:
            raise errors.BadRequest(
                f"unknown action {action[:32]!r}; expected {', '.join(ACTIONS)}",
                field=f"actions[{i}]",
            )
    groups = None
    if req.groups is not None:
        if not req.groups or len(req.groups) > MAX_GROUPS:
            raise errors.BadRequest(
                f"groups must hold 1 to {MAX_GROUPS} group ids (leave it out for any group)",
                field="groups",
            )
        for i, group in enumerate(req.groups):
            check_id(group, f"groups[{i}]")
        groups = frozenset(req.groups)
    return Grant(req.topics, frozenset(req.actions), groups)


def actions_of(grant: Grant) -> list[str]:
    """The actions of ``grant`` in ``ACTIONS`` order: one grant, one stored form."""
    return [a for a in ACTIONS if a in grant.actions]


def groups_of(grant: Grant) -> list[str] | None:
    return None if grant.groups is None else sorted(grant.groups)


def as_grant(stored: StoredGrant) -> Grant:
    groups = None if stored.groups is None else frozenset(stored.groups)
    return Grant(stored.topics, frozenset(stored.actions), groups)


class GrantStore(Protocol):
    """What the cache needs of the metadata store (``meta.MetaStore`` has it)."""

    on_grants_changed: Callable[[str | None], None] | None

    async def list_grants(self, subject: str | None = None) -> list[StoredGrant]: ...


class GrantCache:
    """Every subject's stored grants as this process last read them; ``get`` never waits.

    ``changed(subject)`` (``None``: any) schedules a reload from the store; reloads run one at a
    time in a background task, so that an older read never lands after a newer one. After each,
    ``on_changed(subject)`` is called for every subject whose grants differ.
    """

    def __init__(self, store: GrantStore) -> None:
        self.store = store
        self.on_changed: Callable[[str], None] | None = None
        self._grants: dict[str, tuple[Grant, ...]] = {}
        self._dirty: set[str] = set()
        self._full_due = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        # One reload at a time: a read that starts later also lands later.
        self._lock = asyncio.Lock()

    def get(self, subject: str) -> tuple[Grant, ...]:
        """The stored grants of ``subject`` (a dict lookup)."""
        return self._grants.get(subject, ())

    async def start(self) -> None:
        """Load every grant, then follow the store's change notifications."""
        await self.reload(None)
        self.store.on_grants_changed = self.changed
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="mqfast-grants")

    async def close(self) -> None:
        self.store.on_grants_changed = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def changed(self, subject: str | None) -> None:
        """The grants of ``subject`` (``None``: of any subject) changed in the store."""
        if subject is None:
            self._full_due = True
        else:
            self._dirty.add(subject)
        self._wake.set()

    async def reload(self, subject: str | None) -> None:
        """Read the grants of ``subject`` (``None``: all) from the store now and apply them."""
        async with self._lock:
            self._apply(subject, await self.store.list_grants(subject))

    def _apply(self, subject: str | None, stored: list[StoredGrant]) -> None:
        fresh: dict[str, list[Grant]] = {}
        for s in stored:
            fresh.setdefault(s.subject, []).append(as_grant(s))
        subjects = set(fresh) if subject is None else {subject}
        if subject is None:
            subjects |= self._grants.keys()
        for name in sorted(subjects):
            new = tuple(fresh.get(name, ()))
            if new == self._grants.get(name, ()):
                continue
            if new:
                self._grants[name] = new
            else:
                self._grants.pop(name, None)
            if self.on_changed is not None:
                try:
                    self.on_changed(name)
                except Exception:
                    log.exception("grants: dropping the cached principals of %r failed", name)

    async def _follow(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            full, self._full_due = self._full_due, False
            names, self._dirty = self._dirty, set()
            try:
                if full:
                    await self.reload(None)
                else:
                    for name in sorted(names):
                        await self.reload(name)
            except errors.Unavailable as e:
                self._failures += 1
                if self._failures == 1:
                    log.warning("grants: reloading from the metadata store failed, retrying: %s", e)
                self._full_due = True
                await asyncio.sleep(_RETRY_S)
                self._wake.set()
                continue
            if self._failures:
                log.info("grants: reloaded after %d failures", self._failures)
            self._failures = 0
