"""One raw HTTP/1.1 keep-alive client connection, for tests that need what an HTTP library
hides: a request that never ends, a head of any size, a connection held open or refused."""

from __future__ import annotations

import asyncio

__all__ = ["RawClient"]


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, path: str, extra: bytes = b"", host: bytes = b"admin") -> tuple[int, dict[str, str], bytes]:
        """``extra``: more header lines, each ending in CRLF."""
        self.writer.write(b"GET %s HTTP/1.1\r\nhost: %s\r\n%s\r\n" % (path.encode(), host, extra))
        return await self.response()

    async def response(self, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").strip().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            body = await self.reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, body

    async def closed_by_server(self, within: float = 5.0) -> bool:
        """The server closed (EOF or reset) within ``within`` seconds, whatever it sent first;
        raises TimeoutError if it did not."""
        async with asyncio.timeout(within):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionResetError:
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
