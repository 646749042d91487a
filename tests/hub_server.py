"""A tiny Hugging Face Hub on 127.0.0.1 for offline tests: the endpoints huggingface_hub 2.4 uses
(``../shared/HUB.md``), with ETag, X-Repo-Commit, Content-Length and Range support, and knobs to
misbehave: cut a connection mid-file, serve bytes that do not match the advertised digest,
ignore Range requests (answer 200 with the whole file), or send slowly. Every request is logged."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


@dataclass
class Logged:
    method: str
    path: str
    range: str | None


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""

    def __post_init__(self):
        h = hashlib.sha1()
        for path in sorted(self.files):
            h.update(path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
        self.commit = h.hexdigest()

    def entry(self, path: str) -> dict:
        data = self.files[path]
        git_oid = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        item = {"type": "file", "path": path, "size": len(data), "oid": git_oid}
        if path.endswith(LFS_SUFFIXES):
            item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return item

    def etag(self, path: str) -> str:
        item = self.entry(path)
        return item["lfs"]["oid"] if "lfs" in item else item["oid"]


@dataclass
class TinyHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[Logged] = field(default_factory=list)
    cuts: dict[str, list[int]] = field(default_factory=dict)  # "repo/path" -> [bytes sent before the cut, times]
    corrupt: set[str] = field(default_factory=set)  # "repo/path": served with one byte changed
    ignore_range: set[str] = field(default_factory=set)  # "repo/path": Range requests get the whole file
    rate: float | None = None  # bytes per second for file bodies
    url: str = ""

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path]) -> Repo:
        repo = Repo({p: (f.read_bytes() if isinstance(f, Path) else f) for p, f in files.items()})
        self.repos[repo_id] = repo
        return repo

    def cut(self, repo_id: str, path: str, after: int, times: int = 1) -> None:
        self.cuts[f"{repo_id}/{path}"] = [after, times]

    def gets(self, path_part: str = "") -> list[Logged]:
        return [r for r in self.log if r.method == "GET" and "/resolve/" in r.path and path_part in r.path]

    def start(self) -> "TinyHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client killed mid-download: expected here
        pass


class _Handler(BaseHTTPRequestHandler):
    hub: TinyHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    # -- routing -------------------------------------------------------------------------------
    def _route(self, head: bool) -> None:
        split = urlsplit(self.path)
        self.hub.log.append(Logged(self.command, split.path, self.headers.get("Range")))
        parts = [unquote(p) for p in split.path.strip("/").split("/")]  # split first, then decode
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            if action == "revision":
                return self._json({"id": repo_id, "sha": repo.commit,
                                   "siblings": [{"rfilename": p} for p in sorted(repo.files)]})
            if action == "tree":
                return self._json(self._tree(repo, "/".join(parts[6:]), "recursive=true" in split.query))
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            if path not in repo.files:
                return self._error(404, "EntryNotFound")
            return self._file(repo_id, repo, path, head)
        self._error(404, "RepoNotFound")

    def _repo(self, repo_id: str, revision: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound")
            return None
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound")
            return None
        return repo

    @staticmethod
    def _tree(repo: Repo, under: str, recursive: bool) -> list[dict]:
        prefix = under.rstrip("/") + "/" if under else ""
        items, folders = [], set()
        for path in sorted(repo.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest:
                parts = rest.split("/")
                for i in range(1, len(parts) if recursive else 2):
                    folders.add(prefix + "/".join(parts[:i]))
                if not recursive:
                    continue
            items.append(repo.entry(path))
        items += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        return items

    # -- answers -------------------------------------------------------------------------------
    def _json(self, data) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _file(self, repo_id: str, repo: Repo, path: str, head: bool) -> None:
        key = f"{repo_id}/{path}"
        data = repo.files[path]
        if key in self.hub.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes=") and key not in self.hub.ignore_range:
            start = int(wanted[len("bytes="):].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(206 if start else 200)
        self.send_header("ETag", f'"{repo.etag(path)}"')
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        body = memoryview(data)[start:]
        cut = self.hub.cuts.get(key)
        if cut and cut[1] > 0:
            cut[1] -= 1
            self._send(body[: max(0, cut[0] - start)])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the full length was promised: a cut mid-file
            self.close_connection = True
            return
        self._send(body)

    def _send(self, body: memoryview) -> None:
        step = 1 << 16
        for i in range(0, len(body), step):
            self.wfile.write(body[i:i + step])
            if self.hub.rate:
                self.wfile.flush()
                time.sleep(step / self.hub.rate)
