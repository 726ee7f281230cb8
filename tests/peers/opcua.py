"""A real asyncua OPC UA server in its own process, on a loopback port, for tests and bench.

Run as a script with a JSON spec (see `OpcUaPeer`); it prints ``READY`` when it listens and
obeys one command per line on stdin (``status NAME CODE``, ``set NAME VALUE``, ``stats``,
``delete NAME``, ``add NAME``). A server in the client's own event loop would hide timing bugs.

Spec keys: port, namespaces (URIs in registration order: another order renumbers them), vars
(list of {ns, id, name, type, value | ramp (seconds per step), writable, unit, folder, status,
array, enum (field names: the node's DataType becomes a new enumeration of them, valued 0..,
with type Int32)}), bulk (N Double nodes "ns=<first>;i=100000+k" changing once a period), period,
spread (the bulk changes in that many slices across the period, each stamped when written),
max_nodes_per_read, max_monitored_items_per_call, security ({policies, cert, key}), users.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpcUaPeer:
    """Starts and stops the server process (synchronously; bounded waits)."""

    def __init__(self, spec: dict[str, Any], *, port: int | None = None) -> None:
        self.spec = dict(spec)
        self.port = port or free_port()
        self.spec["port"] = self.port
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> OpcUaPeer:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, json.dumps(self.spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), True)
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            line = self.proc.stdout.readline()
            if line.strip() == "READY":
                return self
            if not line:
                break
        self.stop()
        raise RuntimeError("the OPC UA test server did not start")

    def command(self, line: str, timeout: float = 10.0) -> str:
        """Send one command; returns its one-line answer."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"no answer to {line!r}")
        return self.proc.stdout.readline().strip()

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGCONT)
        p.kill()
        p.wait(10)
        for f in (p.stdin, p.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def __enter__(self) -> OpcUaPeer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# The server process


async def _serve(spec: dict[str, Any]) -> None:
    from asyncua import Server, ua
    from asyncua.crypto.permission_rules import User, UserRole
    from asyncua.server.user_managers import UserManager

    users = spec.get("users") or {}
    user_cert = bytes.fromhex(spec["user_cert_der"]) if spec.get("user_cert_der") else None

    class Users(UserManager):
        def get_user(self, iserver, username=None, password=None, certificate=None):
            if user_cert is not None:  # only this X.509 user (the certificate is the user token's)
                der = certificate if isinstance(certificate, bytes) else _der(certificate)
                return User(role=UserRole.User) if der == user_cert else None
            if not users:
                return User(role=UserRole.User)
            if username is not None and users.get(username) == password:
                return User(role=UserRole.User)
            return None

    def _der(cert: Any) -> bytes | None:
        from cryptography.hazmat.primitives import serialization

        try:
            return cert.public_bytes(serialization.Encoding.DER)
        except AttributeError:
            return None

    server = Server(user_manager=Users())
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{spec['port']}")
    server.set_server_name("edgeos test peer")
    sec = spec.get("security")
    if sec:
        server.set_security_policy([getattr(ua.SecurityPolicyType, p) for p in sec["policies"]])
        await server.load_certificate(sec["cert"])
        await server.load_private_key(sec["key"])
        if sec.get("application_uri"):
            await server.set_application_uri(sec["application_uri"])
        if "trusted_clients" in sec:
            # Only client certificates in this directory are accepted (none: every one refused).
            from asyncua.crypto.truststore import TrustStore
            from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

            store = TrustStore([Path(sec["trusted_clients"])], [])
            await store.load()
            options = CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
            server.set_certificate_validator(CertificateValidator(options, store))
    if users:
        server.set_identity_tokens([ua.UserNameIdentityToken])
    if user_cert is not None:
        server.set_identity_tokens([ua.X509IdentityToken])
    idx: dict[str, int] = {}
    for uri in spec.get("namespaces", ["urn:edgeos:test"]):
        idx[uri] = await server.register_namespace(uri)
    first = next(iter(idx.values()))
    objects = server.nodes.objects
    folders: dict[str, Any] = {}
    nodes: dict[str, Any] = {}
    types: dict[str, Any] = {}
    ramps: list[tuple[Any, float, Any, str]] = []
    for v in spec.get("vars", []):
        ns = idx[v.get("ns") or next(iter(idx))]
        parent = objects
        if v.get("folder"):
            key = f"{ns}:{v['folder']}"
            if key not in folders:
                folders[key] = await objects.add_folder(ua.NodeId(v["folder"], ns), ua.QualifiedName(v["folder"], ns))
            parent = folders[key]
        kind, ident = v["id"].split("=", 1)
        nid = ua.NodeId(int(ident), ns) if kind == "i" else ua.NodeId(ident, ns)
        vt = getattr(ua.VariantType, v.get("type", "Double"))
        value = v.get("value", 0)
        if vt == ua.VariantType.Boolean:
            value = bool(value)
        elif vt == ua.VariantType.String:
            value = str(value)
        elif vt in (ua.VariantType.Float, ua.VariantType.Double):
            value = float(value)
        elif vt == ua.VariantType.DateTime:
            import datetime as dt

            value = dt.datetime.fromtimestamp(float(value), dt.UTC)
        else:
            value = int(value)
        if v.get("array"):
            value = [value, value]
        dtype = None
        if v.get("enum"):
            from asyncua.common.structures104 import new_enum

            dtype = (await new_enum(server, ns, f"{v['name']}Enum", list(v["enum"]))).nodeid
        node = await parent.add_variable(nid, ua.QualifiedName(v["name"], ns), value, varianttype=vt, datatype=dtype)
        if v.get("array"):
            await node.write_attribute(ua.AttributeIds.ValueRank, ua.DataValue(ua.Variant(1, ua.VariantType.Int32)))
        if v.get("writable"):
            await node.set_writable()
        if v.get("unit"):
            eu = ua.EUInformation(DisplayName=ua.LocalizedText(v["unit"]), Description=ua.LocalizedText(v["unit"]))
            # The standard's BrowseName (namespace 0), the node in the server's namespace.
            await node.add_property(
                ua.NodeId(f"{ident}.EngineeringUnits", ns),
                ua.QualifiedName("EngineeringUnits", 0),
                eu,
                varianttype=ua.VariantType.ExtensionObject,
            )
        if v.get("status"):
            await node.write_value(ua.DataValue(ua.Variant(value, vt), StatusCode_=ua.StatusCode(v["status"])))
        nodes[v["name"]] = node
        types[v["name"]] = vt
        if v.get("ramp"):
            ramps.append((node, float(v["ramp"]), vt, v["name"]))
    bulk = []
    folder = objects
    for k in range(spec.get("bulk", 0)):
        # 500 per folder: asyncua's add costs the parent's reference count, quadratic in one folder.
        if k % 500 == 0:
            name = f"Bulk{k // 500}"
            folder = await objects.add_folder(ua.NodeId(name, first), ua.QualifiedName(name, first))
        bulk.append(await folder.add_variable(ua.NodeId(100000 + k, first), ua.QualifiedName(f"b{k}", first), 0.0))
    limit = spec.get("max_nodes_per_read") or 0
    stats = {"max_read": 0, "reads": 0}
    service = server.iserver.attribute_service
    plain_read = service.read

    def read(params: Any) -> Any:
        n = len(params.NodesToRead)
        stats["reads"] += 1
        stats["max_read"] = max(stats["max_read"], n)
        if limit and n > limit:
            raise ua.uaerrors.BadTooManyOperations()
        return plain_read(params)

    service.read = read
    # When the server had data for a subscription and no publish request in hand (it holds the
    # data until one comes): what the bench's latency trace reads (`stats`).
    from asyncua.server import uaprocessor

    starved: list[float] = []
    stats["publish_starved"] = starved
    plain_get = uaprocessor.UaProcessor.get_publish_request

    def get_publish_request(self: Any, subscription_id: Any) -> Any:
        got = plain_get(self, subscription_id)
        if got is None:
            starved.append(time.time())
            del starved[:-1000]
        return got

    uaprocessor.UaProcessor.get_publish_request = get_publish_request
    # "mute": every publish response dropped (sessions, reads and browses still answered)
    muted = [False]
    plain_forward = uaprocessor.UaProcessor.forward_publish_response

    async def forward_publish_response(self: Any, result: Any, requestdata: Any) -> Any:
        if muted[0]:
            return None
        return await plain_forward(self, result, requestdata)

    uaprocessor.UaProcessor.forward_publish_response = forward_publish_response
    if limit:
        await server.get_node(
            ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead, 0)
        ).write_value(ua.Variant(limit, ua.VariantType.UInt32))
    mi = spec.get("max_monitored_items_per_call") or 0
    subs = server.iserver.subscription_service
    plain_create = subs.create_monitored_items
    stats["max_items"] = 0

    async def create_monitored_items(params: Any) -> Any:
        n = len(params.ItemsToCreate)
        stats["max_items"] = max(stats["max_items"], n)
        if mi and n > mi:
            raise ua.uaerrors.BadTooManyOperations()
        return await plain_create(params)

    subs.create_monitored_items = create_monitored_items
    if mi:
        await server.get_node(
            ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall, 0)
        ).write_value(ua.Variant(mi, ua.VariantType.UInt32))

    async def ramp(node: Any, period: float, vt: Any, name: str) -> None:
        """One step per period. A loop late by more than a period (a loaded machine) skips
        steps: they are listed in stats["ramp_skipped"][name], so a test can tell a step the
        server never wrote from one a client lost."""
        skipped: list[int] = []
        stats.setdefault("ramp_skipped", {})[name] = skipped
        last = None
        while True:
            now = time.time()
            step = int(now / period)
            if last is not None and step > last + 1:
                skipped.extend(range(last + 1, min(step, last + 1001)))
                del skipped[:-1000]
            last = step
            await node.write_value(ua.DataValue(ua.Variant(_as(step, vt), vt), SourceTimestamp=_utc(now)))
            await asyncio.sleep(period - (time.time() % period) + 0.001)

    def _as(step: int, vt: Any) -> Any:
        if vt in (ua.VariantType.Float, ua.VariantType.Double):
            return float(step)
        if vt == ua.VariantType.Boolean:
            return bool(step % 2)
        if vt == ua.VariantType.String:
            return f"s{step}"
        return step % 30000

    def _utc(t: float) -> Any:
        import datetime as dt

        return dt.datetime.fromtimestamp(t, dt.UTC)

    period = float(spec.get("period", 1.0))

    spread = max(1, int(spec.get("spread", 1)))

    async def bulk_loop() -> None:
        """Every period, each bulk node changes once. With spread = 1, all of them at the
        period's start, stamped with that start (a burst: the server then needs hundreds of ms
        to write 5,000, so the late ones become visible long after their stamp). With spread =
        S, in S slices evenly across the period, each stamped when it is written, as a PLC's
        values change at different moments of its cycle."""
        dvs_ids = [n.nodeid for n in bulk]
        step = -(-len(dvs_ids) // spread)
        k = 0
        stats["bulk_changes"], stats["bulk_t"] = 0, time.time()
        rounds: list[float] = []
        stats["rounds"] = rounds  # end time of each round of changes (for the bench's windows)
        writes: list[float] = []
        stats["slice_write_s"] = writes  # how long each slice took to write (its visibility delay)
        stats["rounds_skipped"] = 0
        start = (time.time() // period + 1) * period
        while True:
            # A fixed schedule: a round whose last slice ends past the next boundary is followed
            # at once by the next, not a period later (sleeping to the next boundary skipped up
            # to 1 round in 6 under the e2e load: 8,364 changes/s offered instead of 10,000).
            # More than a round behind, it skips ahead and says so in the stats.
            if time.time() - start > period:
                behind = int((time.time() - start) // period)
                stats["rounds_skipped"] += behind
                start += behind * period
            await asyncio.sleep(max(0.0, start - time.time()))
            k += 1
            for j in range(spread):
                if j:
                    await asyncio.sleep(max(0.0, start + j * period / spread - time.time()))
                t0 = time.time()
                now = _utc(t0)
                dv = ua.DataValue(ua.Variant(float(k), ua.VariantType.Double), SourceTimestamp=now, ServerTimestamp=now)
                for nid in dvs_ids[j * step : (j + 1) * step]:
                    await server.iserver.aspace.write_attribute_value(nid, ua.AttributeIds.Value, dv)
                writes.append(time.time() - t0)
                del writes[:-1000]
            stats["bulk_changes"] = stats.get("bulk_changes", 0) + len(dvs_ids)
            stats["bulk_t"] = time.time()  # when the last round of changes was made
            rounds.append(stats["bulk_t"])
            start += period

    async def commands() -> None:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                os._exit(0)
            words = line.split()
            if not words:
                continue
            try:
                if words[0] == "status":
                    node, vt = nodes[words[1]], types[words[1]]
                    value = (await node.read_data_value(raise_on_bad_status=False)).Value.Value
                    await node.write_value(
                        ua.DataValue(
                            ua.Variant(value, vt),
                            StatusCode_=ua.StatusCode(int(words[2], 0)),
                            SourceTimestamp=_utc(time.time()),
                        )
                    )
                    answer = "ok"
                elif words[0] == "set":
                    node, vt = nodes[words[1]], types[words[1]]
                    await node.write_value(
                        ua.DataValue(
                            ua.Variant(_as(int(words[2]), vt) if vt != ua.VariantType.Double else float(words[2]), vt),
                            SourceTimestamp=_utc(time.time()),
                        )
                    )
                    answer = "ok"
                elif words[0] == "get":
                    answer = json.dumps(await nodes[words[1]].read_value())
                elif words[0] == "delete":
                    await server.delete_nodes([nodes[words[1]]])
                    answer = "ok"
                elif words[0] == "add":
                    nodes[words[1]] = await objects.add_variable(
                        ua.NodeId(words[1], first), ua.QualifiedName(words[1], first), float(words[2])
                    )
                    types[words[1]] = ua.VariantType.Double
                    answer = "ok"
                elif words[0] == "mute":
                    muted[0] = True
                    answer = "ok"
                elif words[0] == "unmute":
                    muted[0] = False
                    answer = "ok"
                elif words[0] == "stats":
                    answer = json.dumps(stats)
                else:
                    answer = "unknown command"
            except Exception as e:
                answer = f"error {type(e).__name__}: {e}"
            print(answer, flush=True)

    async with server, asyncio.TaskGroup() as tg:
        for node, period_s, vt, name in ramps:
            tg.create_task(ramp(node, period_s, vt, name))
        if bulk:
            tg.create_task(bulk_loop())
        tg.create_task(commands())
        # The address space (5,000-10,000 nodes in the benches) out of the collector's sight: a
        # full collection over it paused this server 0.5-1 s every ~4 s under the e2e's OPC UA
        # load, which no PLC does and which the gateway's latency figures then carried.
        gc.collect()
        gc.freeze()
        print("READY", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    spec = json.loads(sys.argv[1])
    if spec.get("user_cert"):
        spec["user_cert_der"] = Path(spec["user_cert"]).read_bytes().hex()
    asyncio.run(_serve(spec))
