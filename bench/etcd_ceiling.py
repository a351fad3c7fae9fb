"""etcd's own ceiling for the filter's claim transaction, over its JSON gateway and over gRPC, in
one run on this machine: the figures the fleet store's choice of protocol rests on. Also over
gRPC with claims batched, BATCH to a transaction (each claim a nested transaction): what
batching one worker's claims would give.

    .venv/bin/python bench/etcd_ceiling.py [--rounds 3] [--seconds 5]

A single-member etcd (data on disk, fsync on) runs pinned to CPU 0; the load runs pinned to
CPU 1. Each request is the claim: a transaction creating a new key if absent (a put of 100 bytes),
else reading it back. The gateway is driven by wrk; gRPC by asyncio clients sending `KV.Txn`
with the protobuf encoded by hand (two processes, so that the client is not what limits).
Rounds alternate the protocols and concurrencies; the figures are medians, with etcd's CPU per
claim (client-independent) from /proc.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from support.etcd import Etcd  # noqa: E402

ETCD_CPU, LOAD_CPU = "0", "1"
CONCURRENCIES = (16, 64)
GRPC_PROCESSES = 2
BATCH = 8

# wrk's Lua: a new key per request, base64-encoded as the gateway wants.
GATEWAY_LUA = r"""
local chars = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
local function b64(data)
  return ((data:gsub('.', function(x)
    local r, b = '', x:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and '1' or '0') end
    return r
  end) .. '0000'):gsub('%d%d%d?%d?%d?%d?', function(x)
    if #x < 6 then return '' end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == '1' and 2 ^ (6 - i) or 0) end
    return chars:sub(c + 1, c + 1)
  end) .. ({ '', '==', '=' })[#data % 3 + 1])
end
local n, value = 0, b64(string.rep('x', 100))
request = function()
  n = n + 1
  local key = b64(PREFIX .. n)
  local body = '{"compare":[{"key":"' .. key .. '","result":"EQUAL","target":"CREATE",' ..
    '"create_revision":"0"}],"success":[{"request_put":{"key":"' .. key .. '","value":"' ..
    value .. '"}}],"failure":[{"request_range":{"key":"' .. key .. '"}}]}'
  return wrk.format('POST', '/v3/kv/txn', {['content-type'] = 'application/json'}, body)
end
"""


# -- gRPC: the claim's TxnRequest, encoded by hand ----------------------------------------------

def _varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _field(number, payload):
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def claim_txn(key, value):
    """TxnRequest{compare: [key's create_revision EQUAL 0], success: [put], failure: [range]}:
    Compare.result EQUAL and create_revision 0 are proto3 defaults, so they are not sent."""
    compare = _field(3, key) + _varint(2 << 3) + _varint(1)  # key; target = CREATE
    put = _field(1, key) + _field(2, value)
    return _field(1, compare) + _field(2, _field(2, put)) + _field(3, _field(1, _field(1, key)))


def batched_claims(keys, value):
    """TxnRequest{success: [RequestOp{request_txn: claim} per key]}: each claim decided alone."""
    return b"".join(_field(2, _field(4, claim_txn(key, value))) for key in keys)


async def _grpc_load(target, seconds, concurrency, prefix, batch):
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        txn = channel.unary_unary("/etcdserverpb.KV/Txn")
        done, end, value = 0, time.monotonic() + seconds, b"x" * 100

        async def client(number):
            nonlocal done
            n = 0
            while time.monotonic() < end:
                n += 1
                keys = [f"{prefix}/{number}/{n}/{b}".encode() for b in range(batch)]
                await txn(claim_txn(keys[0], value) if batch == 1 else batched_claims(keys, value))
                done += batch

        await asyncio.gather(*(client(c) for c in range(concurrency)))
        print(done)


# -- the run -------------------------------------------------------------------------------------

def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway(etcd, seconds, concurrency, prefix, workdir):
    script = workdir / "gateway.lua"
    script.write_text(f"PREFIX = '{prefix}/'\n" + GATEWAY_LUA)
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{concurrency}",
                          f"-d{seconds}s", "-s", str(script), etcd.url],
                         capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if "requests in" in l)
    return int(line.split()[0])


def grpc(etcd, seconds, concurrency, prefix, _workdir, batch=1):
    target = f"127.0.0.1:{etcd.client_port}"
    each = concurrency // GRPC_PROCESSES
    procs = [subprocess.Popen(["taskset", "-c", LOAD_CPU, sys.executable, __file__, "grpc-load",
                               target, str(seconds), str(each), f"{prefix}-{p}", str(batch)],
                              stdout=subprocess.PIPE, text=True) for p in range(GRPC_PROCESSES)]
    return sum(int(p.communicate()[0]) for p in procs)


def main(argv):
    if argv[:1] == ["grpc-load"]:
        target, seconds, concurrency, prefix, batch = argv[1:6]
        asyncio.run(_grpc_load(target, float(seconds), int(concurrency), prefix, int(batch)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="etcd-ceiling-"))
    etcd = Etcd(workdir).start()
    subprocess.run(["taskset", "-a", "-pc", ETCD_CPU, str(etcd.proc.pid)], check=True,
                   capture_output=True)
    figures = {}
    try:
        for round_ in range(args.rounds):
            for concurrency in CONCURRENCIES:
                for name, load in (("gateway", gateway), ("grpc", grpc),
                                   (f"grpc, {BATCH} claims a transaction",
                                    lambda *a: grpc(*a, batch=BATCH))):
                    before = cpu_seconds(etcd.proc.pid)
                    started = time.monotonic()
                    count = load(etcd, args.seconds, concurrency,
                                 f"{name[:4]}{len(name)}-{round_}-{concurrency}", workdir)
                    elapsed = time.monotonic() - started
                    cpu = cpu_seconds(etcd.proc.pid) - before
                    figures.setdefault((name, concurrency), []).append(
                        (count / elapsed, cpu / count * 1e6))
    finally:
        etcd.stop()
    print(f"etcd {subprocess.run(['etcd', '--version'], capture_output=True, text=True).stdout.split()[2]}"
          f", {args.rounds} rounds of {args.seconds} s; etcd on CPU {ETCD_CPU}, load on CPU {LOAD_CPU}\n")
    print("| protocol | concurrency | claims/s (median) | range | etcd CPU µs/claim |")
    print("|---|---:|---:|---|---:|")
    for (name, concurrency), runs in sorted(figures.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rates = [r for r, _ in runs]
        print(f"| {name} | {concurrency} | {statistics.median(rates):,.0f} | "
              f"{min(rates):,.0f}–{max(rates):,.0f} | {statistics.median(c for _, c in runs):,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
