"""An httpx transport whose sockets acknowledge at once (Linux TCP_QUICKACK), so a provider that sends its
response headers and body in two writes without TCP_NODELAY does not cost 40 ms per call.

Why (issue 26): a server without TCP_NODELAY holds its second small write (the body) until the first (the
headers) is acknowledged, and Linux delays that acknowledgement by up to 40 ms because the client has nothing
to send. Measured here against Python's http.server (which writes headers and body separately): a 20 kB
POST took 44.0 ms median with httpx's default transport, with TCP_NODELAY on our socket, and with
TCP_QUICKACK set once at connect (the kernel clears it); 1.3 ms when TCP_QUICKACK is set before every read.
Two such calls per escalation were the ~100 ms an escalated request cost the server.

Where TCP_QUICKACK does not exist (macOS, Windows) this is httpx's own transport.
"""
import socket

import httpcore
import httpx

QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _QuickAckStream(httpcore.NetworkStream):
    """httpcore's stream, re-arming TCP_QUICKACK before each read (the kernel drops it after some ACKs)."""

    def __init__(self, stream):
        self._stream = stream

    def read(self, max_bytes, timeout=None):
        sock = self._stream.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            except OSError:  # a socket that is not TCP (a proxy's unix socket): nothing to re-arm
                pass
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer, timeout=None):
        self._stream.write(buffer, timeout)

    def close(self):
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return _QuickAckStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info):
        return self._stream.get_extra_info(info)


class _QuickAckBackend(httpcore.SyncBackend):
    def connect_tcp(self, *args, **kwargs):
        return _QuickAckStream(super().connect_tcp(*args, **kwargs))


def transport(limits: httpx.Limits) -> httpx.HTTPTransport:
    """httpx's HTTP/1.1 transport with quick-ack sockets, where the OS has them.

    >>> isinstance(transport(httpx.Limits(max_connections=4)), httpx.HTTPTransport)
    True
    """
    t = httpx.HTTPTransport(limits=limits)
    if QUICKACK is not None:
        t._pool = httpcore.ConnectionPool(  # httpx builds the same pool, without a way to pass the backend
            ssl_context=t._pool._ssl_context, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_QuickAckBackend())
    return t
