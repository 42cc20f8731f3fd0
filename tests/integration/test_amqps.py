"""``amqps://`` as docs/operations.md documents it: the certificate is verified (chain and host
name) and a client certificate is presented, by cronfleet's own ``connect``.

No broker is reconfigured: a TLS listener in this process, with a throw-away CA, stands in for
RabbitMQ's port 5671 for as long as the TLS handshake and the AMQP protocol header take."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiormq.connection import Connection, SSLContextProvider

from common.connection import connect
from common.errors import BrokerUnavailable

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(directory: Path, name: str, subject: str, extensions: str) -> None:
    """A key and a certificate ``name``.crt signed by the CA in ``directory``."""
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
             cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for ``localhost`` only, and a client certificate."""
    directory = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=cronfleet test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip
    _issue(directory, "server", "/CN=localhost",
           "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")  # fmt: skip
    _issue(directory, "client", "/CN=cronfleet-worker", "extendedKeyUsage=clientAuth\n")
    return directory


@dataclass
class Listener:
    """What a TLS client that got through the handshake said, and the certificate it showed."""

    port: int
    received: list[bytes] = field(default_factory=list)
    client_certificates: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def listener(certificates: Path) -> AsyncIterator[Listener]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates / "server.crt", certificates / "server.key")
    context.load_verify_locations(certificates / "ca.crt")
    context.verify_mode = ssl.CERT_OPTIONAL
    state = Listener(port=0)

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            state.client_certificates.append(writer.get_extra_info("peercert") or {})
            state.received.append(await reader.readexactly(len(AMQP_HEADER)))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=context)
    state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield state


async def test_amqps_verifies_the_chain_and_host_and_presents_the_client_certificate(
    listener: Listener, certificates: Path
) -> None:
    url = (
        f"amqps://worker:secret@localhost:{listener.port}/?cafile={certificates / 'ca.crt'}"
        f"&certfile={certificates / 'client.crt'}&keyfile={certificates / 'client.key'}"
    )
    with pytest.raises(BrokerUnavailable):  # the stand-in hangs up after the protocol header
        await connect(url, "test-amqps", wait=False)
    assert listener.received == [AMQP_HEADER]  # AMQP spoken inside TLS
    subject = dict(item[0] for item in listener.client_certificates[0]["subject"])
    assert subject["commonName"] == "cronfleet-worker"


async def test_amqps_refuses_a_certificate_for_another_host(listener: Listener, certificates: Path) -> None:
    url = f"amqps://worker:secret@127.0.0.1:{listener.port}/?cafile={certificates / 'ca.crt'}"
    with pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await connect(url, "test-amqps", wait=False)
    assert listener.received == []


async def test_amqps_refuses_a_certificate_from_an_unknown_ca(listener: Listener) -> None:
    url = f"amqps://worker:secret@localhost:{listener.port}/"
    with pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await connect(url, "test-amqps", wait=False)
    assert listener.received == []


async def test_ca_certs_is_not_a_parameter_of_this_aiormq(listener: Listener, certificates: Path) -> None:
    """aio-pika's docstring spells the CA ``ca_certs``; aiormq 7 reads only ``cafile`` (the
    wrong spelling is ignored, so the system's CAs are used and a private CA fails)."""
    url = f"amqps://worker:secret@localhost:{listener.port}/?ca_certs={certificates / 'ca.crt'}"
    with pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await connect(url, "test-amqps", wait=False)


async def test_the_url_yields_a_verifying_context(certificates: Path) -> None:
    connection = Connection(f"amqps://u:p@rabbit.example/?cafile={certificates / 'ca.crt'}")
    assert connection.url.port == 5671
    provider = SSLContextProvider(
        ssl_context=None, ssl_certs=connection.ssl_certs, loop=asyncio.get_running_loop()
    )
    context = await provider.get_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert any(
        dict(i[0] for i in ca["subject"])["commonName"] == "cronfleet test CA"
        for ca in context.get_ca_certs()
    )
