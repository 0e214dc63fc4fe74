"""A scripted HTTP server on 127.0.0.1 for API-client tests: real sockets and real HTTP, no mocks.

    with ApiServer() as server:
        server.replies = [Reply(500), Reply(body={"data": [...]})]  # POSTs get these in turn; the last repeats
        server.files["/out.png"] = png  # GETs are served from here
        ... client calls server.url ...
        server.seen  # every request: method, path, headers, multipart fields, arrival time, raw body

`Reply(echo_image=True)` answers with the uploaded `image` field as b64_json, so outputs can be matched to
inputs. `max_in_flight` is the most requests the server was answering at once.
"""
from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes | dict = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (a slow server, or requests that overlap)
    echo_image: bool = False


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    fields: dict[str, bytes]  # multipart form fields of a POST
    at: float  # time.monotonic() on arrival
    body: bytes = b""  # of a POST, as sent (json.loads it for a JSON API)


class ApiServer:
    def __init__(self) -> None:
        self.replies: list[Reply] = [Reply(404, b"no reply scripted")]
        self.files: dict[str, bytes] = {}
        self.seen: list[Seen] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._posts = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def posts(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST"]

    def __enter__(self) -> ApiServer:
        handler = type("Handler", (_Handler,), {"api": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free one
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _arrive(self, seen: Seen) -> Reply:
        with self._lock:
            self.seen.append(seen)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            if seen.method == "GET":
                data = self.files.get(seen.path)
                return Reply(200, data) if data is not None else Reply(404, b"no such file")
            self._posts += 1
            return self.replies[min(self._posts, len(self.replies)) - 1]

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1


class _Handler(BaseHTTPRequestHandler):
    api: ApiServer

    def do_GET(self) -> None:
        self._answer({})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(_form_fields(self.headers.get("Content-Type", ""), body), body)

    def _answer(self, fields: dict[str, bytes], raw: bytes = b"") -> None:
        reply = self.api._arrive(Seen(self.command, self.path, dict(self.headers), fields, time.monotonic(), raw))
        try:
            time.sleep(reply.delay_s)
            body = reply.body
            if reply.echo_image:
                body = {"data": [{"b64_json": base64.b64encode(fields["image"]).decode()}]}
            payload = json.dumps(body).encode() if isinstance(body, dict) else body
        finally:
            # before the answer goes out: a client may send its next request as soon as it has read this one,
            # and counting this one until after the write counted a request the client had finished (flaky 3 > 2)
            self.api._leave()
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: a request line per call would bury pytest's output."""


def _form_fields(content_type: str, body: bytes) -> dict[str, bytes]:
    if not content_type.startswith("multipart/form-data"):
        return {}
    message = BytesParser(policy=email_policy).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.iter_parts()}
