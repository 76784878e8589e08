#!/usr/bin/env python3
"""A gRPC client that is not Rust: Python grpcio against balancer-agent.

Speaks helloworld.Greeter with generic calls on hand-encoded protobuf, so it needs nothing
but grpcio (no generated code, no protoc). All calls go over ONE channel. Prints one JSON
line with what it saw, then waits for stdin to close before closing the channel, so the
caller can inspect the proxy while the connection is still open.

usage: interop_client.py HOST:PORT UNARY_CALLS STREAM_CALLS STREAM_COUNT
"""

import json
import sys

try:
    import grpc
except ImportError:
    print(
        "grpcio is not installed for this python3: run `cargo xtask setup` "
        "(or `python3 -m pip install grpcio`)",
        file=sys.stderr,
    )
    sys.exit(3)


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def hello_request(name, count=0):
    """helloworld.HelloRequest: name = 1 (string), count = 2 (uint32)."""
    raw = name.encode()
    msg = b"\x0a" + varint(len(raw)) + raw
    if count:
        msg += b"\x10" + varint(count)
    return msg


def read_varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def hello_reply(buf):
    """helloworld.HelloReply: message = 1, backend = 2, payload = 3, index = 4."""
    fields = {"message": "", "backend": "", "index": 0}
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(buf, i)
            if number == 4:
                fields["index"] = value
        elif wire == 2:
            length, i = read_varint(buf, i)
            value = buf[i : i + length]
            i += length
            if number == 1:
                fields["message"] = value.decode()
            elif number == 2:
                fields["backend"] = value.decode()
        else:
            raise ValueError(f"unexpected wire type {wire} for field {number}")
    return fields


def main():
    target, unary_calls, stream_calls, stream_count = sys.argv[1], *map(int, sys.argv[2:5])
    identity = lambda b: b  # noqa: E731 - bytes in, bytes out
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    grpc.channel_ready_future(channel).result(timeout=10)
    say_hello = channel.unary_unary(
        "/helloworld.Greeter/SayHello",
        request_serializer=identity,
        response_deserializer=identity,
    )
    say_hello_stream = channel.unary_stream(
        "/helloworld.Greeter/SayHelloStream",
        request_serializer=identity,
        response_deserializer=identity,
    )

    backends = {}
    for i in range(unary_calls):
        reply = hello_reply(say_hello(hello_request(f"py-{i}"), timeout=10))
        expected = f"Hello py-{i} from {reply['backend']}"
        if reply["message"] != expected:
            raise SystemExit(f"unary call {i}: {reply['message']!r} != {expected!r}")
        backends[reply["backend"]] = backends.get(reply["backend"], 0) + 1

    stream_backends = {}
    for i in range(stream_calls):
        indexes = []
        for raw in say_hello_stream(hello_request(f"pys-{i}", stream_count), timeout=10):
            reply = hello_reply(raw)
            indexes.append(reply["index"])
            stream_backends[reply["backend"]] = stream_backends.get(reply["backend"], 0) + 1
        if indexes != list(range(stream_count)):
            raise SystemExit(f"stream call {i}: indexes {indexes}")

    print(
        json.dumps(
            {
                "grpcio": grpc.__version__,
                "unary_ok": unary_calls,
                "unary_backends": backends,
                "stream_ok": stream_calls,
                "stream_messages_by_backend": stream_backends,
            }
        ),
        flush=True,
    )
    sys.stdin.read()
    channel.close()


if __name__ == "__main__":
    main()
