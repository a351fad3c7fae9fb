"""Memory per stored record: Envoy's resident and allocated bytes, and etcd's database per record."""

import http.client
import threading
import time

from support.etcd import EtcdError
from configs import FILTER_CONFIG, proxy_config
from host import PROXY_CPU
from load import body_of, headers_for, run_wrk, send, wrk_script
from processes import Envoy

def fill(port, path, size, count, prefix, connections=4):
    """Sends `count` first POSTs with new keys to `path`, over a few kept-alive connections."""
    body = body_of(size)
    statuses = {}
    lock = threading.Lock()

    def worker(start):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        for n in range(start, count, connections):
            conn.request("POST", path, body=body, headers=headers_for("first-1k", f"{prefix}-{n}"))
            response = conn.getresponse()
            response.read()
            with lock:
                statuses[response.status] = statuses.get(response.status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def snapshot(envoy):
    """(RSS, allocated bytes, records stored so far), once RSS stops moving."""
    time.sleep(1.0)
    last = envoy.rss_bytes()
    for _ in range(10):
        time.sleep(0.3)
        now = envoy.rss_bytes()
        if abs(now - last) < 64 * 1024:
            break
        last = now
    return envoy.rss_bytes(), envoy.allocated_bytes(), envoy.stats().get("stored", 0)


# name: (label, upstream path answering a body of that size, body bytes, table capacity,
#        records stored to use up the allocator's free heap, records measured, compressed)
MEMORY_CASES = {
    "1k": ("1 KiB JSON", "/r/json-1k", 1024, 65_536, 12_000, 16_000, True),
    "1k-raw": ("1 KiB JSON, not compressed", "/r/json-1k", 1024, 65_536, 12_000, 16_000, False),
    "16k": ("16 KiB JSON", "/r/json-16k", 16_384, 16_384, 2_000, 4_000, True),
    "16k-raw": ("16 KiB JSON, not compressed", "/r/json-16k", 16_384, 16_384, 2_000, 4_000, False),
    "64k": ("64 KiB JSON", "/r/json-64k", 65_536, 4_096, 500, 1_000, True),
}


def memory(workdir, upstream, cases):
    """Memory of the proxy per stored record.

    Buckets (the state of 16 records each) are created on first use and then stay, so the table
    is first touched all over by claims the filter releases (the upstream answers 503 on /fail,
    sent by wrk with a new key per request): what is left is what one more record costs. Then a
    first batch of records uses up the free heap Envoy's allocator already holds (resident, so
    RSS would not see the records that land in it), and the second batch is measured: RSS growth
    (/proc/<pid>/statm) and allocated-bytes growth (admin /memory), over the records stored
    (the filter's `stored` counter).
    """
    results = []
    for label, path, size, capacity, absorb, count, compressed in cases:
        plugin = dict(FILTER_CONFIG, capacity_records=capacity, compress_responses=compressed)
        envoy = Envoy(f"memory-{size}", workdir,
                      lambda port, admin: proxy_config("filter", port, admin, upstream.port, plugin),
                      PROXY_CPU).start().wait_ready()


        try:
            fill(envoy.port, path, size, 50, f"warm-{size}")
            before_touch = snapshot(envoy)
            script = workdir / "touch.lua"
            script.write_text(wrk_script("first-1k", f"touch-{size}-{time.time_ns()}", None))
            buckets = capacity // 16
            # Enough claims for every bucket to have been hit (coupon collector, with margin).
            seconds = 2 + int(buckets * 12 / 5000)
            run_wrk(envoy.port, script, seconds, 16, path="/fail")
            touched = snapshot(envoy)
            fill(envoy.port, path, size, absorb, f"absorb-{size}")
            start = snapshot(envoy)
            statuses = fill(envoy.port, path, size, count, f"fill-{size}")
            end = snapshot(envoy)
            stored = max(end[2] - start[2], 1)
            _, headers, sample = send(envoy.port, "POST", path,
                                      headers_for("first-1k", f"fill-{size}-0"), body_of(size))
            results.append({
                "label": label,
                "body_bytes": len(sample),
                "replayed": headers.get("idempotent-replayed") == "true",
                "requested": count,
                "stored": end[2] - start[2],
                "statuses": statuses,
                "capacity_records": capacity,
                "rss_per_record": (end[0] - start[0]) / stored,
                "allocated_per_record": (None if end[1] is None or start[1] is None
                                         else (end[1] - start[1]) / stored),
                "table_allocated_per_capacity_record": (
                    None if touched[1] is None or before_touch[1] is None
                    else (touched[1] - before_touch[1]) / capacity),
                "rss_total": end[0],
            })
        finally:
            envoy.stop()
    return results


def compacted_in_use(etcd):
    """etcd's database bytes in use, once compacted to its current revision."""
    revision = etcd.post("/v3/kv/range", {"key": "AA=="})["header"]["revision"]
    try:
        # Physical: it answers once the compaction is on disk, which after a whole bench of
        # records takes etcd far longer than any other call.
        etcd.post("/v3/kv/compaction", {"revision": revision, "physical": True}, timeout=120)
    except EtcdError as error:
        if "has been compacted" not in str(error):  # nothing written since
            raise
    return int(etcd.post("/v3/maintenance/status", {})["dbSizeInUse"])


def etcd_storage(workdir, upstream, etcd, cases):
    """etcd's database bytes per record (`dbSizeInUse` of /v3/maintenance/status), for records
    stored through a proxy with the etcd store, once compacted (the claim's revision gone): what
    an etcd with --auto-compaction-retention holds in the long run."""
    results = []
    envoy = Envoy("etcd-storage", workdir,
                  lambda port, admin: proxy_config("etcd", port, admin, upstream.port,
                                                   etcd_port=etcd.client_port),
                  PROXY_CPU).start().wait_ready()
    try:
        for label, path, size, _, _, count, compressed in cases:
            if not compressed:  # the etcd proxy runs the defaults
                continue
            before = compacted_in_use(etcd)
            stored_before = envoy.stats().get("stored", 0)
            fill(envoy.port, path, size, min(count, 5_000), f"etcd-{size}-{time.time_ns()}",
                 connections=16)
            time.sleep(0.5)  # the last finishes go out on the next ticks
            stored = max(envoy.stats().get("stored", 0) - stored_before, 1)
            results.append({"label": label, "body_bytes": size, "stored": stored,
                            "bytes_per_record": (compacted_in_use(etcd) - before) / stored})
    finally:
        envoy.stop()
    return results
