"""What a TLS record costs the server side: uvloop's TLS transport against the sidecar's
``TlsTransport`` (OpenSSL reading and writing the socket itself), on one TLS echo server.

``python -m bench.tls_echo [--rounds N] [--size B]`` runs the server once per mode (each in
its own process, a self-signed P-256 certificate made on the spot) and a blocking client
doing ``N`` round trips of ``B`` bytes, and prints µs per round trip and the server's CPU.
``--serve uvloop|socket`` runs a server alone (it prints ``PORT n``) to measure under
``valgrind --tool=callgrind``: 2,000 round trips of 100 bytes cost a uvloop server 32.3k
instructions each, the socket transport (``TlsTransport``) 21.9k (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MODES = ("uvloop", "socket")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Echo(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buffer = bytearray(256 * 1024)
        self.view = memoryview(self.buffer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.write = transport.write  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.write(bytes(self.view[:nbytes]))


async def serve(mode: str, cert: Path, key: Path) -> None:
    from sidecar.upstream.tls_transport import Handshake, TlsTransport

    loop = asyncio.get_running_loop()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if mode == "uvloop":
        server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]

        async def accept(sock: socket.socket) -> None:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            await Handshake(loop, tls).done
            TlsTransport(loop, tls, Echo()).start()

        async def accepting() -> None:
            while True:
                sock, _ = await loop.sock_accept(listener)
                await accept(sock)

        accepter = loop.create_task(accepting())
    print("PORT", port, flush=True)
    await asyncio.Event().wait()


def client(port: int, rounds: int, size: int) -> float:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        message = b"x" * size

        def run(n: int) -> None:
            for _ in range(n):
                s.sendall(message)
                got = 0
                while got < size:
                    got += len(s.recv(65536))

        run(300)  # warm up
        started = time.perf_counter()
        run(rounds)
        return (time.perf_counter() - started) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--serve", choices=MODES, help="run one server alone (for callgrind)")
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        with tempfile.TemporaryDirectory() as tmp:
            cert, key = (args.cert, args.key) if args.cert else make_certificate(Path(tmp))
            uvloop.run(serve(args.serve, cert, key))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_certificate(Path(tmp))
        for i, mode in enumerate(MODES, 1):
            print(f"[{i}/{len(MODES)}] {mode}: {args.rounds} round trips of {args.size} bytes …", flush=True)
            server = subprocess.Popen([sys.executable, "-m", "bench.tls_echo", "--serve", mode,
                                       "--cert", str(cert), "--key", str(key)],
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert server.stdout is not None
                port = int(server.stdout.readline().split()[1])
                before = _cpu(server.pid)
                seconds = client(port, args.rounds, args.size)
                cpu = (_cpu(server.pid) - before) / args.rounds
                print(f"    {seconds * 1e6:.1f} µs a round trip, server CPU {cpu * 1e6:.1f} µs", flush=True)
            finally:
                server.terminate()
                server.wait()


def _cpu(pid: int) -> float:
    """User and system seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
