"""``python -m tests.reliability.serve_with_options MODEL JSON``: the real server with any ServerOptions field set.

The CLI exposes the operator-facing limits only; tests need short header/body timeouts too (slow-loris
cases) and a process of their own (crash detection, resident memory).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

from server_stub.app import ServerOptions, serve


async def _main(opts: ServerOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(opts, stop, on_ready=lambda port: print(f"ready http://127.0.0.1:{port}", flush=True))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServerOptions(model=sys.argv[1], host="127.0.0.1", **json.loads(sys.argv[2]))
    asyncio.run(_main(options))
