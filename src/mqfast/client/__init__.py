"""The Python client of mqfast: blocking (:class:`Client`) and asyncio (:class:`AsyncClient`).

::

    from mqfast.client import Client

    with Client("http://127.0.0.1:8087") as client:          # or MQFAST_URL, MQFAST_TOKEN
        with client.producer("orders") as producer:          # batches by size and linger
            futures = [producer.send(f"order {i}", key=f"user-{i % 10}") for i in range(1000)]
        print(futures[0].result().offset)
        with client.consumer("orders", group="billing") as consumer:
            for message in consumer:                          # long-polls; leases auto-extended
                print(message.content)
                consumer.ack(message)                         # sent in one batch per poll

The asyncio API is the same with ``await`` (``await producer.send(...)`` returns an asyncio
future; ``async for message in consumer``). Errors are :class:`ClientError`\\ s:
:class:`ApiError` (the server's status, ``code``, ``message`` and ``field``),
:class:`ConnectionFailed` (no answer after the retries) and :class:`ItemError` (one message of
a batch refused).
"""

from mqfast.client._aio import (
    NO_RETRY,
    AsyncClient,
    AsyncConsumer,
    AsyncProducer,
    Retry,
)
from mqfast.client._sync import Client, Consumer, Producer
from mqfast.client._types import (
    AckItem,
    AckResult,
    ApiError,
    ClientError,
    ConnectionFailed,
    Duration,
    ItemError,
    Message,
    OutgoingMessage,
    ProduceResult,
)

__all__ = [
    "NO_RETRY",
    "AckItem",
    "AckResult",
    "ApiError",
    "AsyncClient",
    "AsyncConsumer",
    "AsyncProducer",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "Consumer",
    "Duration",
    "ItemError",
    "Message",
    "OutgoingMessage",
    "ProduceResult",
    "Producer",
    "Retry",
]
