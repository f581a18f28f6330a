"""A local Hugging Face Hub: the part of the Hub's HTTP API that huggingface_hub's real client
uses to create repos and branches, commit through the classic LFS protocol (HF_HUB_DISABLE_XET=1),
list trees and download files. Files live on disk; every branch is a chain of commits.

`HubServer` runs it in a thread on 127.0.0.1 (port 0); `faults` injects failures (429, 5xx, …)
and `requests` records every request, so tests can count uploads and commits.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores larger files in LFS whatever .gitattributes says
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in (
    "*.bin", "*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.model",
    "*.npy", "*.npz", "*.zip", "*.gz", "*tfevents*")).encode()
BAD_TOKEN = "Invalid credentials in Authorization header"


def git_oid(data: bytes) -> str:
    """git's blob id (sha1 of "blob <size>\\0" + data)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A file in a commit: content addressed by sha256 on disk."""

    sha256: str
    size: int
    lfs: bool

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()


@dataclass
class Repo:
    private: bool
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # oid -> tree
    branches: dict[str, str] = field(default_factory=dict)             # name -> commit oid
    lfs: set[str] = field(default_factory=set)                         # uploaded LFS objects


@dataclass
class Fault:
    """Answer `times` requests matching method and path regex (after letting `after` through)
    with `status`; "{auth}" in `message` becomes the request's Authorization header (a server
    that echoes credentials, to prove they never reach our messages)."""

    method: str
    path: str
    status: int
    times: int = 1
    after: int = 0  # let this many matching requests through first
    message: str = "injected failure"
    headers: dict[str, str] = field(default_factory=dict)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class HubServer:
    """The server state (repos, objects on disk, tokens) and its thread."""

    def __init__(self, root: Path, tokens: dict[str, str]):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.tokens = tokens  # token -> "write" | "read"
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.lock = threading.RLock()
        self.commit_count = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # shutdown() waits for serve_forever's next poll: 0.5 s by default, once per test
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, method: str, path: str) -> int:
        """Successful requests matching method and path regex."""
        return sum(1 for m, p, s in self.requests if m == method and re.search(path, p) and s < 400)

    def branch_files(self, repo: str, branch: str) -> dict[str, bytes]:
        """path -> content of a branch's head commit (for assertions)."""
        tree = self.repos[repo].commits[self.repos[repo].branches[branch]]
        return {p: self.read(b) for p, b in tree.items()}

    # storage
    def store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        (self.root / "objects" / sha).write_bytes(data)
        return sha

    def read(self, blob: Blob) -> bytes:
        return (self.root / "objects" / blob.sha256).read_bytes()

    def git_id(self, blob: Blob) -> str:
        return git_oid(blob.pointer) if blob.lfs else git_oid(self.read(blob))

    def new_commit(self, repo: Repo, tree: dict[str, Blob], parent: str | None, summary: str) -> str:
        self.commit_count += 1
        listing = json.dumps({p: b.sha256 for p, b in sorted(tree.items())})
        oid = hashlib.sha1(f"{parent}\n{summary}\n{self.commit_count}\n{listing}".encode()).hexdigest()
        repo.commits[oid] = tree
        return oid

    # access
    def role(self, auth: str | None) -> str | None:
        token = auth[len("Bearer "):] if auth and auth.startswith("Bearer ") else None
        if auth and token not in self.tokens:
            raise HubError(401, BAD_TOKEN)
        return self.tokens.get(token) if token else None

    def need_write(self, auth: str | None) -> None:
        role = self.role(auth)
        if role is None:
            raise HubError(401, "You must be authenticated to write")
        if role != "write":
            raise HubError(403, "You don't have the rights to write to this namespace")

    def repo(self, repo_id: str, auth: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and self.role(auth) is None):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def commit_of(self, repo: Repo, rev: str) -> str:
        rev = unquote(rev)
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        raise HubError(404, f"Revision {rev} not found", "RevisionNotFound")

    def is_lfs(self, tree: dict[str, Blob], path: str, size: int, sample: bytes) -> bool:
        attrs = self.read(tree[".gitattributes"]).decode() if ".gitattributes" in tree else ""
        patterns = [line.split()[0] for line in attrs.splitlines() if "filter=lfs" in line]
        name = path.rsplit("/", 1)[-1]
        return (size >= LFS_MIN_SIZE or b"\0" in sample
                or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns))

    # endpoints: (method, regex, handler(match, body, query, auth) -> (status, json | bytes, headers))
    def create_repo(self, m, body, query, auth):
        self.need_write(auth)
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        private = payload.get("private", payload.get("visibility") == "private")
        repo = Repo(private=bool(private))
        tree = {".gitattributes": Blob(self.store(GITATTRIBUTES), len(GITATTRIBUTES), False)}
        repo.branches["main"] = self.new_commit(repo, tree, None, "initial commit")
        self.repos[repo_id] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def create_branch(self, m, body, query, auth):
        self.need_write(auth)
        repo = self.repo(m["repo"], auth)
        branch = unquote(m["rev"])
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        start = json.loads(body or b"{}").get("startingPoint", "main")
        repo.branches[branch] = self.commit_of(repo, start)
        return 200, {}, {}

    def refs(self, m, body, query, auth):
        repo = self.repo(m["repo"], auth)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()]
        return 200, {"branches": branches, "converts": [], "tags": []}, {}

    def info(self, m, body, query, auth):
        repo = self.repo(m["repo"], auth)
        sha = self.commit_of(repo, m["rev"] or "main")
        siblings = [{"rfilename": p} for p in sorted(repo.commits[sha])]
        return 200, {"id": m["repo"], "sha": sha, "private": repo.private, "siblings": siblings}, {}

    def entry(self, path: str, blob: Blob) -> dict:
        e = {"type": "file", "path": path, "size": blob.size, "oid": self.git_id(blob)}
        if blob.lfs:
            e["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
        return e

    def tree(self, m, body, query, auth):
        repo = self.repo(m["repo"], auth)
        tree = repo.commits[self.commit_of(repo, m["rev"])]
        prefix = f"{unquote(m['path'])}/" if m["path"] else ""
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        out, folders = [], set()
        for path, blob in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
            else:
                out.append(self.entry(path, blob))
        if recursive:
            folders = {d for p in tree if p.startswith(prefix)
                       for d in ("/".join(p.split("/")[:i]) for i in range(1, p.count("/") + 1))
                       if len(d) >= len(prefix)}
        out += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        if prefix and not out:
            raise HubError(404, f"{prefix} not found", "EntryNotFound")
        return 200, out, {}

    def paths_info(self, m, body, query, auth):
        repo = self.repo(m["repo"], auth)
        tree = repo.commits[self.commit_of(repo, m["rev"])]
        paths = parse_qs(body.decode()).get("paths", [])
        return 200, [self.entry(p, tree[p]) for p in paths if p in tree], {}

    def preupload(self, m, body, query, auth):
        self.need_write(auth)
        repo = self.repo(m["repo"], auth)
        tree = repo.commits[self.commit_of(repo, m["rev"])]
        files = []
        for f in json.loads(body)["files"]:
            lfs = self.is_lfs(tree, f["path"], f["size"], base64.b64decode(f["sample"]))
            old = tree.get(f["path"])
            oid = None if old is None else (old.sha256 if old.lfs else self.git_id(old))
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        return 200, {"files": files}, {}

    def lfs_batch(self, m, body, query, auth):
        self.need_write(auth)
        repo = self.repo(m["repo"], auth)
        objects = []
        for o in json.loads(body)["objects"]:
            obj = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in repo.lfs:
                href = f"{self.url}/lfs-upload/{m['repo']}/{o['oid']}/{o['size']}"
                obj["actions"] = {"upload": {"href": href, "header": {}}}
            objects.append(obj)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def lfs_upload(self, m, body, query, auth):
        repo = self.repos[m["repo"]]
        if hashlib.sha256(body).hexdigest() != m["oid"] or len(body) != int(m["size"]):
            raise HubError(400, "uploaded content does not match its oid/size")
        self.store(body)
        repo.lfs.add(m["oid"])
        return 200, {}, {}

    def commit(self, m, body, query, auth):
        self.need_write(auth)
        repo = self.repo(m["repo"], auth)
        branch = unquote(m["rev"])
        if branch not in repo.branches:
            raise HubError(404, f"Revision {branch} not found", "RevisionNotFound")
        parent = repo.branches[branch]
        tree = dict(repo.commits[parent])
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]
        if header["key"] != "header":
            raise HubError(400, "commit payload must start with a header")
        for op in lines[1:]:
            key, v = op["key"], op["value"]
            if key == "file":
                data = base64.b64decode(v["content"])
                tree[v["path"]] = Blob(self.store(data), len(data), False)
            elif key == "lfsFile":
                if v["oid"] not in repo.lfs:
                    raise HubError(422, f"LFS object {v['oid']} of {v['path']} was never uploaded")
                tree[v["path"]] = Blob(v["oid"], v["size"], True)
            elif key == "deletedFile":
                if v["path"] not in tree:
                    raise HubError(404, f"A file with this name doesn't exist: {v['path']}", "EntryNotFound")
                del tree[v["path"]]
            elif key == "deletedFolder":
                for p in [p for p in tree if p.startswith(v["path"].rstrip("/") + "/")]:
                    del tree[p]
            else:
                raise HubError(400, f"unknown commit operation {key}")
        oid = self.new_commit(repo, tree, parent, header["value"]["summary"])
        repo.branches[branch] = oid
        return 200, {"commitUrl": f"{self.url}/{m['repo']}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}, {}

    def validate_yaml(self, m, body, query, auth):
        content = json.loads(body)["content"]
        errors = []
        if content.startswith("---\n"):
            try:
                meta = yaml.safe_load(content[4:content.index("\n---\n", 3)])
                if not isinstance(meta, dict):
                    errors.append("metadata must be a YAML mapping")
                for item in (meta or {}).get("model-index", []) if isinstance(meta, dict) else []:
                    if not (isinstance(item, dict) and "name" in item and isinstance(item.get("results"), list)):
                        errors.append("model-index entries need a name and a results list")
            except (ValueError, yaml.YAMLError) as e:
                errors.append(f"invalid YAML: {e}")
        return (400 if errors else 200), {"errors": [{"message": e} for e in errors], "warnings": []}, {}

    def resolve(self, m, body, query, auth):
        repo = self.repo(m["repo"], auth)
        sha = self.commit_of(repo, m["rev"])
        path = unquote(m["path"])
        blob = repo.commits[sha].get(path)
        if blob is None:
            raise HubError(404, f"Entry {path} not found", "EntryNotFound")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{self.git_id(blob)}"'}
        if blob.lfs:
            headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)}
        return 200, self.read(blob), headers

    ROUTES = (
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", rf"/api/models/{REPO}/branch/{REV}", "create_branch"),
        ("GET", rf"/api/models/{REPO}/refs", "refs"),
        ("GET", rf"/api/models/{REPO}(?:/revision/{REV})?", "info"),
        ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.+))?", "tree"),
        ("POST", rf"/api/models/{REPO}/paths-info/{REV}", "paths_info"),
        ("POST", rf"/api/models/{REPO}/preupload/{REV}", "preupload"),
        ("POST", rf"/api/models/{REPO}/commit/{REV}", "commit"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", rf"/lfs-upload/{REPO}/(?P<oid>[0-9a-f]{{64}})/(?P<size>\d+)", "lfs_upload"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
    )

    def handle(self, method: str, target: str, body: bytes, auth: str | None):
        """(status, headers, payload) for one request; faults first, then the route table."""
        url = urlsplit(target)
        with self.lock:
            for f in self.faults:
                if f.times > 0 and f.method == method and re.search(f.path, url.path):
                    if f.after > 0:
                        f.after -= 1
                        continue
                    f.times -= 1
                    message = f.message.replace("{auth}", auth or "")
                    return self.reply(method, url.path, f.status, {"error": message},
                                      {"X-Error-Message": message, **f.headers})
            for verb, pattern, name in self.ROUTES:
                m = re.fullmatch(pattern, url.path)
                if verb == method and m:
                    try:
                        status, payload, headers = getattr(self, name)(m, body, parse_qs(url.query), auth)
                    except HubError as e:
                        headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
                        return self.reply(method, url.path, e.status, {"error": e.message, **e.extra}, headers)
                    return self.reply(method, url.path, status, payload, headers)
            return self.reply(method, url.path, 404, {"error": f"no route {method} {url.path}"}, {})

    def reply(self, method, path, status, payload, headers):
        self.requests.append((method, path, status))
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **headers} if not isinstance(payload, bytes) else headers
        return status, headers, data


def make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms stalls

        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def serve(self) -> None:
            body = self.body()
            status, headers, data = server.handle(self.command, self.path, body,
                                                  self.headers.get("Authorization"))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, quote(v, safe=" \"/:;=,.-_*@'()") if k == "X-Error-Message" else v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = serve

        def log_message(self, *args) -> None:
            pass

    return Handler
