"""A study's storage: the one place every node of a cluster reads and writes what crosses nodes.

Tune's experiment state, Ray Train's checkpoints, the trials' checkpoints, φ (the meta stage's output) and the
epoch-0 evaluation cache all live under it. On one machine it is the study directory; on a cluster it is a
directory every node mounts at the same path (NFS) or a URI of any filesystem pyarrow knows (``s3://bucket/prefix``,
``gs://...``; an S3-compatible server through the standard AWS variables, or pyarrow's URI options such as
``?endpoint_override=host:port&scheme=http``). Nothing here imports Ray: the driver and the trials both use it.

Files written here appear whole: a file is written under a temporary name and moved (a local or NFS path), or
written in one request (object stores). A directory published here (φ) carries a manifest of its files' sizes
and SHA-256, written last, so a reader on another node either sees no manifest or a complete, verified copy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qsl, urlencode

from trainables.errors import InputError, first_line
from trainables.files import write_bytes_atomic

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Storage:
    """``uri``: an absolute local path, or a URI whose options (after ``?``) stay at its end (as Tune takes it)."""

    uri: str

    @classmethod
    def resolve(cls, value: Optional[str], study_dir: Path, where: str = "storage") -> "Storage":
        """The storage a study was given (``value``: a path or a URI; None: the study directory). A path is made
        absolute; a URI's scheme must be one pyarrow can open here (checked, not yet reached)."""
        if not value:
            return cls(str(Path(study_dir).resolve()))
        value = str(value).strip()
        if "://" not in value:
            if value.startswith("file:"):
                value = value[len("file:"):]
            return cls(str(Path(value).expanduser().resolve()))
        scheme = value.split("://", 1)[0].lower()
        if scheme == "file":
            return cls(str(Path(value[len("file://"):]).resolve()))
        from pyarrow import fs as pafs

        try:
            pafs.FileSystem.from_uri(value)
        except Exception as e:  # noqa: BLE001 (pyarrow raises ValueError, ArrowInvalid, OSError... for a bad URI)
            raise InputError(where, f"{_mask(value)}: not a storage pyarrow can open ({type(e).__name__}: "
                                    f"{first_line(e, 300)}); use a path every node mounts, or "
                                    "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX") from None
        return cls(value)

    @property
    def local(self) -> bool:
        """A path (this machine's disk, or a shared filesystem mounted at this path), not an object store."""
        return "://" not in self.uri

    def __str__(self) -> str:
        return _mask(self.uri)

    def join(self, *parts: str) -> str:
        """A path or URI below this one (its options kept at the end): what Tune and Ray Train take."""
        parts = tuple(p.strip("/") for p in parts if p and p.strip("/"))
        if self.local:
            return str(Path(self.uri, *parts))
        base, _, query = self.uri.partition("?")
        return "/".join([base.rstrip("/"), *parts]) + (f"?{query}" if query else "")

    def filesystem(self, *parts: str):
        """(pyarrow filesystem, path in it) of ``join(*parts)``."""
        from pyarrow import fs as pafs

        if self.local:
            return pafs.LocalFileSystem(), self.join(*parts)
        return pafs.FileSystem.from_uri(self.join(*parts))

    # files -----------------------------------------------------------------------------------------------------
    def read_bytes(self, *parts: str) -> Optional[bytes]:
        """The file's bytes, or None when it does not exist."""
        fs, path = self.filesystem(*parts)
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except (FileNotFoundError, OSError) as e:
            if _missing(fs, path):
                return None
            raise OSError(f"cannot read {self.join(*parts)}: {e}") from e

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """The whole file appears at once (a temporary sibling renamed; one request on an object store)."""
        if self.local:
            write_bytes_atomic(self.join(*parts), data)
            return
        fs, path = self.filesystem(*parts)
        with fs.open_output_stream(path) as f:
            f.write(data)

    def read_json(self, *parts: str) -> Optional[dict]:
        raw = self.read_bytes(*parts)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return None

    def write_json(self, data, *parts: str) -> None:
        self.write_bytes(json.dumps(data, indent=1, sort_keys=True).encode(), *parts)

    def delete(self, *parts: str) -> None:
        """A file or a directory, if it is there."""
        from pyarrow import fs as pafs

        fs, path = self.filesystem(*parts)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)

    # directories with a manifest -------------------------------------------------------------------------------
    def put_dir(self, local: Path, *parts: str, names: Optional[list[str]] = None) -> dict:
        """Publish the files ``names`` (default: every file directly in ``local``) under ``parts``, then their
        manifest (sizes, SHA-256). Returns the manifest."""
        local = Path(local)
        names = sorted(names if names is not None else [p.name for p in local.iterdir() if p.is_file()])
        files = {}
        for name in names:
            data = (local / name).read_bytes()
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            self.write_bytes(data, *parts, name)
        manifest = {"files": files}
        self.write_json(manifest, *parts, MANIFEST)
        return manifest

    def manifest(self, *parts: str) -> Optional[dict]:
        m = self.read_json(*parts, MANIFEST)
        return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None

    def get_dir(self, local: Path, *parts: str) -> dict:
        """The directory published under ``parts`` into ``local`` (replaced whole, never half-written), every
        file checked against the manifest; a missing manifest or a file that differs is an OSError naming it."""
        from trainables.checkpoint import atomic_directory

        manifest = self.manifest(*parts)
        if manifest is None:
            raise FileNotFoundError(f"{self.join(*parts)}: nothing published there (no {MANIFEST})")
        with atomic_directory(Path(local)) as tmp:
            for name, want in sorted(manifest["files"].items()):
                data = self.read_bytes(*parts, name)
                if data is None:
                    raise OSError(f"{self.join(*parts, name)}: listed in its manifest but missing")
                got = hashlib.sha256(data).hexdigest()
                if len(data) != want.get("size") or got != want.get("sha256"):
                    raise OSError(f"{self.join(*parts, name)}: {len(data)} bytes, sha256 {got[:12]}…, but the "
                                  f"manifest says {want.get('size')} bytes, {str(want.get('sha256'))[:12]}…")
                (tmp / name).write_bytes(data)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return manifest


