"""HTTP/1.1 over asyncio streams, with a small keep-alive pool per instance."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Callable

from lib.common import IDLE_MAX, TRY_TIMEOUT


class Http:
    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]]] = \
            collections.defaultdict(list)

    def _take(self, key: tuple[str, int]):
        pool = self.idle[key]
        while pool:
            r, w, t = pool.pop()
            if time.monotonic() - t < IDLE_MAX and not w.is_closing() and not r.at_eof():
                return r, w
            w.close()
        return None

    def close_all(self) -> None:
        for pool in self.idle.values():
            for _, w, _ in pool:
                w.close()
        self.idle.clear()

    async def request(self, host: str, port: int, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None, timeout: float = TRY_TIMEOUT,
                      barrier: asyncio.Event | None = None,
                      on_connected: Callable[[], None] | None = None) -> dict[str, Any]:
        """One exchange. Never raises: transport failures come back as `err`."""
        key = (host, port)
        res: dict[str, Any] = {"status": None, "headers": {}, "body": b"", "err": None, "reused": False}
        conn = None if barrier else self._take(key)
        writer = None
        try:
            if conn is None:
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
                except ConnectionRefusedError:
                    res["err"] = "refused"
                    return res
                except asyncio.TimeoutError:
                    res["err"] = "connect-timeout"
                    return res
            else:
                reader, writer = conn
                res["reused"] = True
            if barrier is not None:
                if on_connected:
                    on_connected()
                await barrier.wait()
            head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: keep-alive\r\n"
            for k, v in (headers or {}).items():
                head += f"{k}: {v}\r\n"
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            data = head.encode() + b"\r\n" + (body or b"")
            keep = await asyncio.wait_for(self._exchange(reader, writer, data, res), timeout)
            if keep:
                self.idle[key].append((reader, writer, time.monotonic()))
                writer = None
        except asyncio.TimeoutError:
            res["err"] = "timeout"
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as e:
            res["err"] = "reset" if res["status"] is None else f"reset-after-status:{type(e).__name__}"
        except OSError as e:
            res["err"] = f"oserror:{e.errno}"
        finally:
            if writer is not None:
                writer.close()
        return res

    @staticmethod
    async def _exchange(reader, writer, data: bytes, res: dict[str, Any]) -> bool:
        writer.write(data)
        await writer.drain()
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        res["status"], res["headers"] = status, hdrs
        keep = hdrs.get("connection", "").lower() != "close"
        if "content-length" in hdrs:
            res["body"] = await reader.readexactly(int(hdrs["content-length"]))
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            res["body"] = b"".join(chunks)
        else:
            res["body"] = await reader.read()
            keep = False
        return keep
