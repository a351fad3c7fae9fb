"""A TCP relay that delays every byte by a fixed time each way: etcd a zone away, on loopback.

The kernel here has no netem qdisc, so the bench puts this between an Envoy and etcd to see
what batching must hide in production, where an etcd round trip is about 2 ms, not tens of
microseconds. Each chunk read on one side is written to the other `delay` after it was read,
in order; the relay adds no other wait, and its own time to copy a chunk.

    python3 bench/relay.py --listen PORT --to PORT --delay-ms 1
"""

import argparse
import asyncio
import time


async def pipe(reader, writer, delay):
    """Copies `reader` to `writer`, each chunk `delay` seconds after it arrived."""
    queue = asyncio.Queue()

    async def read():
        while chunk := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay, chunk))
        queue.put_nowait((None, b""))

    async def write():
        while True:
            due, chunk = await queue.get()
            if due is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
        writer.close()

    await asyncio.gather(read(), write(), return_exceptions=True)


async def serve(listen, to, delay):
    async def relay(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", to)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, server_writer, delay),
                             pipe(server_reader, client_writer, delay))

    server = await asyncio.start_server(relay, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--to", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.to, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
