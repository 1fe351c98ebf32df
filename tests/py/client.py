"""A python-socketio client for tests/python_client.rs: the README's two Python examples.

Reports JSON lines on stdout; takes commands as lines on stdin.

  client.py plain URL NAMESPACE KEY TRANSPORT
      socketio.Client, the key in the apikey header, a one-argument messages.upsert handler.
      Runs until stdin closes.
  client.py recover URL NAMESPACE KEY
      socketio.AsyncClient with reconnection and an auth callable carrying the last offset;
      two-argument messages.upsert handler and sidecar.recovery. Command "blink" closes the
      websocket under the client, which then reconnects by itself (after 3 s).

CLIENT_PY_DEBUG=1 in the environment logs engineio/urllib3 debugging to stderr.
"""

import asyncio
import json
import logging
import os
import sys

import socketio


def report(**fields):
    print(json.dumps(fields), flush=True)


def plain(url, namespace, key, transport):
    sio = socketio.Client(reconnection=False)

    @sio.on("messages.upsert", namespace=namespace)
    def on_message(event):
        report(type="event", event="messages.upsert", args=[event])

    @sio.on("connect_error", namespace=namespace)
    def on_connect_error(data):
        report(type="connect_error", data=data)

    try:
        sio.connect(url, namespaces=[namespace], transports=[transport], headers={"apikey": key})
    except socketio.exceptions.ConnectionError as err:
        report(type="connect_failed", error=str(err))
        return
    report(type="ready", transport=sio.transport())
    sys.stdin.read()
    sio.disconnect()


async def recover(url, namespace, key):
    last = {"offset": ""}
    sio = socketio.AsyncClient(reconnection=True, reconnection_delay=3, randomization_factor=0)

    @sio.on("messages.upsert", namespace=namespace)
    async def on_message(message, offset):
        report(type="event", n=message["data"]["n"], offset=offset)
        last["offset"] = offset

    @sio.on("sidecar.recovery", namespace=namespace)
    async def on_recovery(info):
        report(type="recovery", info=info)

    @sio.on("connect", namespace=namespace)
    async def on_connect():
        report(type="connected", offset=last["offset"])

    @sio.on("disconnect", namespace=namespace)
    async def on_disconnect(*_reason):
        report(type="disconnected")

    await sio.connect(
        url,
        namespaces=[namespace],
        transports=["websocket"],
        auth=lambda: {"apikey": key, "offset": last["offset"]},
    )
    report(type="ready")
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        if line.strip() == "blink":
            # The transport drops under the client: not a disconnect() it asked for.
            await sio.eio.ws.close()
    await sio.shutdown()


def main():
    if os.environ.get("CLIENT_PY_DEBUG"):
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "plain":
        plain(*rest)
    elif mode == "recover":
        asyncio.run(recover(*rest))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
