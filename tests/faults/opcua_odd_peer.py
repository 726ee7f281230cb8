"""An asyncua server (own process) whose variables can be made to answer with values of the wrong
type or odd status codes: a misbehaving PLC. Prints READY; commands on stdin, one per line:
``odd NAME KIND`` (KIND from ODD), ``good NAME VALUE``, ``status NAME CODE``; answers "ok".
argv: port. Variables: ns=2;s=x (Double), ns=2;s=n (Int32), ns=2;s=s (String).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
import uuid

from asyncua import Server, ua

ODD = {
    "string": lambda: ua.Variant("12.5", ua.VariantType.String),
    "bool": lambda: ua.Variant(True, ua.VariantType.Boolean),
    "int64_huge": lambda: ua.Variant(2**63 - 1, ua.VariantType.Int64),
    "uint64_huge": lambda: ua.Variant(2**64 - 1, ua.VariantType.UInt64),
    "array": lambda: ua.Variant([1.0, 2.0, 3.0], ua.VariantType.Double),
    "empty_array": lambda: ua.Variant([], ua.VariantType.Double),
    "null": lambda: ua.Variant(None, ua.VariantType.Null),
    "bytes": lambda: ua.Variant(b"\x00\xff\x10", ua.VariantType.ByteString),
    "datetime": lambda: ua.Variant(dt.datetime(2026, 1, 1, tzinfo=dt.UTC), ua.VariantType.DateTime),
    "guid": lambda: ua.Variant(uuid.UUID(int=1), ua.VariantType.Guid),
    "text": lambda: ua.Variant(ua.LocalizedText("hot"), ua.VariantType.LocalizedText),
    "nan": lambda: ua.Variant(float("nan"), ua.VariantType.Double),
    "inf": lambda: ua.Variant(float("inf"), ua.VariantType.Double),
    "float_max": lambda: ua.Variant(3.4e38, ua.VariantType.Float),
    "long_string": lambda: ua.Variant("x" * 100_000, ua.VariantType.String),
}
TYPES = {"x": ua.VariantType.Double, "n": ua.VariantType.Int32, "s": ua.VariantType.String}


async def main() -> None:
    port = int(sys.argv[1])
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace("urn:edgeos:test:odd")
    objects = server.nodes.objects
    nodes = {}
    for name, vt in TYPES.items():
        value = {"x": 1.5, "n": 7, "s": "ok"}[name]
        nodes[name] = await objects.add_variable(ua.NodeId(name, ns), ua.QualifiedName(name, ns), value, varianttype=vt)
    async with server:
        print("READY", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                os._exit(0)
            w = line.split()
            now = dt.datetime.now(dt.UTC)
            node = nodes[w[1]]
            if w[0] == "odd":
                dv = ua.DataValue(ODD[w[2]](), SourceTimestamp=now, ServerTimestamp=now)
            elif w[0] == "good":
                vt = TYPES[w[1]]
                v = float(w[2]) if vt == ua.VariantType.Double else (int(w[2]) if vt == ua.VariantType.Int32 else w[2])
                dv = ua.DataValue(ua.Variant(v, vt), SourceTimestamp=now, ServerTimestamp=now)
            else:  # status
                cur = (await node.read_data_value(raise_on_bad_status=False)).Value
                dv = ua.DataValue(
                    cur, StatusCode_=ua.StatusCode(int(w[2], 0)), SourceTimestamp=now, ServerTimestamp=now
                )
            # Server-side write past asyncua's type check (it lets anything replace a None value),
            # as a buggy or odd server would answer.
            server.iserver.aspace._nodes[node.nodeid].attributes[ua.AttributeIds.Value].value = None
            result = await server.iserver.aspace.write_attribute_value(node.nodeid, ua.AttributeIds.Value, dv)
            print(
                "ok" if result is None or getattr(result, "is_good", lambda: True)() else f"refused {result}",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
