"""Who may call which route (authorisation of the slow routes) and the audit log.

Produce is checked on the hot path (``_http.pyx``: ``principal.require("produce", topic)``);
every other route is checked here, before its handler runs, from the path parameters and the
request body. The rules:

=================================================  =============================================
route                                              permission
=================================================  =============================================
POST /api/v1/messages (and batch), to a topic      ``produce`` on the topic; ``admin`` on it as
                                                   well when it does not exist (auto-creation)
POST /api/v1/messages/consume                      ``consume`` on the topic, with that group
                                                   (a heartbeat only of a consumer of that group)
GET /api/v1/messages/stream                        the same, from the query (checked by the
                                                   handler once the query is parsed)
POST /api/v1/messages/acknowledge[/batch], extend  ``consume`` with that group on the topic each
                                                   message really belongs to (checked per item
                                                   once the store found it: a refused item of a
                                                   batch is a 403 item, left as it was); the
                                                   topic named, if any, is checked first
GET /api/v1/topics                                 any caller; lists the topics it has any
                                                   permission on
GET /api/v1/topics/{name}                          any permission on that topic
GET /api/v1/metrics                                any permission on ``topic`` when given; without
                                                   it, the points of the topics the caller has
                                                   any permission on
POST /api/v1/topics, DELETE, redrive               ``admin`` on that topic
GET /api/v1/topics/{name}/dlq                      ``admin`` on that topic (not on its DLQ)
POST /api/v1/consumers                             ``admin`` on each of its topics
DELETE /api/v1/consumers/{id}                      ``admin`` (cluster-wide)
GET /api/v1/consumers[/{id}], heartbeat            a consumer is visible to a caller that may
                                                   ``consume`` one of its topics with its group,
                                                   or ``admin`` one of them: the list shows
                                                   those, the others are 403
GET /api/v1/audit                                  ``admin`` (cluster-wide)
GET, POST /api/v1/grants, DELETE .../{grant_id}    ``admin`` (cluster-wide): a grant may give
                                                   any subject anything, so only who may do
                                                   everything may give it
/health, /openapi.json, /console                   anyone (the console asks for a token)
=================================================  =============================================

Without authentication every caller may do and see everything.

The audit log: one JSON line per administrative action and per refused request, a batch
acknowledgement with refused items included (who, what, when, from where, outcome; never message
content) on the ``mqfast.audit`` logger, also stored in the metadata store when it keeps one
(``audit``/``query_audit``) and queryable by admins.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from fnmatch import fnmatchcase
from typing import Any, Final, Protocol

import msgspec

from mqfast import errors
from mqfast.auth import ROLES, Forbidden, Principal
from mqfast.groups import Authorize, now_ms
from mqfast.messages import MAX_CONSUMER_TOPICS, ConsumerInfo

log = logging.getLogger("mqfast.audit")


class _Fields(msgspec.Struct, gc=False):
    """The fields of a request body that decide permissions (and name an audit target);
    everything else is skipped unparsed into objects (an acknowledgement batch's list)."""

    topic: Any = None
    group_id: Any = None
    name: Any = None
    consumer_id: Any = None
    topics: Any = None
    subject: Any = None


_NO_FIELDS: Final = _Fields()
_ROLES: Final = frozenset(ROLES)
_fields_decoder = msgspec.json.Decoder(_Fields)

# Routes whose every call is an administrative action, recorded in the audit log.
AUDITED = frozenset(
    {
        ("POST", "/api/v1/topics"),
        ("DELETE", "/api/v1/topics/{name}"),
        ("POST", "/api/v1/topics/{name}/redrive"),
        ("POST", "/api/v1/consumers"),
        ("DELETE", "/api/v1/consumers/{consumer_id}"),
    }
)
# The console's files are public: its page asks for a token and sends it with each API call.
PUBLIC_ROUTES = frozenset(
    {"/health", "/health/live", "/health/ready", "/openapi.json", "/console", "/console/{file}"}
)
ACK_ROUTES = frozenset(
    {
        "/api/v1/messages/acknowledge",
        "/api/v1/messages/acknowledge/batch",
        "/api/v1/messages/extend",
    }
)


def _fields(body: bytes) -> _Fields:
    # Only the fields that decide permissions; the handler validates the request fully. A body
    # that is not a JSON object gives no fields: the handler answers it with a 400.
    try:
        return _fields_decoder.decode(body) if body else _NO_FIELDS
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError):
        return _NO_FIELDS


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _forbidden(
    principal: Principal, what: str, target: str = "", field: str | None = None
) -> errors.MqfastError:
    return Forbidden(f"subject {principal.subject!r} may not {what}", field=field, target=target)


def _may_use_group(principal: Principal, group: str | None) -> None:
    """Acknowledge without a topic: the consumer role, or some grant that lets the caller
    consume with ``group`` (on any topic)."""
    if principal.allows("consume", "*", group):  # the roles, and grants on every topic
        return
    for g in principal.grants:
        if "consume" in g.actions and (g.groups is None or group in g.groups):
            return
    raise _forbidden(principal, f"consume with group {group!r} (needs 'consume' for it)")


def _any_permission(principal: Principal, topic: str) -> bool:
    if principal.roles & _ROLES:
        return True
    return any(g.actions and fnmatchcase(topic, g.topics) for g in principal.grants)


