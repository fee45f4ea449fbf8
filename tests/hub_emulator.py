"""A Hugging Face Hub on loopback, serving local folders as model repositories at one commit: enough of
the Hub's HTTP API for `huggingface_hub` (repo info, the recursive tree listing, file downloads) to
run unchanged against it with `HF_ENDPOINT`. It records every file it is asked for."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path

from gcs_emulator import free_port

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin")


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubEmulator:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self.downloads: list[str] = []
        """`repo_id/path` of every file body served, in order."""
        emulator = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                emulator._serve(self, body=False)

            def do_GET(self):
                emulator._serve(self, body=True)

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def _files(self, repo_id: str) -> dict[str, Path]:
        root = self.repos[repo_id]
        return {str(path.relative_to(root)): path for path in sorted(root.rglob("*")) if path.is_file()}

    def _entry(self, path: str, file: Path) -> dict:
        data = file.read_bytes()
        entry = {"type": "file", "oid": _git_blob_id(data), "size": len(data), "path": path}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _serve(self, handler, body: bool):
        url = urllib.parse.urlparse(handler.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id = "/".join(parts[2:4])
            if repo_id in self.repos and parts[4] == "revision":
                files = self._files(repo_id)
                return self._json(handler, {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False,
                                            "siblings": [{"rfilename": p} for p in files]}, body)
            if repo_id in self.repos and parts[4] == "tree":
                prefix = "/".join(parts[6:])
                entries = [self._entry(p, f) for p, f in self._files(repo_id).items() if p.startswith(prefix)]
                return self._json(handler, entries, body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_id, path = "/".join(parts[:2]), "/".join(parts[4:])
            file = self._files(repo_id).get(path) if repo_id in self.repos else None
            if file is not None:
                entry = self._entry(path, file)
                data = file.read_bytes()
                handler.send_response(200)
                handler.send_header("X-Repo-Commit", COMMIT)
                handler.send_header("ETag", f'"{entry["oid"]}"')
                if "lfs" in entry:
                    handler.send_header("X-Linked-Etag", f'"{entry["lfs"]["oid"]}"')
                    handler.send_header("X-Linked-Size", str(len(data)))
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                if body:
                    self.downloads.append(f"{repo_id}/{path}")
                    handler.wfile.write(data)
                return
        handler.send_response(404)
        handler.send_header("X-Error-Code", "RepoNotFound")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    @staticmethod
    def _json(handler, value, body: bool):
        data = json.dumps(value).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
