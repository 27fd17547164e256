"""The baseline: a bare nats-py responder that echoes each request's bytes back.

python scripts/bench/raw_responder.py nats://127.0.0.1:4222 raw.echo
"""

from __future__ import annotations

import asyncio
import signal
import sys

import nats
from nats.aio.msg import Msg


async def serve(url: str, subject: str, reply_bytes: int | None) -> None:
    client = await nats.connect(url, pending_size=64 * 1024 * 1024)
    fixed = None if reply_bytes is None else bytes(reply_bytes)

    async def echo(msg: Msg) -> None:
        await client.publish(msg.reply, msg.data if fixed is None else fixed)

    await client.subscribe(subject, queue=subject, cb=echo)
    await client.flush()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await client.drain()


if __name__ == "__main__":
    import uvloop

    size = int(sys.argv[3]) if len(sys.argv) > 3 else None
    uvloop.run(serve(sys.argv[1], sys.argv[2], size))
