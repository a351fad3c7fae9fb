"""Requests as the tests' clients send them.

    call(envoy, key, ...) -> Response
                            a covered POST as the seed document shows it (the upstream answers
                            201 unless headers say otherwise)
    request(port, method, path, headers, body, http2=False) -> Response
                            one request on a fresh connection (http.client, or HTTP/2 with prior
                            knowledge through h2)
    burst(n, fn)            fn(i) in n threads released together
    in_background(fn)       fn() in a thread: (thread, box), box["result"] or box["error"]
    timed(fn)               (fn(), seconds it took)
    send_and_vanish(...)    send a whole request, then close the socket before the answer
    tolerant_request(...)   a request whose answer may be cut short (upstream reset)
"""

import http.client
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events

ORG_A = "Bearer ic_live_org_a"
ORG_B = "Bearer ic_live_org_b"
CUSTOMER = json.dumps({"externalId": "crm-7741", "fullName": "Jane Doe", "email": "jane@example.com"}).encode()


def call_headers(key, auth=ORG_A, headers=(), key_header="idempotency-key"):
    """A covered request's headers: JSON, ``x-test-status: 201``, ``auth`` (None: none), the key
    (None: none); ``headers`` add to them or replace them by name."""
    hdrs = [("content-type", "application/json"), ("x-test-status", "201")]
    if auth is not None:
        hdrs.append(("authorization", auth))
    if key is not None:
        hdrs.append((key_header, key))
    names = {name for name, _ in headers}
    return [(n, v) for n, v in hdrs if n not in names] + list(headers)


def call(envoy, key, body=CUSTOMER, path="/v1/customers", method="POST", auth=ORG_A, headers=(),
         key_header="idempotency-key", http2=False, timeout=30):
    """A covered request as the seed document shows it; the upstream answers 201 unless
    headers say otherwise. key=None sends no Idempotency-Key, auth=None no Authorization;
    http2=True sends it over HTTP/2."""
    hdrs = call_headers(key, auth, headers, key_header)
    return envoy.request(method, path, hdrs, body, timeout=timeout, http2=http2)


@dataclass
class Response:
    status: int
    reason: str
    headers: list  # [(lower-case name, value)] in wire order, repeats kept
    body: bytes

    def header(self, name):
        """The first value of a header, or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        body = self.body if len(self.body) <= 300 else self.body[:300] + b"..."
        return f"Response({self.status} {self.reason}, headers={self.headers}, body={body!r})"


def request(port, method, path, headers=None, body=None, timeout=30, host="127.0.0.1", http2=False):
    """One request on a fresh connection. ``headers`` is a dict or a list of (name, value)
    pairs (repeat a name to send it twice); values may be bytes to send raw octets. ``body``
    is bytes (sent with Content-Length) or a list of bytes chunks (sent chunked). ``http2``:
    HTTP/2 with prior knowledge, header values sent exactly as given (HTTP/1.1 parsers trim
    the whitespace around them; HTTP/2 does not)."""
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    if isinstance(body, str):
        body = body.encode()
    if http2:
        return _request_h2(host, port, method, path, pairs, b"".join(body) if isinstance(body, list) else body,
                           timeout)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in pairs:
            conn.putheader(name, value)
        if isinstance(body, list):
            conn.putheader("transfer-encoding", "chunked")
            conn.endheaders()
            for chunk in body:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        else:
            if body is not None or method in ("POST", "PUT", "PATCH"):
                conn.putheader("content-length", str(len(body or b"")))
            conn.endheaders(body or None)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.reason, [(k.lower(), v) for k, v in resp.getheaders()], data)
    finally:
        conn.close()


def _request_h2(host, port, method, path, pairs, body, timeout):
    # Sent as given: h2 would otherwise strip the whitespace around values, or refuse them.
    config = h2.config.H2Configuration(client_side=True, header_encoding=None,
                                       validate_outbound_headers=False, normalize_outbound_headers=False)
    conn = h2.connection.H2Connection(config)
    raw = lambda text: text if isinstance(text, bytes) else text.encode()  # noqa: E731
    with socket.create_connection((host, port), timeout=timeout) as sock:
        conn.initiate_connection()
        request_headers = [(b":method", raw(method)), (b":path", raw(path)), (b":scheme", b"http"),
                           (b":authority", raw(f"{host}:{port}"))]
        request_headers += [(raw(n).lower(), raw(v)) for n, v in pairs]
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, request_headers, end_stream=not body)
        if body:
            conn.send_data(stream, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, headers, data = None, [], b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("HTTP/2 connection closed before the response ended")
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    for name, value in event.headers:
                        name, value = name.decode(), value.decode("latin-1")
                        if name == ":status":
                            status = int(value)
                        else:
                            headers.append((name, value))
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamReset):
                    raise ConnectionError(f"HTTP/2 stream reset: {event.error_code!r}")
                elif isinstance(event, h2.events.StreamEnded):
                    return Response(status, http.client.responses.get(status, ""), headers, data)
            sock.sendall(conn.data_to_send())


def burst(n, fn):
    """Call fn(i) for i in range(n) from n threads released together; returns the results
    in order (an exception raised by fn is returned in its place)."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def run(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def in_background(fn):
    """Run fn() in a thread; join() the thread, then read box["result"] (or box["error"])."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def timed(fn):
    """(fn(), seconds it took)."""
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


def unique_path(prefix="/v1/probe"):
    return f"{prefix}/{uuid.uuid4().hex}"


# -- connections that end badly -----------------------------------------------------------------

def _raw_request(method, path, headers, body):
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1"]
    lines += [f"{n}: {v}" for n, v in headers]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def send_and_vanish(port, key, headers=(), body=CUSTOMER, path="/v1/customers", linger_s=0.3):
    """Send a whole covered request, wait ``linger_s`` (the upstream is working on it), then close
    the connection without reading the answer: a client gone mid-flight."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(_raw_request("POST", path, call_headers(key, headers=headers), body))
        time.sleep(linger_s)
    finally:
        sock.close()


def tolerant_request(port, key, headers=(), body=CUSTOMER, path="/v1/customers", timeout=30):
    """Like call(), but an answer cut short is returned as (Response with the partial body,
    complete=False) instead of raising."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        for name, value in call_headers(key, headers=headers):
            conn.putheader(name, value)
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        hdrs = [(k.lower(), v) for k, v in resp.getheaders()]
        try:
            data, complete = resp.read(), True
        except http.client.IncompleteRead as cut:
            data, complete = cut.partial, False
        except (ConnectionError, OSError):
            data, complete = b"", False
        return Response(resp.status, resp.reason, hdrs, data), complete
    finally:
        conn.close()
