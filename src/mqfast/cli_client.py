"""``mqfast produce|consume|topics|dlq``: kcat-like commands over :mod:`mqfast.client`.

Answers go to stdout as JSON lines; errors to stderr as one line (the server's code, message
and field), exit status 1; usage errors exit 2. Long runs show a progress line on stderr when
it is a terminal and nothing otherwise, so pipelines stay clean. The client is imported only
when one of these commands runs: ``mqfast serve`` does not load it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from mqfast.client import Client, OutgoingMessage

_URL_HELP = "gateway URL (MQFAST_URL, default http://127.0.0.1:8087); the token: MQFAST_TOKEN"


def add_commands(
    parser: argparse.ArgumentParser, sub: argparse._SubParsersAction[argparse.ArgumentParser]
) -> None:
    """Add the client commands (and ``--url``) to the ``mqfast`` parser."""
    parser.add_argument("--url", help=_URL_HELP)
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given after the command it wins, else the one before it (``mqfast --url``) stays.
    common.add_argument("--url", default=argparse.SUPPRESS, help=_URL_HELP)

    p = sub.add_parser(
        "produce",
        parents=[common],
        help="produce the lines of stdin to a topic (batched)",
        description="Each line of stdin is a message: its content (--format lines, the "
        "default) or a JSON object with `content` and optionally `key`, `headers`, `priority`, "
        "`ttl`, `topic` (--format json). Exit 1 if any message was refused.",
    )
    p.add_argument("topic")
    p.add_argument("--format", choices=["lines", "json"], default="lines")
    p.add_argument("--key", help="the key of every message (lines format)")
    p.add_argument("--batch-size", type=int, default=1000, help="messages per request (1000)")
    p.add_argument("--linger", type=float, default=0.005, help="seconds a batch waits (0.005)")
    p.set_defaults(client_command=_produce)

    c = sub.add_parser(
        "consume",
        parents=[common],
        help="print the messages of a topic as JSON lines, acknowledging each after printing",
        description="Long-polls TOPIC in GROUP and prints each message as a JSON line; a "
        "message is acknowledged once it is printed (not with --no-ack: then it is released "
        "for redelivery when the command ends). Runs until --max messages, until --wait "
        "seconds pass without one, or Ctrl-C / SIGTERM (queued acks are sent and held "
        "messages released first).",
    )
    c.add_argument("topic")
    c.add_argument("--group", required=True, help="the consumer group")
    c.add_argument("--consumer-id", help="default: host-pid-random")
    c.add_argument("--max", type=int, help="stop after this many messages")
    c.add_argument("--wait", type=float, help="stop after this many seconds without a message")
    c.add_argument("--no-ack", action="store_true", help="print without acknowledging")
    c.add_argument("--batch-size", type=int, default=100, help="messages per poll (100)")
    c.set_defaults(client_command=_consume)

    t = sub.add_parser("topics", help="list, get, create or delete topics")
    tsub = t.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    tsub.add_parser("list", parents=[common], help="every topic, one JSON line each")
    for action in ("get", "delete"):
        a = tsub.add_parser(action, parents=[common], help=f"{action} a topic")
        a.add_argument("name")
    create = tsub.add_parser("create", parents=[common], help="create a topic")
    create.add_argument("name")
    create.add_argument("--partitions", type=int)
    create.add_argument("--retention", help="e.g. 168h; 0 keeps messages forever")
    create.add_argument("--max-size", type=int, help="bytes the topic may hold")
    create.add_argument("--dead-letter-expired", action="store_true", default=None)
    create.add_argument("--encrypted", action="store_true", default=None)
    t.set_defaults(client_command=_topics)

    d = sub.add_parser("dlq", help="dead letters")
    dsub = d.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    r = dsub.add_parser(
        "redrive", parents=[common], help="move the dead letters of TOPIC back to it"
    )
    r.add_argument("topic")
    r.add_argument("--max", type=int, help="move at most this many (oldest first)")
    d.set_defaults(client_command=_redrive)


def run_command(args: argparse.Namespace) -> int:
    """Run a client command; a :class:`ClientError` is one line on stderr and exit 1."""
    from mqfast.client import Client, ClientError

    name = f"mqfast {args.command}"
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        with Client(args.url) as client:
            command: Callable[[Client, argparse.Namespace], int] = args.client_command
            return command(client, args)
    except ClientError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # Leaving the with-blocks sent the queued acks and released what was held.
        return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)
    except BrokenPipeError:
        # Whoever reads stdout went away (``| head``): nothing more to say, to anyone.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping a command as cleanly as Ctrl-C does."""

    signum = signal.SIGTERM


class _Signals:
    """Where a stop signal may interrupt: anywhere but inside :meth:`deferred`."""

    deferring = False
    pending: int | None = None

    @classmethod
    @contextlib.contextmanager
    def deferred(cls) -> Iterator[None]:
        """A stop signal inside the block takes effect at its end (print, then ack)."""
        cls.deferring = True
        try:
            yield
        finally:
            cls.deferring = False
        if cls.pending is not None:
            _raise(cls.pending)


def _stop(signum: int, frame: object) -> None:
    if _Signals.deferring:
        _Signals.pending = signum
    else:
        _raise(signum)


def _raise(signum: int) -> None:
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _print(answer: Any) -> None:
    sys.stdout.buffer.write(msgspec.json.encode(answer) + b"\n")
    sys.stdout.flush()