def local_copy_matches(local: Path, manifest: dict) -> bool:
    """``local`` holds exactly the manifest's files (checked by size and SHA-256)."""
    for name, want in manifest.get("files", {}).items():
        f = Path(local) / name
        try:
            data = f.read_bytes()
        except OSError:
            return False
        if len(data) != want.get("size") or hashlib.sha256(data).hexdigest() != want.get("sha256"):
            return False
    return True


def _missing(fs, path: str) -> bool:
    from pyarrow import fs as pafs

    try:
        return fs.get_file_info(path).type == pafs.FileType.NotFound
    except Exception:  # noqa: BLE001 (unreachable: not "missing", the caller reports the read error)
        return False


def _mask(uri: str) -> str:
    """A URI fit to print: credentials given as URI options are hidden."""
    base, _, query = uri.partition("?")
    if not query:
        return uri
    opts = [(k, "***" if k in ("secret_key", "session_token", "access_key") else v) for k, v in parse_qsl(query)]
    return f"{base}?{urlencode(opts, safe=':/')}"


# ---- φ through the storage -----------------------------------------------------------------------------------

PHI_FILES = ("phi.json", "phi.safetensors")  # φ itself (trainables.train_attention's checkpoint)
PHI_EXTRAS = ("meta_metrics.json", "heatmap.html")  # what the meta stage says about it


def phi_trained(d: Path) -> bool:
    """This node's φ cache directory ``d`` holds a finished meta-training (OUT/phi is written at every better check,
    so it exists mid-training too; meta_metrics.json only at the end)."""
    return (d / "phi" / "phi.json").is_file() and (d / "meta_metrics.json").is_file()


def phi_published(storage: Storage, key: str) -> bool:
    """A finished φ is under ``phi/<key>`` (its top manifest is written last)."""
    m = storage.manifest("phi", key)
    return m is not None and "meta_metrics.json" in m["files"]


def publish_phi(storage: Storage, key: str, local: Path) -> None:
    """A finished meta-training's directory (``local``: phi/ and meta_metrics.json, heatmap.html) under
    ``phi/<key>`` in the storage: φ's files and their manifest first, the top manifest last."""
    local = Path(local)
    storage.put_dir(local / "phi", "phi", key, "phi", names=[f for f in PHI_FILES if (local / "phi" / f).is_file()])
    storage.put_dir(local, "phi", key, names=[f for f in PHI_EXTRAS if (local / f).is_file()])


def fetch_phi(storage: Storage, key: str, local: Path) -> Path:
    """φ published under ``phi/<key>`` into ``local`` (this node's φ cache directory): fetched and checked
    against its manifest, unless ``local`` holds that very copy already; safe when two trials on one node fetch it
    at once. Returns ``local / "phi"``."""
    from trainables.checkpoint import exclusive

    local = Path(local)
    top, inner = storage.manifest("phi", key), storage.manifest("phi", key, "phi")
    if top is None or inner is None:
        raise FileNotFoundError(f"{storage.join('phi', key)}: no finished φ there (the meta stage publishes it)")
    local.mkdir(parents=True, exist_ok=True)
    with exclusive(local / "phi"):
        if not local_copy_matches(local / "phi", inner):
            storage.get_dir(local / "phi", "phi", key, "phi")
        for name in top["files"]:
            if not local_copy_matches(local, {"files": {name: top["files"][name]}}):
                data = storage.read_bytes("phi", key, name)
                if data is not None:
                    write_bytes_atomic(local / name, data)
    return local / "phi"


class StorageCache:
    """The epoch-0 evaluations of a study (trainables.continual.initial_evaluation's cache) in its storage, for
    trials on any node: a JSON object each, written whole; the lock is this node's (trials started together on one
    node evaluate once; trials on two nodes may both evaluate the same θ and write the same numbers)."""

    def __init__(self, storage: Storage, *parts: str):
        self.storage, self.parts = storage, parts

    def lock(self, name: str):
        import hashlib

        from trainables.checkpoint import exclusive
        from trainables.models import cache_dir

        tag = hashlib.sha256(self.storage.join(*self.parts).encode()).hexdigest()[:16]
        return exclusive(cache_dir() / "locks" / "initial_eval" / f"{tag}-{name}")

    def read(self, name: str):
        return self.storage.read_json(*self.parts, name)

    def write(self, name: str, data: dict) -> None:
        self.storage.write_json(data, *self.parts, name)
