#!/usr/bin/env python3
"""A tiny customers API to put behind the demo Envoy (stdlib only, in memory).

    POST  /v1/customers        create a customer (201), or upsert by externalId (200)
    PATCH /v1/customers/<id>   update fields (200), 404 if unknown
    GET   /v1/customers/<id>   read one (200/404)
    GET   /v1/customers        list all
    POST  /v1/exports          queue an export of the customers (202)
    POST  /v1/search           customers whose name or email holds "q" (200; changes nothing)
    POST  /v1/events           a provider's webhook event {"id": ..., "type": ...} (200)

Every request that reaches this server is logged as an EXECUTED line, so when a
client retries with the same Idempotency-Key you can see that the replay came
from Envoy and never got here. A request with `X-Demo-Work-Ms: N` takes N ms of
work first, and the work is done even if the client has left by then (as a real
app's would be): a client that gives up mid-write.
"""

import argparse
import itertools
import json
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIELDS = ("externalId", "fullName", "email")


class Store:
    def __init__(self):
        self.lock = threading.Lock()
        self.customers = {}
        self.ids = itertools.count(1)
        self.executions = itertools.count(1)
        self.exports = itertools.count(1)

    def new_id(self):
        return "cus_%06d" % next(self.ids)


STORE = Store()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "demo-upstream/1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes

    def log_message(self, fmt, *args):  # quiet default access log; we log executions
        pass

    def _read_json(self):
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def _reply(self, status, payload, note=""):
        # Logged before the response goes out, so whoever saw the response also sees the line.
        n = next(STORE.executions)
        key = self.headers.get("idempotency-key", "-")
        print(
            "%s EXECUTED #%d %s %s idempotency-key=%s -> %d %s"
            % (time.strftime("%H:%M:%S"), n, self.command, self.path, key, status, note),
            flush=True,
        )
        body = json.dumps(payload, indent=2).encode() + b"\n"
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            print("%s ... #%d done, but nobody is there to answer" % (time.strftime("%H:%M:%S"), n), flush=True)
            self.close_connection = True

    def _segments(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        return [s for s in path.split("/") if s]

    def do_POST(self):
        data = self._read_json()  # always drain the body: the connection is kept alive
        seg = self._segments()
        handlers = {"exports": self._export, "search": self._search, "events": self._event}
        if len(seg) == 2 and seg[0] == "v1" and seg[1] in handlers and data is not None:
            self._reply(*handlers[seg[1]](data))
            return
        if seg != ["v1", "customers"]:
            self._reply(404, {"error": "not_found"})
            return
        if data is None:
            self._reply(400, {"error": "body must be a JSON object"})
            return
        time.sleep(int(self.headers.get("x-demo-work-ms") or 0) / 1000)
        fields = {k: data[k] for k in FIELDS if k in data}
        with STORE.lock:
            existing = None
            if fields.get("externalId"):
                existing = next(
                    (c for c in STORE.customers.values() if c.get("externalId") == fields["externalId"]),
                    None,
                )
            if existing is not None:  # a deliberate upsert by externalId
                existing.update(fields)
                existing["updatedAt"] = _now()
                customer, status = dict(existing), 200
            else:
                customer = {"id": STORE.new_id(), **fields, "createdAt": _now()}
                STORE.customers[customer["id"]] = customer
                customer, status = dict(customer), 201
        self._reply(status, customer, customer["id"])

    def _export(self, data):
        export = {"id": "exp_%06d" % next(STORE.exports), "format": data.get("format", "csv"),
                  "status": "queued", "createdAt": _now()}
        return 202, export, export["id"]

    def _event(self, data):
        received = {"received": data.get("id"), "type": data.get("type"), "at": _now()}
        return 200, received, "event %s" % data.get("id")

    def _search(self, data):
        q = str(data.get("q", "")).lower()
        with STORE.lock:
            found = [c for c in STORE.customers.values()
                     if q in str(c.get("fullName", "")).lower() or q in str(c.get("email", "")).lower()]
        return 200, {"data": found}, "%d found" % len(found)

    def do_PATCH(self):
        data = self._read_json()
        seg = self._segments()
        if len(seg) != 3 or seg[:2] != ["v1", "customers"]:
            self._reply(404, {"error": "not_found"})
            return
        if data is None:
            self._reply(400, {"error": "body must be a JSON object"})
            return
        with STORE.lock:
            customer = STORE.customers.get(seg[2])
            if customer is not None:
                customer.update({k: data[k] for k in FIELDS if k in data})
                customer["updatedAt"] = _now()
                customer = dict(customer)
        if customer is None:
            self._reply(404, {"error": "customer not found"})
        else:
            self._reply(200, customer, customer["id"])

    def do_GET(self):
        seg = self._segments()
        with STORE.lock:
            if seg == ["v1", "customers"]:
                status, payload = 200, {"data": list(STORE.customers.values())}
            elif len(seg) == 3 and seg[:2] == ["v1", "customers"] and seg[2] in STORE.customers:
                status, payload = 200, dict(STORE.customers[seg[2]])
            else:
                status, payload = 404, {"error": "not_found"}
        self._reply(status, payload)


def _now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print("demo upstream listening on http://%s:%d" % (args.host, args.port), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