def _topics(client: Client, args: argparse.Namespace) -> int:
    action = args.topics_command
    if action == "list":
        for topic in client.list_topics():
            _print(topic)
    elif action == "get":
        _print(client.get_topic(args.name))
    elif action == "delete":
        _print(client.delete_topic(args.name))
    else:
        settings = {
            "partitions": args.partitions,
            "retention": args.retention,
            "max_size": args.max_size,
            "dead_letter_expired": args.dead_letter_expired,
            "encrypted": args.encrypted,
        }
        _print(client.create_topic(args.name, **settings))
    return 0


def _redrive(client: Client, args: argparse.Namespace) -> int:
    _print(client.redrive(args.topic, args.max))
    return 0


class Progress:
    """A line on a terminal's stderr: count, rate and, with a known total, a bar."""

    def __init__(self, verb: str, total: int | None = None, out: IO[str] | None = None) -> None:
        stream = out or sys.stderr
        self.out = stream if stream.isatty() else None
        self.verb = verb
        self.total = total
        self.count = 0
        self.started = self.shown = time.monotonic()

    def advance(self, n: int = 1, fraction: float | None = None) -> None:
        self.count += n
        now = time.monotonic()
        if self.out is not None and now - self.shown >= 0.2:
            self.shown = now
            self._render(now, fraction)

    def _render(self, now: float, fraction: float | None) -> None:
        assert self.out is not None
        if fraction is None and self.total:
            fraction = self.count / self.total
        rate = self.count / max(now - self.started, 1e-9)
        bar = ""
        if fraction is not None:
            filled = round(24 * min(fraction, 1.0))
            bar = f"[{'#' * filled}{'.' * (24 - filled)}] {100 * min(fraction, 1.0):3.0f}% "
        self.out.write(f"\r{bar}{self.verb} {self.count:,} messages, {rate:,.0f} msg/s\x1b[K")
        self.out.flush()

    def finish(self) -> None:
        if self.out is not None:
            self._render(time.monotonic(), 1.0 if self.total else None)
            self.out.write("\n")
            self.out.flush()


def _messages(
    args: argparse.Namespace, lines: Iterable[bytes]
) -> Iterator[tuple[int, OutgoingMessage]]:
    """(line number, message) for each line of stdin; blank lines are skipped in JSON."""
    from mqfast.client import OutgoingMessage

    decoder = msgspec.json.Decoder(OutgoingMessage)
    for number, line in enumerate(lines, 1):
        text = line.removesuffix(b"\n").removesuffix(b"\r")
        if args.format == "lines":
            yield number, OutgoingMessage(text.decode("utf-8", "replace"), key=args.key)
            continue
        if not text.strip():
            continue
        try:
            message = decoder.decode(text)
        except msgspec.DecodeError as e:
            raise _BadInput(f"line {number}: {e}") from None
        if message.idempotency_key is not None:
            raise _BadInput(f"line {number}: idempotency_key is set by the client")
        yield number, message


class _BadInput(Exception):
    pass


def _produce(client: Client, args: argparse.Namespace) -> int:
    from mqfast.client import ClientError

    stdin = sys.stdin.buffer
    size = _regular_size(stdin)
    progress = Progress("produced", out=sys.stderr)
    failed: dict[str, list[int]] = {}  # error: its lines
    read = 0

    def done(line: int) -> Callable[[Any], None]:
        def report(fut: Any) -> None:
            error = fut.exception()
            if error is None:
                progress.advance(1, read / size if size else None)
            else:
                failed.setdefault(str(error), []).append(line)

        return report

    with client.producer(args.topic, batch_size=args.batch_size, linger=args.linger) as producer:
        try:
            for number, message in _messages(args, stdin):
                read = stdin.tell() if size else 0
                producer.send(
                    message.content,
                    topic=message.topic,
                    key=message.key,
                    headers=message.headers,
                    priority=message.priority,
                    ttl=message.ttl,
                ).add_done_callback(done(number))
        except _BadInput as e:
            producer.flush()
            progress.finish()
            print(f"mqfast produce: {e}; the lines before it were produced", file=sys.stderr)
            return 2
    progress.finish()
    for error, lines in list(failed.items())[:20]:
        where = f"line {lines[0]}" if len(lines) == 1 else f"{len(lines)} lines from {lines[0]}"
        print(f"mqfast produce: {where}: {error}", file=sys.stderr)
    refused = sum(len(lines) for lines in failed.values())
    if refused:
        raise ClientError(f"{refused} of {progress.count + refused} messages refused")
    return 0


def _regular_size(stream: IO[bytes]) -> int:
    """The size of stdin when it is a regular file (a known total for the bar), else 0."""
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return 0
    import stat

    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _consume(client: Client, args: argparse.Namespace) -> int:
    progress = Progress("consumed", total=args.max)
    left = args.max
    idle_since = time.monotonic()
    poll = 30.0 if args.wait is None else min(args.wait, 30.0)
    with client.consumer(
        args.topic, args.group, consumer_id=args.consumer_id, batch_size=args.batch_size
    ) as consumer:
        while left is None or left > 0:
            want = args.batch_size if left is None else min(left, args.batch_size)
            messages = consumer.poll(want, poll)
            if not messages:
                if args.wait is not None and time.monotonic() - idle_since >= args.wait:
                    break
                continue
            out = sys.stdout.buffer
            with _Signals.deferred():  # what is printed is acknowledged, even on Ctrl-C
                for m in messages:
                    out.write(msgspec.json.encode(m) + b"\n")
                out.flush()  # printed before acknowledged: a crash here redelivers, never loses
                if not args.no_ack:
                    for m in messages:
                        consumer.ack(m)
            progress.advance(len(messages))
            idle_since = time.monotonic()
            if left is not None:
                left -= len(messages)
    progress.finish()
    return 0
