"""Connection hygiene for `hotcold serve`. uvicorn's only read timer is keep-alive, and the first byte of a
request cancels it, so a client that sends half a header or half a body (slowloris) holds a socket forever.
Here, nginx-style: a request header must arrive whole within --read-timeout of the server starting to wait
for it (the connection is then closed), a request body may not stall longer than that between two reads
(408, then closed), and connections beyond --max-connections are answered 503. All errors are OpenAI's
envelope, and while draining every response says `Connection: close` so clients reconnect elsewhere."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from hotcold.server.serving import APIError

log = logging.getLogger("hotcold.server")

CLOSE = (b"connection", b"close")


async def send_error(send: Any, err: APIError) -> None:
    """Answer with `err` as an envelope and close the connection after it."""
    body = json.dumps(err.envelope()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            CLOSE]})
    await send({"type": "http.response.body", "body": body})


def protocol_class(read_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-header deadline and a connection cap (pass it as `http=`)."""

    async def over_capacity(scope: dict, receive: Any, send: Any) -> None:
        await send_error(send, APIError(503, f"too many connections (the server allows {max_connections})",
                                        type="server_error", code="service_unavailable"))

    class Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:  # this connection's requests all get 503
                self.app = over_capacity
            self._sync_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._sync_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._sync_header_timer()  # a kept-alive connection waits for its next header

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None
            super().connection_lost(exc)

        def _sync_header_timer(self) -> None:
            """Run the deadline exactly while a request header is awaited (h11's IDLE); never reset it on a
            byte, so a header sent one byte at a time still has to be whole in time."""
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self.header_timer is None:
                self.header_timer = self.loop.call_later(read_timeout, self._header_timed_out)
            elif not waiting and self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _header_timed_out(self) -> None:
            self.header_timer = None
            if not self.transport.is_closing():
                log.debug("closed a connection with no complete request header after %.1fs", read_timeout)
                self.transport.close()

    return Protocol


class ConnectionGuard:
    """ASGI wrapper: a request body that stalls for read_timeout between reads is answered 408 and its
    connection closed; while draining, responses close their connection; a request task cancelled by
    uvicorn at shutdown ends quietly, not as a traceback."""

    def __init__(self, app: Any, aengine: Any, read_timeout: float):
        self.app, self.aengine, self.read_timeout = app, aengine, read_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = stalled = started = False

        async def timed_receive() -> dict:
            nonlocal body_done, stalled
            if body_done or stalled:  # after the body: waiting for a disconnect is not a stall
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                stalled = True
                return {"type": "http.disconnect"}  # the app gives up on the request; we answer 408 below
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if stalled:
                return  # the app's answer to a 'disconnect' it was told of; the 408 goes out instead
            if message["type"] == "http.response.start":
                started = True
                if self.aengine.draining and CLOSE not in message.get("headers", []):
                    message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except asyncio.CancelledError:
            if self.aengine.draining:
                log.warning("shutdown: cut %s %s", scope.get("method"), scope.get("path"))
                return
            raise
        except Exception:
            if not stalled:
                raise
        if stalled and not started:
            log.info("%s %s: request body stalled for %.1fs; answered 408", scope.get("method"), scope.get("path"),
                     self.read_timeout)
            await send_error(send, APIError(408, f"the request body stalled for {self.read_timeout:g}s",
                                            code="request_timeout"))
