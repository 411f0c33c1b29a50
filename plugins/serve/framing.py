"""Requests uvicorn refuses itself, before any route sees them: a bad ``Content-Length``, a
malformed request line or header, broken chunked encoding. uvicorn answers those in plain text;
here they get the ``{"error": {...}}`` body every other error has (code ``invalid_http``)."""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from superlinear.errors import InvalidRequest


def error_body(reason: str) -> bytes:
    import json

    error = InvalidRequest(f"malformed HTTP request: {reason}", code="invalid_http")
    return json.dumps(error.to_openai()).encode()


class OpenAIErrorsH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering its own 400s with an OpenAI-shaped JSON body."""

    def send_400_response(self, msg: str) -> None:
        body = error_body(msg.rstrip(".") or "invalid HTTP request")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # a response had begun already: h11 cannot send another
            pass
        self.transport.close()
