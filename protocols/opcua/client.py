"""The only module that imports asyncua: a session, its requests chunked to the server's
OperationLimits, notifications turned into numpy columns, certificates. asyncua's exceptions
are wrapped here into `OpcUaError`, so the rest of edgeos never sees them.

Requests go through asyncua's low-level `UaClient` (read, create_monitored_items): the high-level
`Subscription` builds a Node and a DataChangeNotif per sample and calls a handler per sample,
which edgeos does not need. CreateSubscription and Publish requests edgeos sends itself on
asyncua's secure channel (`Session.publish_loop`), and it reads PublishResponses of scalar
numbers straight into numpy columns (`decode_publish`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from asyncua import Client, ua
from asyncua.crypto import security_policies as sp
from asyncua.ua.ua_binary import Primitives, nodeid_from_binary, struct_from_binary
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from edgeos.protocols.opcua.config import NodeRef

from edgeos.aio import cancel_and_wait, within
from edgeos.logs import RateLimited

log = logging.getLogger("edgeos.protocols.opcua")
_URI_WARNINGS = RateLimited(log)  # a server certificate whose URI is not the server's

BAD_NODE_ID_UNKNOWN = 0x80340000
BAD_TYPE_MISMATCH = 0x80740000
BAD_NOT_SUPPORTED = 0x803D0000
BAD_COMM = 0x80050000

KIND_NUMBER, KIND_BOOL, KIND_STRING, KIND_DATETIME = 0, 1, 2, 3
KINDS = {"number": KIND_NUMBER, "bool": KIND_BOOL, "string": KIND_STRING, "datetime": KIND_DATETIME}

POLICY_CLASSES = {
    "Basic256Sha256": sp.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": sp.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": sp.SecurityPolicyAes256Sha256RsaPss,
    "Basic256": sp.SecurityPolicyBasic256,
    "Basic128Rsa15": sp.SecurityPolicyBasic128Rsa15,
}
MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}
_KIND = {"i": ua.NodeIdType.Numeric, "s": ua.NodeIdType.String, "g": ua.NodeIdType.Guid, "b": ua.NodeIdType.ByteString}
_LIMIT_IDS = {
    "max_nodes_per_read": ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
    "max_nodes_per_write": ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerWrite,
    "max_monitored_items_per_call": ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
    "max_nodes_per_browse": ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerBrowse,
}


_IDENTITY_REFUSED = {
    ua.StatusCodes.BadUserAccessDenied,
    ua.StatusCodes.BadIdentityTokenInvalid,
    ua.StatusCodes.BadIdentityTokenRejected,
}
_CERT_REFUSED = {ua.StatusCodes.BadCertificateUntrusted, ua.StatusCodes.BadSecurityChecksFailed}


class OpcUaError(Exception):
    """A failed request or connection; `code` is low-cardinality (connect, timeout, status, security...)."""

    def __init__(self, message: str, code: str = "opcua", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def _wrap(e: BaseException, what: str) -> OpcUaError:
    if isinstance(e, OpcUaError):
        return e
    if isinstance(e, ua.UaStatusCodeError):
        return OpcUaError(f"{what}: {e}", "status", int(e.code))
    if isinstance(e, TimeoutError | asyncio.TimeoutError) or (
        # asyncua raises UaError("Failed to send request ...") from the TimeoutError of a
        # request whose answer did not come in time: the request was sent, the answer is late.
        isinstance(e, ua.UaError) and isinstance(e.__cause__, TimeoutError | asyncio.TimeoutError)
    ):
        return OpcUaError(f"{what}: no answer in time", "timeout")
    if isinstance(e, ConnectionError | OSError):
        return OpcUaError(f"{what}: {e or type(e).__name__}", "connect")
    return OpcUaError(f"{what}: {type(e).__name__}: {e}", "opcua")


def _mismatch_error(endpoint: str, mode: str, policy: str, endpoints: Sequence[Any]) -> OpcUaError:
    offered = sorted({f"{e.SecurityMode.name.rstrip('_')}/{e.SecurityPolicyUri.rsplit('#', 1)[-1]}" for e in endpoints})
    return OpcUaError(
        f"{endpoint} offers no endpoint with {mode}{policy}; it offers: {', '.join(offered) or 'none it would list'}"
        " (set security_mode and security_policy to one of these)",
        "security",
    )


def node_id(ref: NodeRef) -> ua.NodeId:
    """The asyncua NodeId of a parsed reference whose namespace index is known."""
    return ua.NodeId(ref.ident, ref.ns or 0, _KIND[ref.kind])


def _ms(ns: int) -> float:
    return ns / 1e6


@dataclass
class Limits:
    """Operation limits in force: the server's (0 = none) capped by the config's."""

    max_nodes_per_read: int = 0
    max_nodes_per_write: int = 0
    max_monitored_items_per_call: int = 0
    max_nodes_per_browse: int = 0

    def chunk(self, name: str) -> int:
        n = getattr(self, name)
        return n if n > 0 else 1 << 30


def chunks(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)] or [seq[:0]]


# --------------------------------------------------------------------------------------------
# Columns


def columns(
    dvs: Sequence[Any], kinds: np.ndarray, timestamp: str, now_ns: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """DataValues as (values, quality, ts, text) columns; `kinds` holds each value's tag kind.

    The StatusCode goes into quality unchanged (Bad and Uncertain kept; their value is NaN
    when the server sent none). A value that does not fit its tag's kind (an array, text for a
    number) is NaN with BadTypeMismatch, never a guess.
    """
    n = len(dvs)
    quality = np.fromiter((0 if d.StatusCode_ is None else d.StatusCode_.value for d in dvs), np.uint32, n)
    raw = [None if d.Value is None else d.Value.Value for d in dvs]
    text = None
    values = None
    if n and kinds.max(initial=0) <= KIND_BOOL:
        try:
            # numpy's own dtype first: np.array(["12.5"], np.float64) would parse text sent for a
            # number and store it Good (issue 28, tests/faults/test_malformed_input.py).
            arr = np.array(raw)
            values = arr.astype(np.float64) if arr.ndim == 1 and arr.dtype.kind in "biuf" else None
        except (TypeError, ValueError, OverflowError):
            values = None
    if values is None:
        values = np.full(n, np.nan)
        if n and (kinds == KIND_STRING).any():
            text = np.full(n, None, object)
        for i, v in enumerate(raw):
            k = kinds[i]
            if v is None:  # no value (a null String too): None, as a number's NaN
                continue
            try:
                if k == KIND_STRING:
                    if not isinstance(v, str):
                        raise TypeError
                    text[i] = v
                elif k == KIND_DATETIME:
                    values[i] = v.timestamp()
                elif isinstance(v, bool | int | float):
                    values[i] = v
                else:
                    raise TypeError
            except (TypeError, AttributeError):
                if k == KIND_STRING:
                    text[i] = None
                values[i] = np.nan
                quality[i] = BAD_TYPE_MISMATCH
    if timestamp == "gateway":
        ts = np.full(n, now_ns, np.int64)
    else:
        first = "SourceTimestamp" if timestamp == "source" else "ServerTimestamp"
        second = "ServerTimestamp" if timestamp == "source" else "SourceTimestamp"
        secs = np.fromiter(
            (
                _epoch(_stamp(getattr(d, first)) or (_stamp(getattr(d, second)) if timestamp == "source" else None))
                for d in dvs
            ),
            np.float64,
            n,
        )
        missing = np.isnan(secs)
        ts = np.round(np.where(missing, 0.0, secs) * 1e6).astype(np.int64) * 1000
        ts[missing] = now_ns
    return values, quality, ts, text


_NULL_TIME = dt.datetime(1601, 1, 1, tzinfo=dt.UTC)


def _stamp(t: dt.datetime | None) -> dt.datetime | None:
    """None for a DateTime encoded as 0 or less: Part 6 (5.2.2.5) makes that the null value,
    which some servers send for a SourceTimestamp their device does not give. A sample stamped
    1601 would be dropped by retention at once; the next timestamp in line is used instead."""
    if t is None:
        return None
    return None if (t if t.tzinfo else t.replace(tzinfo=dt.UTC)) <= _NULL_TIME else t


def _epoch(t: dt.datetime | None) -> float:
    if t is None:
        return math.nan
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


# --------------------------------------------------------------------------------------------
# Certificates


def thumbprint(der: bytes) -> str:
    return hashlib.sha1(der).hexdigest()  # noqa: S324 - the OPC UA thumbprint is SHA-1 by definition


def certificate_expiry(path: str | os.PathLike[str]) -> dt.datetime:
    cert = _load_cert(Path(path).read_bytes())
    return cert.not_valid_after_utc


def _load_cert(data: bytes) -> x509.Certificate:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def application_uri_of(cert_path: str | os.PathLike[str]) -> str | None:
    """The URI in the certificate's subjectAltName: the ApplicationUri the client must send."""
    return application_uri_of_der(Path(cert_path).read_bytes())


