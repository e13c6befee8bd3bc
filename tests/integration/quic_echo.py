"""A QUIC echo server and client on aioquic's public asyncio API, for the integration
tests (not part of the product).

    python quic_echo.py cert DIR NAME                  a self-signed cert and key for NAME
    python quic_echo.py serve HOST PORT CERT KEY       echo every stream back, until killed
    python quic_echo.py get NAME PORT CAFILE BYTES     one connection, by name: BYTES random
                                                       bytes on a stream, the echo read back;
                                                       prints JSON (sizes, SHA-256 both ways,
                                                       the largest datagram received)

Datagrams are up to MAX_DATAGRAM bytes with DF set (IP_PMTUDISC_DO, as QUIC stacks send
them): 1452 bytes of UDP payload is what a 1500-byte path carries.
"""
import asyncio
import datetime
import hashlib
import json
import os
import socket
import sys

ALPN = ["serval-echo"]
MAX_DATAGRAM = 1452
IP_MTU_DISCOVER, IPV6_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 23, 2     # <linux/in.h>, <linux/in6.h>


def make_cert(directory: str, name: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    with open(os.path.join(directory, "cert.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(directory, "key.pem"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def protocol_class():
    """aioquic's connection protocol, setting DF on its socket when given one and
    keeping the size of the largest datagram it received."""
    from aioquic.asyncio import QuicConnectionProtocol

    class DontFragment(QuicConnectionProtocol):
        largest = 0

        def datagram_received(self, data, addr) -> None:
            self.largest = max(self.largest, len(data))
            super().datagram_received(data, addr)

        def connection_made(self, transport) -> None:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            if sock.family == socket.AF_INET6:     # the client's dual-stack socket (IPv4 as v4-mapped)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IP_PMTUDISC_DO)
            super().connection_made(transport)

    return DontFragment


async def serve(host: str, port: int, cert: str, key: str) -> None:
    from aioquic.asyncio import serve as quic_serve
    from aioquic.quic.configuration import QuicConfiguration

    config = QuicConfiguration(is_client=False, alpn_protocols=ALPN, max_datagram_size=MAX_DATAGRAM)
    config.load_cert_chain(cert, key)

    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
        writer.write_eof()

    def on_stream(reader, writer):
        asyncio.ensure_future(echo(reader, writer))

    await quic_serve(host, port, configuration=config, stream_handler=on_stream,
                     create_protocol=protocol_class())
    print("listening", flush=True)
    await asyncio.Event().wait()


async def get(name: str, port: int, cafile: str, size: int) -> dict:
    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    config = QuicConfiguration(is_client=True, alpn_protocols=ALPN, max_datagram_size=MAX_DATAGRAM)
    config.load_verify_locations(cafile)
    payload = os.urandom(size)
    async with connect(name, port, configuration=config, create_protocol=protocol_class()) as client:
        reader, writer = await client.create_stream()

        async def send():
            for i in range(0, size, 65536):
                writer.write(payload[i:i + 65536])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        h, got = hashlib.sha256(), 0
        while data := await reader.read(65536):
            h.update(data)
            got += len(data)
        await sender
        largest = client.largest
    return {"sent": size, "sent_sha256": hashlib.sha256(payload).hexdigest(), "got": got,
            "got_sha256": h.hexdigest(), "largest_datagram_received": largest}


def main(argv: list[str]) -> None:
    if argv[0] == "cert":
        make_cert(argv[1], argv[2])
    elif argv[0] == "serve":
        asyncio.run(serve(argv[1], int(argv[2]), argv[3], argv[4]))
    elif argv[0] == "get":
        print(json.dumps(asyncio.run(asyncio.wait_for(get(argv[1], int(argv[2]), argv[3], int(argv[4])), 60))))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
