"""OPC UA commands: `edgeos browse` (address space -> tags CSV), `edgeos opcua cert` (the
gateway's application instance certificate) and `edgeos opcua trust` (a server certificate).

asyncua is imported only when one of these runs.
"""

from __future__ import annotations

import asyncio
import csv
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeos.cli.app import app

opcua_app = typer.Typer(help="OPC UA certificates.", no_args_is_help=True)
app.add_typer(opcua_app, name="opcua")

_TYPES = {"Boolean": "bool", "String": "string", "DateTime": "datetime"}
_NUMERIC = {"SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float", "Double"}


def _need_asyncua() -> None:
    from edgeos.protocols.opcua import INSTALL_HINT, asyncua_installed

    if not asyncua_installed():
        typer.echo(f"edgeos: {INSTALL_HINT}", err=True)
        raise typer.Exit(1)


@opcua_app.command("cert")
def cert(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where cert.der and key.pem are written.")] = Path("pki"),
    application_uri: Annotated[
        str | None,
        typer.Option(help="ApplicationUri (default urn:edgeos:<hostname>); edgeos sends the one in the cert."),
    ] = None,
    hostname: Annotated[str | None, typer.Option(help="Host name in subjectAltName (default: this host's).")] = None,
    days: Annotated[int, typer.Option(min=1, max=36500, help="Validity in days.")] = 3650,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing certificate and key.")] = False,
) -> None:
    """Create the gateway's application instance certificate and key (key mode 0600)."""
    _need_asyncua()
    from edgeos.protocols.opcua.client import make_certificate

    host = hostname or socket.gethostname()
    uri = application_uri or f"urn:edgeos:{host}"
    cert_path, key_path = out_dir / "cert.der", out_dir / "key.pem"
    if not force and (cert_path.exists() or key_path.exists()):
        typer.echo(f"edgeos: {cert_path} or {key_path} exists; --force replaces them", err=True)
        raise typer.Exit(1)
    make_certificate(cert_path, key_path, uri, host, days=days)
    typer.echo(f"certificate {cert_path} (ApplicationUri {uri}, valid {days} days)")
    typer.echo(f"private key {key_path} (mode 0600)")
    typer.echo(f'in the device: certificate = "{cert_path.resolve()}", private_key = "{key_path.resolve()}"')
    typer.echo("give the server the certificate to trust (its trusted/ folder or its administration page)")


@opcua_app.command("trust")
def trust(
    certificate: Annotated[Path, typer.Argument(help="The server certificate (as saved in rejected/).")],
    trust_dir: Annotated[Path, typer.Option("--trust-dir", help="The device's trust_dir.")],
) -> None:
    """Trust a server certificate: copy it into TRUST_DIR/trusted."""
    _need_asyncua()
    from edgeos.protocols.opcua.client import trust_certificate

    try:
        dest = trust_certificate(certificate, trust_dir)
    except (OSError, ValueError) as e:
        typer.echo(f"edgeos: cannot trust {certificate}: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"trusted: {dest}")


def _options(**kw: Any) -> dict[str, Any]:
    """The command line's options checked as a device's would be."""
    from edgeos.config.schema import Problems, parse_table
    from edgeos.protocols.opcua.config import DEVICE_FIELDS

    problems = Problems("command line")
    o = parse_table({k: v for k, v in kw.items() if v is not None}, DEVICE_FIELDS, "", problems)
    if problems:
        for p in problems.items:
            typer.echo(f"edgeos: --{p.path.replace('_', '-')}: {p.message}", err=True)
        raise typer.Exit(2)
    return o


@app.command()
def browse(
    endpoint: Annotated[str, typer.Argument(help="opc.tcp://host:port")],
    node: Annotated[str | None, typer.Option(help="Start here (default: the Objects folder).")] = None,
    depth: Annotated[int, typer.Option(min=0, max=32, help="Levels below the start node.")] = 4,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Tags CSV to write (default: stdout).")] = None,
    security_mode: Annotated[str, typer.Option(help="None, Sign or SignAndEncrypt.")] = "None",
    security_policy: Annotated[str | None, typer.Option()] = None,
    certificate: Annotated[str | None, typer.Option()] = None,
    private_key: Annotated[str | None, typer.Option()] = None,
    trust_dir: Annotated[str | None, typer.Option()] = None,
    username: Annotated[str | None, typer.Option()] = None,
    password_env: Annotated[str | None, typer.Option(help="Environment variable holding the password.")] = None,
    password_file: Annotated[str | None, typer.Option()] = None,
    timeout: Annotated[str, typer.Option(help="Request timeout.")] = "5s",
) -> None:
    """Walk a server's address space; write its variables as a tags CSV that tags_csv imports."""
    _need_asyncua()
    from edgeos.protocols.opcua import client as uac
    from edgeos.protocols.opcua.adapter import read_password

    o = _options(
        endpoint=endpoint,
        security_mode=security_mode,
        security_policy=security_policy,
        certificate=certificate,
        private_key=private_key,
        trust_dir=trust_dir,
        username=username,
        password_env=password_env,
        password_file=password_file,
        timeout=timeout,
    )

    async def walk() -> list[uac.Variable]:
        s = uac.Session(endpoint, o, read_password(o))
        await s.connect()
        try:
            return await uac.browse(s, node, depth)
        finally:
            await s.close()

    try:
        found = asyncio.run(walk())
    except uac.OpcUaError as e:
        typer.echo(f"edgeos: {e}", err=True)
        raise typer.Exit(1) from None
    fh = out.open("w", newline="", encoding="utf-8") if out else sys.stdout
    skipped = 0
    try:
        w = csv.writer(fh)
        w.writerow(["name", "node", "type", "unit", "writable", "description"])
        names: set[str] = set()
        for v in found:
            if v.array or not (v.builtin in _TYPES or v.builtin in _NUMERIC):
                skipped += 1
                continue
            name = _tag_name(v.path, names)
            w.writerow(
                [name, v.node, _TYPES.get(v.builtin, "number"), v.unit, "true" if v.writable else "false", v.builtin]
            )
    finally:
        if out:
            fh.close()
    n = len(found) - skipped
    where = f" into {out}" if out else ""
    note = f"; {skipped} skipped (arrays or types a tag cannot carry)" if skipped else ""
    typer.echo(f"{n} variable{'s' if n != 1 else ''}{where}{note}", err=True)


def _tag_name(path: str, seen: set[str]) -> str:
    """A valid, unique tag name from a browse path."""
    import re

    base = re.sub(r"[^A-Za-z0-9_.\-]", "_", path).lstrip("_.-") or "tag"
    base = base[:120]
    name, k = base, 2
    while name in seen:
        name, k = f"{base}_{k}", k + 1
    seen.add(name)
    return name
