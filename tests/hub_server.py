"""A Hugging Face Hub on loopback for the download tests: olah serving local git repositories
offline, behind a thin shim.

olah (a self-hosted Hub mirror) answers the Hub's API from each repository's git history and
its LFS objects under `.git/lfs/objects/`: model info, tree listings with sizes and sha256s,
`resolve/{revision}/{file}` with the commit and ETag headers. What its local mirrors leave out
of the Hub's file serving, the shim adds: a Content-Length, and Range requests answered 206
(how a client resumes). And what the tests steer: a log of the file requests, and a stall in
the middle of one file until the test lets it go on.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LFS_PATTERNS = ("*.safetensors",)
PIECE_BYTES = 64 << 10


def add_repo(mirrors: Path, repo_id: str, files: dict[str, bytes], corrupt: str | None = None) -> Path:
    """A git repository as the Hub keeps one: *.safetensors as LFS pointers with their objects
    under .git/lfs/objects/. `corrupt`: a file whose LFS object then differs from its pointer."""
    repo = mirrors / "models" / repo_id
    repo.mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=hub", "-c", "user.email=hub@localhost"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (repo / ".gitattributes").write_text("".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS))
    for name, data in files.items():
        if name.endswith(".safetensors"):
            oid = hashlib.sha256(data).hexdigest()
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data if name != corrupt else _flip_a_byte(data))
            data = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()
        (repo / name).write_bytes(data)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "upload"], check=True)
    return repo


def _flip_a_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


@dataclass
class Stall:
    """The next GET of a file stops after `after` bytes until `release()`."""

    after: int
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


class HubShim:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header) of each GET
        self.stalls: dict[str, Stall] = {}  # by file name

    def stall(self, file: str, after: int) -> Stall:
        self.stalls[file] = Stall(after)
        return self.stalls[file]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or "/resolve/" not in scope["path"]:
            return await self.app(scope, receive, send)
        wanted = dict((k.decode().lower(), v.decode()) for k, v in scope["headers"]).get("range")
        self.requests.append((scope["path"], wanted))
        start: dict[str, Any] = {}
        body = bytearray()

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        await self.app(scope, receive, capture)
        status, first = start["status"], 0
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"transfer-encoding")]
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if status == 200 and match and int(match.group(1)) < len(body):
            first, status = int(match.group(1)), 206
            headers.append((b"content-range", f"bytes {first}-{len(body) - 1}/{len(body)}".encode()))
        headers.append((b"content-length", str(len(body) - first).encode()))
        stall = self.stalls.pop(scope["path"].rsplit("/", 1)[-1], None)
        gone = asyncio.ensure_future(_disconnected(receive))  # a cancel, a kill: stop sending
        await send({"type": "http.response.start", "status": status, "headers": headers})
        try:
            for offset in range(first, len(body), PIECE_BYTES):
                if stall is not None and offset >= stall.after and not stall.reached.is_set():
                    stall.reached.set()
                    while not stall.released.is_set():
                        await asyncio.sleep(0.01)
                await asyncio.sleep(0)  # lets `gone` see a disconnect
                if gone.done():
                    return
                await send({"type": "http.response.body", "body": bytes(body[offset:offset + PIECE_BYTES]),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class HubServer:
    """olah + the shim, served by uvicorn on a thread of the test process; `url` is what
    HF_ENDPOINT points at."""

    def __init__(self, mirrors: Path, work: Path, port: int = 0) -> None:
        import uvicorn
        from olah.configs import OlahConfig
        from olah.server import AppSettings, app

        config = OlahConfig()
        config.offline = True
        config.mirrors_path = [str(mirrors)]
        config.repos_path = str(work / "olah-repos")
        app.state.app_settings = AppSettings(config=config)
        self.shim = HubShim(app)
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", port))
        self.url = "http://127.0.0.1:%d" % self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self.shim, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the hub server did not start")
            threading.Event().wait(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        for stall in self.shim.stalls.values():
            stall.release()
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()