def may_see_topic(principal: Principal | None, topic: str) -> bool:
    """Whether the caller may learn that ``topic`` exists and read its figures."""
    return principal is None or _any_permission(principal, topic)


def require_see_topic(principal: Principal | None, topic: str) -> None:
    if not may_see_topic(principal, topic):
        assert principal is not None
        raise _forbidden(principal, f"see topic {topic!r} (needs any permission on it)", topic)


def may_see_consumer(principal: Principal | None, info: ConsumerInfo) -> bool:
    """A registered consumer belongs to its group's grants: visible to a caller that may
    consume one of its topics with its group, or administer one of them."""
    if principal is None:
        return True
    return any(
        principal.allows("consume", t, info.group_id) or principal.allows("admin", t)
        for t in info.topics
    )


def require_see_consumer(principal: Principal | None, info: ConsumerInfo) -> None:
    if not may_see_consumer(principal, info):
        assert principal is not None
        raise _forbidden(
            principal,
            f"see consumer {info.consumer_id!r} (needs 'consume' on one of its topics for "
            f"group {info.group_id!r}, or 'admin' on one of them)",
            info.consumer_id,
        )


def settle_authorizer(principal: Principal | None, group: str) -> Authorize | None:
    """The per-message check of acknowledge, nack and extend (``GroupStore.settle``):
    ``consume`` with ``group`` on the topic the message really belongs to. The refusal does
    not name that topic: the caller may not know it exists."""
    if principal is None:
        return None

    def check(topic: str) -> errors.MqfastError | None:
        if principal.allows("consume", topic, group):
            return None
        return _forbidden(
            principal,
            f"settle this message in group {group!r}: it is on a topic the subject may not "
            f"consume from (needs 'consume' on a pattern matching that topic, for group "
            f"{group!r})",
            topic,
            "message_id",
        )

    return check


def authorize(
    template: str, method: str, params: list[str], body: bytes, principal: Principal
) -> None:
    """Raise ``Forbidden`` unless ``principal`` may make this call (see the module table)."""
    if template in PUBLIC_ROUTES:
        return
    if template == "/api/v1/messages/consume":
        f = _fields(body)
        topic = _str(f.topic)
        if topic is not None:
            principal.require("consume", topic, _str(f.group_id))
        return
    if template in ACK_ROUTES:
        # The group first; each message's own topic is checked once the store has found it
        # (settle_authorizer), since an acknowledgement need not name its topic.
        f = _fields(body)
        group = _str(f.group_id)
        topic = _str(f.topic)
        if topic is None:
            _may_use_group(principal, group)
        else:
            principal.require("consume", topic, group)
        return
    if template == "/api/v1/topics":
        if method == "POST":
            name = _str(_fields(body).name)
            if name is not None:
                principal.require("admin", name)
        return
    if template == "/api/v1/topics/{name}":
        name = params[0]
        if method == "DELETE":
            principal.require("admin", name)
        else:
            require_see_topic(principal, name)
        return
    if template in ("/api/v1/topics/{name}/redrive", "/api/v1/topics/{name}/dlq"):
        # A dead letter is read and moved by the topic's administrators (it was given up on).
        principal.require("admin", params[0])
        return
    if template == "/api/v1/consumers" and method == "POST":
        wanted = _fields(body).topics
        # A longer list is refused (400) by the handler before anything is done: not worth
        # a permission check per topic.
        if isinstance(wanted, list) and len(wanted) <= MAX_CONSUMER_TOPICS:
            for topic in wanted:
                if isinstance(topic, str):
                    principal.require("admin", topic)
        return
    if template == "/api/v1/consumers/{consumer_id}" and method == "DELETE":
        principal.require("admin")
        return
    if template in ("/api/v1/audit", "/api/v1/grants", "/api/v1/grants/{grant_id}"):
        principal.require("admin")
        return


def target_of(body: bytes) -> str:
    """What an administrative request acts on, for the audit log (never message content)."""
    f = _fields(body)
    for value in (_str(f.name), _str(f.consumer_id), _str(f.topic), _str(f.subject)):
        if value:
            return value[:256]
    return ""


class AuditStore(Protocol):
    async def audit(self, entry: dict[str, object]) -> None: ...


class AuditLog:
    """Writes each entry as a log line at once and to the metadata store in the background."""

    MAX_QUEUED = 10_000

    def __init__(self, store: AuditStore | None) -> None:
        self.store = store
        self._queue: deque[dict[str, object]] = deque(maxlen=self.MAX_QUEUED)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def record(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        outcome: str,
        peer: str,
        detail: dict[str, object] | None = None,
    ) -> None:
        entry: dict[str, object] = {
            "time_ms": now_ms(),
            "actor": actor,
            "action": action,
            "target": target,
            "outcome": outcome,
            "remote_addr": peer,
            "detail": detail or {},
        }
        log.info("audit", extra={k: v for k, v in entry.items() if k != "time_ms"})
        if self.store is None:
            return
        if len(self._queue) == self.MAX_QUEUED:
            self.dropped += 1  # the store is down for long: the log line above remains
        self._queue.append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        assert self.store is not None
        while self._queue:
            entry = self._queue[0]
            try:
                await self.store.audit(entry)
            except errors.Unavailable:
                await asyncio.sleep(1.0)  # kept in the queue; written when the store returns
                continue
            except Exception:
                log.exception("audit entry could not be stored; kept in the log only")
            self._queue.popleft()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 2.0)
            except TimeoutError:
                self._task.cancel()
