"""kill -9 with leased, unacknowledged messages; and an idle long-poll costs no CPU."""

from __future__ import annotations

import os
import time
from typing import Any

from tests.conformance.conftest import Background, Gateway, GatewayFactory, wait_for
from tests.conftest import MakeServer, MqfastProcess

TOPIC_PARTITIONS = 3


def test_kill9_redelivers_every_unacknowledged_message_and_no_acknowledged_one(
    make_server: MakeServer,
) -> None:
    factory = GatewayFactory("embedded", make_server)
    gw = factory.start()
    t = gw.topic(partitions=TOPIC_PARTITIONS)
    ids = [x["message_id"] for x in gw.produce_many(t, 40)]

    leased = gw.consume_until(t, "g", "c1", 30, visibility="3s")
    acked = {m["message_id"] for m in leased[::2]}
    for mid in sorted(acked):  # out of offset order across partitions
        assert gw.ack(mid, "g", consumer="c1")["status"] == "acknowledged"
    # one failed delivery waiting for its retry survives the crash too
    retrying = leased[1]
    gw.nack(retrying["message_id"], "g", consumer="c1", requeue_delay="2s")
    pending = set(ids) - acked  # leased and not acknowledged, or never leased
    assert len(acked) == 15 and len(pending) == 25
    gw.proc.kill9()

    again = factory.restart(gw)
    got: dict[str, dict[str, Any]] = {}

    def collect() -> bool:
        for m in again.consume(t, "g", "c2", max_messages=50, timeout="1s"):
            assert m["message_id"] not in acked, f"acknowledged message redelivered: {m}"
            assert m["message_id"] not in got, f"delivered twice after the restart: {m}"
            got[m["message_id"]] = m
            assert again.ack(m["message_id"], "g", consumer="c2")["status"] == "acknowledged"
        return set(got) == pending

    wait_for(collect, timeout=30, every=0, what="every unacknowledged message")
    leased_ids = {m["message_id"] for m in leased}
    for mid, m in got.items():
        if mid == retrying["message_id"]:
            assert m["delivery_count"] == 2
        elif mid in leased_ids:
            assert m["delivery_count"] == 2, m  # the expired lease was a failed delivery
        else:
            assert m["delivery_count"] == 1, m
    # nothing else comes, and the group is complete
    time.sleep(0.5)
    assert again.consume(t, "g", "c2", max_messages=50, timeout="2s") == []
    assert again.lag(t, "g") == 0
    # another group still sees all 40
    assert len(again.consume_until(t, "other", "c3", 40)) == 40


def cpu_seconds(proc: MqfastProcess) -> float:
    """utime + stime of the server process (all its threads), from /proc/<pid>/stat."""
    assert proc.proc is not None
    with open(f"/proc/{proc.proc.pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_long_poll_uses_no_measurable_cpu(make_server: MakeServer) -> None:
    # default durations (no FAST_ENV): only the long-poll is going on
    gw = Gateway(make_server(MESSAGE_QUEUE_ENGINE="embedded"), "embedded")
    t = gw.topic()
    time.sleep(0.5)  # let start-up work settle
    poll = Background(lambda: gw.consume(t, "g", "idle", timeout="30s"))
    time.sleep(0.3)
    before = cpu_seconds(gw.proc)
    msgs = poll.result(timeout=60)
    used = cpu_seconds(gw.proc) - before
    assert msgs == []
    assert poll.finished is not None and poll.finished - poll.started >= 29
    assert used < 0.3, f"an idle 30 s long-poll used {used:.2f} s of CPU"
