#!/usr/bin/env python3
"""grpcio clients under load, for the handover test: what balancer-pod-load does, over Python
grpcio (gRPC C-core, with its transparent retry of calls a connection never sent).

--connections channels (each its own connection: a local subchannel pool) with --in-flight
calls each always in flight, the backend holding each --sleep-ms, plus one channel calling
sequentially. The protocol of balancer-pod-load:
- out, every 100 ms: {"ok": N, "failed": M};
- in, a line `mark`: the calls from now on count in a new phase;
- in, end of file: no new call; the calls in flight finish, then one last line out:
  {"phases": [{"ok", "failed", "sequential": {backend: calls}, "errors": [...]}]}.

usage: load_client.py --target HOST:PORT [--connections N] [--in-flight N] [--sleep-ms MS]
"""

import argparse
import json
import sys
import threading

import grpc
from interop_client import hello_reply, varint


def request(sleep_ms):
    """helloworld.HelloRequest: name = 1, sleep_ms = 3."""
    msg = b"\x0a\x04load"
    if sleep_ms:
        msg += b"\x18" + varint(sleep_ms)
    return msg


def phase():
    return {"ok": 0, "failed": 0, "sequential": {}, "errors": []}


class Shared:
    def __init__(self):
        self.lock = threading.Lock()
        self.phases = [phase()]
        self.ok = 0
        self.failed = 0
        self.stop = threading.Event()

    def record(self, backend, error, sequential):
        with self.lock:
            p = self.phases[-1]
            if error is None:
                self.ok += 1
                p["ok"] += 1
                if sequential:
                    p["sequential"][backend] = p["sequential"].get(backend, 0) + 1
            else:
                self.failed += 1
                p["failed"] += 1
                if len(p["errors"]) < 20:
                    p["errors"].append(error)


def calls(shared, say_hello, sleep_ms, sequential):
    while not shared.stop.is_set():
        try:
            reply = hello_reply(say_hello(request(sleep_ms), timeout=10))
            shared.record(reply["backend"], None, sequential)
        except grpc.RpcError as e:
            shared.record(None, f"{e.code().name}: {e.details()}", sequential)


def progress(shared):
    while not shared.stop.wait(0.1):
        with shared.lock:
            line = json.dumps({"ok": shared.ok, "failed": shared.failed})
        print(line, flush=True)


def main():
    args = argparse.ArgumentParser()
    args.add_argument("--target", required=True)
    args.add_argument("--connections", type=int, default=4)
    args.add_argument("--in-flight", type=int, default=4)
    args.add_argument("--sleep-ms", type=int, default=20)
    args = args.parse_args()
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0)]
    identity = lambda b: b  # noqa: E731 - bytes in, bytes out
    shared = Shared()
    threads = []
    channels = []

    def client(sleep_ms, n, sequential):
        channel = grpc.insecure_channel(args.target, options=options)
        grpc.channel_ready_future(channel).result(timeout=10)
        channels.append(channel)
        say_hello = channel.unary_unary(
            "/helloworld.Greeter/SayHello",
            request_serializer=identity,
            response_deserializer=identity,
        )
        for _ in range(n):
            t = threading.Thread(target=calls, args=(shared, say_hello, sleep_ms, sequential))
            t.start()
            threads.append(t)

    for _ in range(args.connections):
        client(args.sleep_ms, args.in_flight, False)
    client(0, 1, True)
    ticker = threading.Thread(target=progress, args=(shared,))
    ticker.start()
    for line in sys.stdin:
        if line.strip() == "mark":
            with shared.lock:
                shared.phases.append(phase())
    shared.stop.set()
    for t in threads:
        t.join()
    ticker.join()
    print(json.dumps({"phases": shared.phases}), flush=True)
    for c in channels:
        c.close()


if __name__ == "__main__":
    main()