def application_uri_of_der(data: bytes) -> str | None:
    """The URI in a certificate's (PEM or DER) subjectAltName; None without one or unreadable."""
    try:
        cert = _load_cert(data)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def make_certificate(
    cert_path: Path,
    key_path: Path,
    application_uri: str,
    hostname: str,
    *,
    days: int = 3650,
    not_before: dt.datetime | None = None,
    server: bool = False,
    common_name: str = "edgeos",
) -> None:
    """A self-signed application instance certificate (Part 6, 6.2.2): RSA 2048, SHA-256,
    the ApplicationUri and host name in subjectAltName. The key is written mode 0600."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    eku = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(application_uri), x509.DNSName(hostname)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(key_path, 0o600)
    data = cert.public_bytes(serialization.Encoding.DER if cert_path.suffix == ".der" else serialization.Encoding.PEM)
    cert_path.write_bytes(data)


def check_server_certificate(der: bytes, trust_dir: Path, endpoint: str) -> None:
    """Refuse a server certificate edgeos has not been told to trust, or one out of its validity.

    asyncua accepts any certificate; this check is edgeos's own. An unknown one is saved in
    trust_dir/rejected so the operator can trust exactly that one with the command named.
    """
    cert = _load_cert(der)
    der = cert.public_bytes(serialization.Encoding.DER)
    thumb = thumbprint(der)
    trusted = trust_dir / "trusted"
    known = trusted.is_dir() and any(p.is_file() and _same_cert(p, der) for p in sorted(trusted.iterdir()))
    if not known:
        rejected = trust_dir / "rejected"
        rejected.mkdir(parents=True, exist_ok=True)
        saved = rejected / f"{thumb}.der"
        saved.write_bytes(der)
        raise OpcUaError(
            f"the server certificate of {endpoint} (thumbprint {thumb}) is not trusted; it was saved as {saved}. "
            # Absolute paths: the command is run from wherever the operator is, not the config's directory.
            f"If it is the right server, trust it with: edgeos opcua trust {saved.absolute()} "
            f"--trust-dir {trust_dir.absolute()}",
            "untrusted",
        )
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise OpcUaError(
            f"the server certificate of {endpoint} (thumbprint {thumb}) is valid from "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}, not now: refused",
            "expired" if now > cert.not_valid_after_utc else "not_yet_valid",
        )


def _same_cert(path: Path, der: bytes) -> bool:
    try:
        return _load_cert(path.read_bytes()).public_bytes(serialization.Encoding.DER) == der
    except (OSError, ValueError):
        return False


def trust_certificate(path: Path, trust_dir: Path) -> Path:
    """Copy a (rejected) certificate into trust_dir/trusted; returns the new file."""
    der = _load_cert(path.read_bytes()).public_bytes(serialization.Encoding.DER)
    dest = trust_dir / "trusted" / f"{thumbprint(der)}.der"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(der)
    return dest


# --------------------------------------------------------------------------------------------
# Session


PublishCallback = Callable[[Any], Awaitable[None]]


class Session:
    """One connected session to one endpoint, configured from a device's checked options."""

    def __init__(self, endpoint: str, options: Mapping[str, Any], password: str | None = None) -> None:
        self.endpoint = endpoint
        self.o = options
        self.timeout_s = options["timeout"] / 1e9
        self.client: Client | None = None
        self.namespaces: list[str] = []
        self.limits = Limits()
        self.password = password
        self._builtins: dict[Any, str] = {}  # DataType -> built-in type name, per session
        self._enum_types: set[Any] = set()  # DataTypes found to be enumerations
        self._enums: dict[Any, dict[int, str] | None] = {}  # enumeration DataType -> its values
        self.last_publish = 0.0  # monotonic arrival of the last publish answer (publish_loop)
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()  # publish requests out
        self._acks: list[Any] = []  # acknowledgements for the next publish request

    # -- connection

    async def connect(self) -> None:
        o = self.o
        client = Client(self.endpoint, timeout=self.timeout_s, watchdog_intervall=max(1.0, self.timeout_s))
        client.session_timeout = o["session_timeout"] // 1_000_000
        # Who connects, as a server's list of sessions and rejected clients names it (asyncua's
        # defaults name another product: an independent tester's note). With a certificate, its
        # ApplicationUri replaces this one (`_secure`).
        client.name = client.description = "edgeos"
        client.application_uri = f"urn:edgeos:{socket.gethostname()}"
        client.product_uri = "urn:edgeos"
        self.client = client
        try:
            mode = o.get("security_mode") or "None"
            if mode != "None":
                await self._secure(client, mode)
            if o.get("username"):
                client.set_user(o["username"])
                client.set_password(self.password or "")
            if o.get("user_certificate"):
                await client.load_client_certificate(o["user_certificate"])
                await client.load_private_key(Path(o["user_private_key"]))
            await within(client.connect(), self.timeout_s * 3)
            self.namespaces = await self._read_value(ua.ObjectIds.Server_NamespaceArray)
            await self._read_limits()
        except BaseException as e:
            await self.close()
            if isinstance(e, asyncio.CancelledError):
                raise
            if isinstance(e, ua.UaError) and "No matching endpoints" in str(e):
                # Security None against a server without a None endpoint: said as the other
                # mismatches are (asyncua's own text names neither side).
                raise await self._mismatch("None", "") from None
            err = _wrap(e, f"connect to {self.endpoint}")
            raise OpcUaError(f"{err}{self._refused_hint(err.status)}", err.code, err.status) from None

    async def _mismatch(self, mode: str, policy: str) -> OpcUaError:
        """The error for a security mode the server offers no endpoint for, naming what it offers."""
        try:
            endpoints = await self._endpoints()
        except OpcUaError:
            endpoints = []
        return _mismatch_error(self.endpoint, mode, policy, endpoints)

    async def _endpoints(self) -> list[Any]:
        """The server's endpoints (GetEndpoints on a connection of its own, without security)."""
        probe = Client(self.endpoint, timeout=self.timeout_s)
        try:
            return await within(probe.connect_and_get_server_endpoints(), self.timeout_s * 2)
        except Exception as e:
            raise _wrap(e, f"get endpoints of {self.endpoint}") from None

    def _refused_hint(self, status: int) -> str:
        """What to check when the server refused who we are: the status alone names neither the
        user nor the certificate."""
        o = self.o
        if status in _IDENTITY_REFUSED and o.get("username"):
            source = f"password_file {o['password_file']}" if o.get("password_file") else f"${o.get('password_env')}"
            return f" (user {o['username']!r}: check the password in {source})"
        if status in _IDENTITY_REFUSED and o.get("user_certificate"):
            return f" (user certificate {o['user_certificate']}: the server must accept it as a user)"
        if status in _IDENTITY_REFUSED:
            return " (anonymous: the server may require a username or a user certificate)"
        if status in _CERT_REFUSED and o.get("certificate"):
            return (
                f" (the server does not trust the gateway's certificate {o['certificate']}: add it to "
                "the server's trusted certificates)"
            )
        return ""

    async def _secure(self, client: Client, mode: str) -> None:
        o = self.o
        policy = POLICY_CLASSES[o["security_policy"]]
        endpoints = await self._endpoints()
        wanted = [e for e in endpoints if e.SecurityPolicyUri == policy.URI and e.SecurityMode == MODES[mode]]
        if not wanted:
            raise _mismatch_error(self.endpoint, mode, f" and {o['security_policy']}", endpoints)
        der = wanted[0].ServerCertificate
        # A chain may follow the leaf certificate: keep the first DER element.
        der = der[: int.from_bytes(der[2:4], "big") + 4]
        check_server_certificate(der, Path(o["trust_dir"]), self.endpoint)
        server_uri = wanted[0].Server.ApplicationUri if wanted[0].Server is not None else None
        cert_uri = application_uri_of_der(der)
        if server_uri and cert_uri and cert_uri != server_uri:
            # Part 4 6.1.3: a server's certificate names its ApplicationUri. Trusted by the
            # operator all the same, so not refused: said, once a minute.
            _URI_WARNINGS.log(
                logging.WARNING,
                f"uri:{self.endpoint}",
                "%s: the server's certificate names ApplicationUri %s, but the server calls itself %s "
                "(OPC UA Part 4 6.1.3): is it the server its certificate was issued to?",
                self.endpoint,
                cert_uri,
                server_uri,
            )
        uri = application_uri_of(o["certificate"])
        if not uri:
            # Part 4 5.6.2: a server checks the session's ApplicationUri against the certificate's
            # and refuses a mismatch (Bad_CertificateUriInvalid); without one to send, asyncua sent
            # its own default, another product's (an independent tester's finding).
            raise OpcUaError(
                f"the gateway's certificate {o['certificate']} names no ApplicationUri (a URI in its "
                "subjectAltName, OPC UA Part 6 6.2.2), which the session must send: make one with "
                "`edgeos opcua cert`, or have it issued with the URI",
                "certificate",
            )
        client.application_uri = uri
        await client.set_security(policy, o["certificate"], o["private_key"], server_certificate=der, mode=MODES[mode])

    async def _read_limits(self) -> None:
        ids = list(_LIMIT_IDS.values())
        dvs = await self._read_raw([ua.NodeId(i, 0) for i in ids], ua.AttributeIds.Value, 1 << 30)
        cap = self.o.get("max_nodes_per_request") or 0
        for name, d in zip(_LIMIT_IDS, dvs, strict=True):
            v = d.Value.Value if d.Value is not None and d.StatusCode_.is_good() else 0
            v = int(v or 0)
            if cap:
                v = min(v, cap) if v else cap
            setattr(self.limits, name, v)

    def check(self) -> None:
        """Raise if asyncua's own tasks (publish loop, keep-alive reads, channel renewal) failed."""
        c = self.client
        if c is None:
            raise OpcUaError("not connected", "not_connected")
        for t in (c._renew_channel_task, c._monitor_server_task, c.uaclient._publish_task):
            if t is not None and t.done() and not t.cancelled() and t.exception() is not None:
                raise _wrap(t.exception(), "connection")
        if c.uaclient.protocol is None or c.uaclient.protocol.state == "closed":
            raise OpcUaError("connection closed by the server", "connect")

    async def close(self) -> None:
        """Close the session politely within a bound, then drop the socket and asyncua's tasks."""
        c, self.client = self.client, None
        if c is None:
            return
        try:
            with contextlib.suppress(Exception):
                await within(c.disconnect(), min(2.0, self.timeout_s))
        finally:  # a cancellation of this close too: asyncua's tasks and socket must not outlive it
            # A frozen server never answers CloseSession: end what asyncua left running ourselves.
            c._closing = True
            c.uaclient._closing = True
            tasks = [t for t in (c._renew_channel_task, c._monitor_server_task, c.uaclient._publish_task) if t]
            try:
                # Cancelled again while they run: their reads await asyncua's wait_for (edgeos.aio).
                await cancel_and_wait(tasks, "asyncua's session tasks", log, rounds=4, every_s=0.5)
            finally:  # this close cancelled too: the socket still goes
                with contextlib.suppress(Exception):
                    c.disconnect_socket()

    # -- namespaces and nodes

    def resolve(self, ref: NodeRef) -> ua.NodeId | None:
        """The NodeId under this session's NamespaceArray; None for a URI the server lacks."""
        if ref.uri is None:
            return node_id(ref)
        try:
            return node_id(ref.with_index(self.namespaces.index(ref.uri)))
        except ValueError:
            return None

    async def _read_value(self, ident: int) -> Any:
        dvs = await self._read_raw([ua.NodeId(ident, 0)], ua.AttributeIds.Value, 1)
        dvs[0].StatusCode_.check()
        return dvs[0].Value.Value

    async def _read_raw(self, nodes: Sequence[ua.NodeId], attr: int, chunk: int) -> list[Any]:
        c = self.client
        if c is None:
            raise OpcUaError("not connected", "not_connected")
        out: list[Any] = []
        for part in chunks(nodes, chunk):
            params = ua.ReadParameters()
            params.TimestampsToReturn = ua.TimestampsToReturn.Both
            params.NodesToRead = [ua.ReadValueId(NodeId_=n, AttributeId=attr) for n in part]
            out += await within(c.uaclient.read(params), self.timeout_s * 2)
        return out

    async def read(self, nodes: Sequence[ua.NodeId], attr: int = ua.AttributeIds.Value) -> list[Any]:
        """DataValues of `nodes`, in Read calls of at most MaxNodesPerRead nodes each."""
        try:
            return await self._read_raw(nodes, attr, self.limits.chunk("max_nodes_per_read"))
        except Exception as e:
            raise _wrap(e, "read") from None

    async def read_columns(
        self, nodes: Sequence[ua.NodeId], kinds: np.ndarray, timestamp: str, now_ns: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """The Values of `nodes` as `columns` gives them, in Read calls of at most MaxNodesPerRead
        nodes each; answers of scalar numbers are read by numpy (`decode_read`), not asyncua."""
        c = self.client
        if c is None:
            raise OpcUaError("not connected", "not_connected")
        if not len(nodes):
            return np.zeros(0), np.zeros(0, np.uint32), np.zeros(0, np.int64), None
        size = self.limits.chunk("max_nodes_per_read")
        parts = []
        try:
            for lo in range(0, len(nodes), size):
                part, k = nodes[lo : lo + size], kinds[lo : lo + size]
                request = ua.ReadRequest()
                request.Parameters.TimestampsToReturn = ua.TimestampsToReturn.Both
                request.Parameters.NodesToRead = [
                    ua.ReadValueId(NodeId_=n, AttributeId=ua.AttributeIds.Value) for n in part
                ]
                data = await within(c.uaclient.protocol.send_request(request), self.timeout_s * 2)
                cols = decode_read(data)
                if cols is not None and len(cols["values"]) == len(part):
                    parts.append(
                        numeric_columns(
                            cols["values"],
                            cols["quality"],
                            cols.get("source"),
                            cols.get("server"),
                            k,
                            timestamp,
                            now_ns,
                        )
                    )
                    continue
                # Anything else (strings, arrays, odd types): asyncua's decoder, off the event loop.
                loop = asyncio.get_running_loop()
                parts.append(await loop.run_in_executor(_decoder(), _read_columns_slow, data, k, timestamp, now_ns))
        except Exception as e:
            raise _wrap(e, "read") from None
        if len(parts) == 1:
            return parts[0]
        texts = [p[3] for p in parts]
        text = None
        if any(t is not None for t in texts):
            text = np.concatenate(
                [t if t is not None else np.full(len(p[0]), None, object) for t, p in zip(texts, parts, strict=True)]
            )
        return (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]),
            text,
        )

    async def node_info(self, nodes: Sequence[ua.NodeId]) -> list[tuple[int, ua.NodeId | None, int, str]]:
        """(status, DataType, ValueRank, BuiltIn type name) per node: what writes and checks need."""
        types = await self.read(nodes, ua.AttributeIds.DataType)
        ranks = await self.read(nodes, ua.AttributeIds.ValueRank)
        out = []
        for t, r in zip(types, ranks, strict=True):
            status = t.StatusCode_.value if t.StatusCode_ is not None else 0
            if status & 0x80000000:
                out.append((status, None, -1, ""))
                continue
            dtype = t.Value.Value
            rank = r.Value.Value if r.Value is not None and r.Value.Value is not None else -1
            out.append((0, dtype, int(rank), await self.builtin_name(dtype)))
        return out

    async def builtin_name(self, dtype: ua.NodeId) -> str:
        """The built-in type a DataType encodes as (an enumeration is Int32; a subtype its base)."""
        if dtype in self._builtins:
            return self._builtins[dtype]
        name = await self._builtin_name(dtype)
        self._builtins[dtype] = name
        return name

    async def _builtin_name(self, dtype: ua.NodeId) -> str:
        c = self.client
        start = dtype
        seen = 0
        while dtype is not None and seen < 8:
            if dtype.NamespaceIndex == 0 and isinstance(dtype.Identifier, int) and 1 <= dtype.Identifier <= 25:
                return ua.VariantType(dtype.Identifier).name
            if dtype == ua.NodeId(ua.ObjectIds.Enumeration, 0):
                self._enum_types.add(start)
                return "Int32"
            try:
                parents = await within(
                    c.get_node(dtype).get_references(
                        ua.ObjectIds.HasSubtype, ua.BrowseDirection.Inverse, includesubtypes=False
                    ),
                    self.timeout_s * 2,
                )
            except Exception:
                return ""
            dtype = parents[0].NodeId if parents else None
            seen += 1
        return ""

    async def enum_values(self, dtype: ua.NodeId) -> dict[int, str] | None:
        """The values (and names) of an enumeration DataType, None for any other type or when the
        server publishes none. Part 3 gives them as the EnumValues or EnumStrings property (the
        latter valued 0..n-1), and 1.04 servers also as the DataTypeDefinition attribute."""
        if dtype not in self._enum_types:
            return None
        if dtype not in self._enums:
            self._enums[dtype] = await self._enum_values(dtype)
        return self._enums[dtype]

    @staticmethod
    async def _child_value(node: Any, path: str) -> Any:
        return await (await node.get_child(path)).read_value()

    async def _enum_values(self, dtype: ua.NodeId) -> dict[int, str] | None:
        node = self.client.get_node(dtype)
        with contextlib.suppress(Exception):
            values = await within(self._child_value(node, "0:EnumValues"), self.timeout_s * 4)
            if values:
                return {int(v.Value): v.DisplayName.Text or "" for v in values}
        with contextlib.suppress(Exception):
            strings = await within(self._child_value(node, "0:EnumStrings"), self.timeout_s * 4)
            if strings:
                return {k: t.Text or "" for k, t in enumerate(strings)}
        with contextlib.suppress(Exception):
            dvs = await self.read([dtype], ua.AttributeIds.DataTypeDefinition)
            definition = dvs[0].Value.Value if dvs[0].Value is not None else None
            if isinstance(definition, ua.EnumDefinition) and definition.Fields:
                return {int(f.Value): f.Name for f in definition.Fields}
        return None

    # -- subscriptions

    async def subscribe(self, publishing_interval_ns: int, keepalive_count: int) -> tuple[int, float, int]:
        """Create a subscription: (SubscriptionId, revised publishing interval in s, revised
        keep-alive count). Its publish requests are `publish_loop`'s (asyncua's loop is not started)."""
        c = self.client
        if c is None:
            raise OpcUaError("not connected", "not_connected")
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = _ms(publishing_interval_ns)
        params.RequestedMaxKeepAliveCount = keepalive_count
        # Publishing intervals without a publish request before the server drops the
        # subscription: at least 30 s of them. asyncua's server counts every interval with data
        # and no request waiting, so 30 intervals of 50 ms (1.5 s) ended the subscription while
        # a few large responses were being decoded.
        params.RequestedLifetimeCount = max(3 * keepalive_count, 30, math.ceil(30e9 / publishing_interval_ns))
        params.MaxNotificationsPerPublish = 0
        params.PublishingEnabled = True
        params.Priority = 0
        request = ua.CreateSubscriptionRequest()
        request.Parameters = params
        try:
            data = await within(c.uaclient.protocol.send_request(request), self.timeout_s * 2)
            response = struct_from_binary(ua.CreateSubscriptionResponse, data)
            response.ResponseHeader.ServiceResult.check()
        except Exception as e:
            raise _wrap(e, "create subscription") from None
        r = response.Parameters
        return r.SubscriptionId, r.RevisedPublishingInterval / 1e3, r.RevisedMaxKeepAliveCount

    async def publish_loop(self, subscription: int, callback: PublishCallback) -> None:
        """Keep PUBLISH_REQUESTS publish requests waiting at the server and hand every answer
        (keep-alives included) to `callback`, in the server's order.

        asyncua's own loop has one request out at a time and decodes each answer before it
        sends the next: the server then holds data for lack of a request while the client
        decodes. `self.last_publish` is the monotonic time the last answer arrived (set on
        arrival, before decoding): what the adapter's silence check reads.
        """
        c = self.client
        if c is None:
            raise OpcUaError("not connected", "not_connected")
        proto = c.uaclient.protocol
        # The requests out and the acknowledgements not yet sent belong to the session, not to
        # this loop: a loop cancelled with requests out leaves them to the next loop on the
        # same session, so no answer goes to a future nobody awaits.
        pending = self._pending
        want = PUBLISH_REQUESTS
        loop = asyncio.get_running_loop()
        try:
            while True:
                while len(pending) < want:
                    request = ua.PublishRequest()
                    request.Parameters.SubscriptionAcknowledgements = self._acks
                    self._acks = []
                    fut = proto._send_request(request, timeout=0)
                    fut.add_done_callback(self._arrived)
                    pending.append(fut)
                data = await asyncio.shield(pending[0])
                pending.popleft()
                try:
                    proto.check_answer(data, "while waiting for publish response")
                except ua.UaStatusCodeError as e:
                    if e.code == ua.StatusCodes.BadTimeout:
                        continue  # the request timed out at the server: send another
                    if e.code == ua.StatusCodes.BadTooManyPublishRequests:
                        want = max(1, want - 1)
                        continue
                    raise
                pub = decode_publish(data)
                if pub is None:  # not all columns: asyncua's decoder, off the event loop
                    pub = await loop.run_in_executor(_decoder(), decode_publish_slow, data)
                if pub.acknowledge:
                    self._acks.append(
                        ua.SubscriptionAcknowledgement(SubscriptionId=pub.subscription, SequenceNumber=pub.sequence)
                    )
                if pub.subscription == subscription:
                    await callback(pub)
        except (OpcUaError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise _wrap(e, "publish") from None

    def _arrived(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled():
            self.last_publish = time.monotonic()

    async def monitor(self, subscription: int, items: Sequence[tuple[int, ua.NodeId, Mapping[str, Any]]]) -> list[int]:
        """Create monitored items (handle, node, settings), chunked to MaxMonitoredItemsPerCall;
        returns each item's StatusCode (0 = created)."""
        c = self.client
        reqs = []
        for handle, node, s in items:
            mp = ua.MonitoringParameters()
            mp.ClientHandle = handle
            mp.SamplingInterval = _ms(s["sampling_interval"])
            mp.QueueSize = s["queue_size"]
            mp.DiscardOldest = s["discard_oldest"]
            trigger = {"status": 0, "status_value": 1, "status_value_timestamp": 2}[s["trigger"]]
            if s["deadband"] != "none" or trigger != 1:
                f = ua.DataChangeFilter()
                f.Trigger = ua.DataChangeTrigger(trigger)
                f.DeadbandType = {"none": 0, "absolute": 1, "percent": 2}[s["deadband"]]
                f.DeadbandValue = float(s["deadband_value"] or 0.0)
                mp.Filter = f
            r = ua.MonitoredItemCreateRequest()
            r.ItemToMonitor = ua.ReadValueId(NodeId_=node, AttributeId=ua.AttributeIds.Value)
            r.MonitoringMode = ua.MonitoringMode.Reporting
            r.RequestedParameters = mp
            reqs.append(r)
        out: list[int] = []
        try:
            for part in chunks(reqs, self.limits.chunk("max_monitored_items_per_call")):
                if not part:
                    continue
                params = ua.CreateMonitoredItemsParameters()
                params.SubscriptionId = subscription
                params.TimestampsToReturn = ua.TimestampsToReturn.Both
                params.ItemsToCreate = list(part)
                results = await within(c.uaclient.create_monitored_items(params), self.timeout_s * 2)
                out += [r.StatusCode.value for r in results]
        except Exception as e:
            raise _wrap(e, "create monitored items") from None
        return out

    # -- writes

    async def write(self, node: ua.NodeId, value: Any, builtin: str) -> None:
        c = self.client
        if c is None:
            raise OpcUaError("not connected", "not_connected")
        dv = ua.DataValue(ua.Variant(value, ua.VariantType[builtin]))
        params = ua.WriteParameters()
        params.NodesToWrite = [ua.WriteValue(NodeId_=node, AttributeId=ua.AttributeIds.Value, Value=dv)]
        try:
            results = await within(c.uaclient.write(params), self.timeout_s * 2)
            results[0].check()
        except Exception as e:
            raise _wrap(e, "write") from None


PUBLISH_REQUESTS = 3
"""Publish requests kept waiting at the server (Part 4, 5.13.5: a client keeps several so the
server always has one when data or a keep-alive is due); fewer if it answers
BadTooManyPublishRequests."""

_PUBLISH_RESPONSE = ua.FourByteNodeId(ua.ObjectIds.PublishResponse_Encoding_DefaultBinary)
_READ_RESPONSE = ua.FourByteNodeId(ua.ObjectIds.ReadResponse_Encoding_DefaultBinary)
_DATA_CHANGE = ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary
_STATUS_CHANGE = ua.ObjectIds.StatusChangeNotification_Encoding_DefaultBinary
# Scalar numeric Variants (Part 6, 5.1.2 built-in type ids) and how numpy reads them.
_NUMERIC = {1: "u1", 2: "i1", 3: "u1", 4: "<i2", 5: "<u2", 6: "<i4", 7: "<u4", 8: "<i8", 9: "<u8", 10: "<f4", 11: "<f8"}
_FILETIME_1970_US = 11_644_473_600_000_000  # 1601-01-01 to 1970-01-01 in microseconds
_MAX_FILETIME = 2_650_467_743_990_000_000  # asyncua's MAX_OPC_FILETIME (9999-12-31)


@dataclass
class Publish:
    """One publish answer for edgeos: the data changes as columns when every one of them is a
    scalar number of one encoding (the common case, decoded with numpy), else as DataValues."""

    subscription: int
    sequence: int
    acknowledge: bool  # it carried notifications (a keep-alive is not acknowledged)
    status: int | None  # a StatusChangeNotification's status (the subscription ended), else None
    handles: np.ndarray  # ClientHandle per data change
    values: np.ndarray | None = None  # float64 (numpy path)
    quality: np.ndarray | None = None  # uint32 (numpy path)
    source: np.ndarray | None = None  # FILETIME ticks (numpy path; None when not sent)
    server: np.ndarray | None = None
    dvs: list[Any] | None = None  # DataValues (asyncua path)

    def select(self, keep: np.ndarray) -> Publish:
        """The data changes where `keep` is True."""

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[keep]

        dvs = None if self.dvs is None else [d for d, k in zip(self.dvs, keep.tolist(), strict=True) if k]
        return Publish(
            self.subscription,
            self.sequence,
            self.acknowledge,
            self.status,
            self.handles[keep],
            pick(self.values),
            pick(self.quality),
            pick(self.source),
            pick(self.server),
            dvs,
        )


def _u32(b: Any, at: int) -> int:
    return int.from_bytes(b[at : at + 4], "little")


def _i32(b: Any, at: int) -> int:
    return int.from_bytes(b[at : at + 4], "little", signed=True)


def _value_columns(body: Any, handles: bool) -> dict[str, np.ndarray] | None:
    """An array of DataValues (with a ClientHandle before each when `handles`: MonitoredItems)
    followed by DiagnosticInfos, as columns; None unless every item is encoded alike (same
    DataValue mask, same scalar numeric Variant type, no picoseconds) and no diagnostics follow."""
    n = _i32(body, 0)
    first = {"handles": np.zeros(0, np.int64)} if handles else {}
    if n <= 0:
        if len(body) == 8 and _i32(body, 4) <= 0:
            return first | {"values": np.zeros(0), "quality": np.zeros(0, np.uint32)}
        return None
    at = 8 if handles else 4  # the first DataValue's mask
    if len(body) < at + 2:
        return None
    mask, vtype = body[at], body[at + 1]
    if mask & ~0x0F or not mask & 0x01 or vtype not in _NUMERIC:
        return None  # no value, picoseconds, an array, a non-numeric type: asyncua's decoder
    fields = [("h", "<u4")] if handles else []
    fields += [("m", "u1"), ("t", "u1"), ("v", _NUMERIC[vtype])]
    if mask & 0x02:
        fields.append(("s", "<u4"))
    if mask & 0x04:
        fields.append(("src", "<i8"))
    if mask & 0x08:
        fields.append(("srv", "<i8"))
    rec_t = np.dtype(fields)
    if len(body) != 4 + n * rec_t.itemsize + 4 or _i32(body, len(body) - 4) > 0:
        return None  # not one uniform run of items, or DiagnosticInfos follow
    rec = np.frombuffer(body, rec_t, n, 4)
    if (rec["m"] != mask).any() or (rec["t"] != vtype).any():
        return None
    v = rec["v"]
    out = {
        "values": (v != 0).astype(np.float64) if vtype == 1 else v.astype(np.float64),
        "quality": rec["s"].astype(np.uint32) if mask & 0x02 else np.zeros(n, np.uint32),
    }
    if handles:
        out["handles"] = rec["h"].astype(np.int64)
    if mask & 0x04:
        out["source"] = rec["src"].astype(np.int64)
    if mask & 0x08:
        out["server"] = rec["srv"].astype(np.int64)
    return out


def decode_read(data: Any) -> dict[str, np.ndarray] | None:
    """A ReadResponse's DataValues as columns when all are scalar numbers of one encoding (the
    usual poll), else None (then asyncua's decoder)."""
    buf = data.copy()
    if nodeid_from_binary(buf) != _READ_RESPONSE:
        return None
    struct_from_binary(ua.ResponseHeader, buf).ServiceResult.check()
    return _value_columns(buf.read(len(buf)), handles=False)


def decode_publish(data: Any) -> Publish | None:
    """A PublishResponse read straight into columns; None when it holds anything but uniform
    scalar numbers and status changes (then `decode_publish_slow`). Cheap: no object per item."""
    buf = data.copy()
    if nodeid_from_binary(buf) != _PUBLISH_RESPONSE:
        return None
    header = struct_from_binary(ua.ResponseHeader, buf)
    header.ServiceResult.check()
    sub = Primitives.UInt32.unpack(buf)
    avail = Primitives.Int32.unpack(buf)
    buf.skip(4 * max(avail, 0))
    buf.skip(1)  # MoreNotifications
    seq = Primitives.UInt32.unpack(buf)
    buf.skip(8)  # PublishTime
    count = Primitives.Int32.unpack(buf)
    status = None
    parts: list[dict[str, np.ndarray]] = []
    for _ in range(max(count, 0)):
        typeid = nodeid_from_binary(buf)
        encoding = buf.read(1)[0]
        if not encoding & 0x01 or typeid.NamespaceIndex != 0:
            return None
        body = buf.read(Primitives.Int32.unpack(buf))
        if typeid.Identifier == _DATA_CHANGE:
            cols = _value_columns(body, handles=True)
            if cols is None:
                return None
            parts.append(cols)
        elif typeid.Identifier == _STATUS_CHANGE and len(body) >= 4:
            status = _u32(body, 0)
        else:
            return None  # events, or anything unexpected
    if len({frozenset(p) for p in parts}) > 1:
        return None  # timestamps sent in one part and not in another
    pub = Publish(sub, seq, count > 0, status, np.zeros(0, np.int64))
    if parts:
        for k in parts[0]:
            setattr(pub, k, np.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k])
    return pub


def decode_publish_slow(data: Any) -> Publish:
    """A PublishResponse through asyncua's decoder: DataValues, for anything `decode_publish`
    does not read (strings, arrays, odd types, mixed encodings)."""
    try:
        response = struct_from_binary(ua.PublishResponse, data.copy())
    except Exception as e:
        raise OpcUaError(f"publish: undecodable response ({type(e).__name__}: {e})", "decode") from None
    response.ResponseHeader.ServiceResult.check()
    result = response.Parameters
    notes = result.NotificationMessage.NotificationData or []
    items: list[Any] = []
    status = None
    for n in notes:
        if isinstance(n, ua.DataChangeNotification):
            items += n.MonitoredItems
        elif isinstance(n, ua.StatusChangeNotification):
            status = n.Status.value
    return Publish(
        result.SubscriptionId,
        result.NotificationMessage.SequenceNumber,
        bool(notes),
        status,
        np.fromiter((m.ClientHandle for m in items), np.int64, len(items)),
        dvs=[m.Value for m in items],
    )


def publish_columns(
    pub: Publish, kinds: np.ndarray, timestamp: str, now_ns: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """`columns` for a Publish read by numpy."""
    assert pub.values is not None and pub.quality is not None
    return numeric_columns(pub.values, pub.quality, pub.source, pub.server, kinds, timestamp, now_ns)


def numeric_columns(
    values: np.ndarray,
    quality: np.ndarray,
    source: np.ndarray | None,
    server: np.ndarray | None,
    kinds: np.ndarray,
    timestamp: str,
    now_ns: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """`columns` for numbers read by numpy (FILETIME ticks for times): the same values,
    qualities and times, vectorized. A number sent for a string or datetime tag is NaN with
    BadTypeMismatch, as in `columns`."""
    n = len(values)
    values, quality = values.copy(), quality.copy()
    text = None
    odd = kinds > KIND_BOOL
    if odd.any():
        values[odd] = np.nan
        quality[odd] = BAD_TYPE_MISMATCH
        if (kinds == KIND_STRING).any():
            text = np.full(n, None, object)  # no value for the string tags sent a number
    if timestamp == "gateway":
        return values, quality, np.full(n, now_ns, np.int64), text
    first, second = (source, server) if timestamp == "source" else (server, None)
    ticks = first if first is not None else second
    if ticks is None:
        return values, quality, np.full(n, now_ns, np.int64), text
    if second is not None and first is not None:
        ticks = np.where(ticks >= 10, ticks, second)  # a null (0) SourceTimestamp: the server's
    ts = (np.clip(ticks, 0, _MAX_FILETIME) // 10 - _FILETIME_1970_US) * 1000
    ts[ticks < 10] = now_ns  # null (0; 1-9 is under a microsecond past it): the gateway's time
    return values, quality, ts, text


# --------------------------------------------------------------------------------------------
# Writes: conversion to the node's DataType

_INT_RANGES = {
    "SByte": (-(2**7), 2**7 - 1),
    "Byte": (0, 2**8 - 1),
    "Int16": (-(2**15), 2**15 - 1),
    "UInt16": (0, 2**16 - 1),
    "Int32": (-(2**31), 2**31 - 1),
    "UInt32": (0, 2**32 - 1),
    "Int64": (-(2**63), 2**63 - 1),
    "UInt64": (0, 2**64 - 1),
}


def _whole(value: float | int | bool | str) -> int | None:
    """An int or integer text as it is, exact: through a float, 2**64 - 1 became 2**64 (out
    of range) and 2**53 + 1 was written as 2**53."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())
    return None


def convert(value: float | int | bool | str, builtin: str) -> Any:
    """`value` as the node's built-in type; ValueError naming the range when it does not fit."""
    if builtin == "Boolean":
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("true", "1", "on"):
                return True
            if low in ("false", "0", "off"):
                return False
            raise ValueError(f"{value!r} is not a boolean (true/false, 1/0)")
        if value not in (0, 1):
            raise ValueError(f"{value!r} is not a boolean (true/false, 1/0)")
        return bool(value)
    if builtin == "String":
        return str(value)
    if builtin in _INT_RANGES:
        lo, hi = _INT_RANGES[builtin]
        whole = _whole(value)
        if whole is None:
            try:
                f = float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a number") from None
            if not math.isfinite(f) or f != int(f):
                raise ValueError(f"{value!r} is not a whole number ({builtin})")
            whole = int(f)
        if not lo <= whole <= hi:
            raise ValueError(f"{value!r} is out of range for {builtin} ({lo}..{hi})")
        return whole
    if builtin in ("Float", "Double"):
        try:
            f = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
        if builtin == "Float":
            if math.isfinite(f) and abs(f) > float(np.finfo(np.float32).max):
                raise ValueError(f"{value!r} is out of range for Float")
            return float(np.float32(f))
        return f
    if builtin == "DateTime":
        return dt.datetime.fromtimestamp(float(value), dt.UTC)
    raise ValueError(f"writing a {builtin or 'value of an unknown type'} is not supported")


def written(value: Any, builtin: str) -> float | bool | str:
    if builtin == "Boolean":
        return bool(value)
    if builtin == "String":
        return str(value)
    if builtin == "DateTime":
        return value.timestamp()
    return value


# --------------------------------------------------------------------------------------------
# Browse


@dataclass
class Variable:
    path: str
    node: str  # nsu= form
    builtin: str
    unit: str
    writable: bool
    array: bool


async def browse(session: Session, start: str | None, depth: int) -> list[Variable]:
    """The variables under `start` (default the Objects folder) down to `depth` levels."""
    from edgeos.protocols.opcua.config import format_nodeid, parse_nodeid

    c = session.client
    ns = session.namespaces
    root = c.get_node(session.resolve(parse_nodeid(start)) if start else ua.NodeId(ua.ObjectIds.ObjectsFolder, 0))
    out: list[Variable] = []
    seen: set[ua.NodeId] = set()

    async def walk(node: Any, path: list[str], level: int) -> None:
        if node.nodeid in seen or level > depth:
            return
        seen.add(node.nodeid)
        try:
            children = await node.get_children_descriptions(refs=ua.ObjectIds.HierarchicalReferences)
        except Exception as e:
            raise _wrap(e, "browse") from None
        for ch in children:
            nid = ch.NodeId
            if nid.NamespaceIndex == 0:  # the standard's own nodes (Server object, ...)
                continue
            name = ch.BrowseName.Name
            child = c.get_node(nid)
            if ch.NodeClass == ua.NodeClass.Variable:
                info = await session.node_info([nid])
                _, _, rank, builtin = info[0]
                unit = ""
                with contextlib.suppress(Exception):
                    eu = await child.get_child("0:EngineeringUnits")
                    unit = (await eu.read_value()).DisplayName.Text or ""
                access = (await session.read([nid], ua.AttributeIds.UserAccessLevel))[0]
                level_bits = access.Value.Value if access.Value is not None and access.Value.Value is not None else 0
                kind = {ua.NodeIdType.Guid: "g", ua.NodeIdType.ByteString: "b", ua.NodeIdType.String: "s"}.get(
                    nid.NodeIdType, "i"
                )
                uri = ns[nid.NamespaceIndex] if nid.NamespaceIndex < len(ns) else ""
                out.append(
                    Variable(
                        ".".join([*path, name]),
                        format_nodeid(uri, kind, nid.Identifier),
                        builtin,
                        unit,
                        bool(level_bits & ua.AccessLevel.CurrentWrite.mask),
                        rank >= 0 or rank == -3 or rank == -2,
                    )
                )
            if ch.NodeClass in (ua.NodeClass.Object, ua.NodeClass.Variable) and level < depth:
                await walk(child, [*path, name], level + 1)

    await walk(root, [], 0)
    return out


_DECODER: concurrent.futures.ThreadPoolExecutor | None = None


def _decoder() -> concurrent.futures.ThreadPoolExecutor:
    global _DECODER
    if _DECODER is None:
        _DECODER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeos-opcua-decode")
    return _DECODER


def _read_columns_slow(
    data: Any, kinds: np.ndarray, timestamp: str, now_ns: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """A ReadResponse through asyncua's decoder, then `columns`: in the decoding thread."""
    response = struct_from_binary(ua.ReadResponse, data)
    response.ResponseHeader.ServiceResult.check()
    return columns(response.Results, kinds, timestamp, now_ns)


async def columns_apart(
    dvs: Sequence[Any], kinds: np.ndarray, timestamp: str, now_ns: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """`columns` in the decoding thread: 5,000 values take 4-18 ms, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_decoder(), columns, dvs, kinds, timestamp, now_ns)
