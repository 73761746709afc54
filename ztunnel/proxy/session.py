"""One proxied connection carried out: both ends relayed, tracked on the pod, accounted for.

Shared by every listener (outbound, HBONE inbound, plaintext inbound) so the bookkeeping that
metrics and the access log rely on is written once.
"""

from __future__ import annotations

import asyncio
import socket

from meshcore.aio import relay
from ztunnel import telemetry
from ztunnel.proxy import connection_manager, routing
from ztunnel.proxy.inputs import PodContext, ProxyInputs


async def tcp_end(sock: socket.socket) -> relay.TcpEnd:
    """Wrap a connected socket as a relay end; the socket is closed if that fails."""
    loop = asyncio.get_running_loop()
    try:
        _, end = await loop.create_connection(relay.TcpEnd, sock=sock)
    except BaseException:
        sock.close()
        raise
    return end


def start(pod: PodContext, client: relay.End, upstream: relay.End) -> relay.Relay:
    """Join `client` and `upstream` now, before `run`: bytes flow at once (outbound sends a
    client's first bytes right behind its CONNECT). Registered on the pod like `run`'s own;
    a caller that gives up before `run` calls `abandon`."""
    link = relay.Relay()
    pod.relays.add(link)
    link.start(client, upstream)
    return link


def abandon(pod: PodContext, link: relay.Relay, reason: str) -> None:
    link.abort(reason)
    pod.relays.discard(link)


async def run(
    inputs: ProxyInputs,
    pod: PodContext,
    client: relay.End,
    upstream: relay.End,
    record: telemetry.ConnectionRecord,
    *,
    tracked: connection_manager.TrackedConnection | None = None,
    started: relay.Relay | None = None,
) -> None:
    """Relay `client` <-> `upstream` until both are done; fill `record` with what happened.

    The relay is registered on the pod while it runs, so removing the pod aborts it. With
    `tracked` (an authorized inbound connection), a policy update that now denies it aborts the
    relay too, and the connection is recorded with the DENY flag. `started` is the relay `start`
    already joined the ends with.
    """
    link = started if started is not None else relay.Relay()
    pod.relays.add(link)

    def close_denied(reason: str) -> None:
        if link.is_finished:
            return  # it ended on its own first: nothing was denied
        record.flag = routing.Flag.DENY.value
        link.abort(reason)

    try:
        if started is None:
            link.start(client, upstream)
        inputs.telemetry.opened(record)
        if tracked is not None:
            tracked.bind(close_denied)
        await link.done
    finally:
        if tracked is not None:
            tracked.unbind()
        pod.relays.discard(link)
        record.request_bytes, record.response_bytes = link.received[0], link.received[1]
        record.error = link.error
        if link.error is not None and record.flag == routing.Flag.NONE.value:
            record.flag = routing.Flag.CONNECT.value
