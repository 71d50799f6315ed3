"""The compiled-artifact cache: one graph file per bucket under a key, on local disk or S3.

Layout: ``{root}/{key}/manifest.json`` and ``{root}/{key}/{bucket}.{ext}``. The key is a sha256
over everything that changes a graph (``cache_key``); the manifest lists each file with its
sha256. Rules: a file is used only if the manifest lists it and its bytes hash to the listed
value — a missing, truncated or corrupted file is compiled again, never loaded; every write is
atomic (local: temp file + rename; S3: a single PUT, which is all-or-nothing, with its MD5
checked by S3), and the manifest is rewritten after each file it lists, so a crash mid-compile
loses at most the bucket in flight and never leaves a manifest naming a file that is not whole.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from neuronserve.core.buckets import Bucket

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_key(parts: dict) -> str:
    """The sha256 of ``parts`` as canonical JSON (sorted keys)."""
    return sha256(json.dumps(parts, sort_keys=True, default=str).encode())


def default_cache_dir() -> Path:
    from neuronserve.model.loader import cache_root

    return cache_root() / "artifacts"


class LocalStore:
    """Artifacts in a directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def read(self, path: str) -> bytes | None:
        try:
            return (self.root / path).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, path: str, data: bytes) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __str__(self) -> str:
        return str(self.root)


class S3Store:
    """Artifacts under ``s3://bucket/prefix`` through boto3 (credentials, region and
    ``AWS_ENDPOINT_URL`` from the usual boto3 sources)."""

    def __init__(self, url: str, client=None) -> None:
        if not url.startswith("s3://"):
            raise ValueError(f"artifact_cache: {url!r} is not an s3:// URL")
        self.bucket, _, prefix = url[len("s3://") :].partition("/")
        if not self.bucket:
            raise ValueError(f"artifact_cache: {url!r} names no bucket")
        self.prefix = prefix.strip("/")
        if client is None:
            import boto3

            client = boto3.client("s3")
        self.client = client

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def read(self, path: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def write(self, path: str, data: bytes) -> None:
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data, ContentMD5=md5)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def open_store(location: str | Path | None):
    """A store for a directory or an ``s3://`` URL (``None``: the default local directory)."""
    if location is None:
        return LocalStore(default_cache_dir())
    if str(location).startswith("s3://"):
        return S3Store(str(location))
    return LocalStore(location)


class ArtifactCache:
    """The artifacts of one key in a store."""

    def __init__(self, store, key: str, parts: dict | None = None) -> None:
        self.store, self.key, self.parts = store, key, parts or {}

    def manifest(self) -> dict:
        raw = self.store.read(f"{self.key}/{MANIFEST}")
        if raw is None:
            return {"key": self.key, "parts": self.parts, "files": {}}
        try:
            manifest = json.loads(raw)
            if manifest.get("key") != self.key or not isinstance(manifest.get("files"), dict):
                raise ValueError("not this key's manifest")
        except ValueError as exc:
            logger.warning(
                "artifact cache %s/%s: unreadable manifest (%s); ignoring it", self.store, self.key, exc
            )
            return {"key": self.key, "parts": self.parts, "files": {}}
        return manifest

    def load(self, name: str, manifest: dict) -> bytes | None:
        """The verified bytes of ``name``, or ``None`` (not listed, missing, or corrupted)."""
        entry = manifest["files"].get(name)
        if entry is None:
            return None
        data = self.store.read(f"{self.key}/{entry['file']}")
        if data is None:
            logger.warning(
                "artifact cache %s: %s is listed but missing; recompiling it", self.store, entry["file"]
            )
            return None
        if sha256(data) != entry["sha256"]:
            logger.warning(
                "artifact cache %s: %s fails its sha256; recompiling it", self.store, entry["file"]
            )
            return None
        return data

    def save(self, name: str, filename: str, data: bytes, manifest: dict) -> None:
        """Write one file, then the manifest that lists it (so the manifest never names a file
        that is not whole)."""
        self.store.write(f"{self.key}/{filename}", data)
        manifest["files"][name] = {"file": filename, "sha256": sha256(data), "bytes": len(data)}
        self.store.write(f"{self.key}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())


def load_or_compile(
    cache: ArtifactCache,
    buckets: Sequence[Bucket],
    compile_bucket: Callable[[Bucket], bytes],
    extension: str,
    progress: bool = True,
) -> tuple[dict[Bucket, bytes], list[Bucket]]:
    """Each bucket's artifact from the cache if it verifies, else compiled (and stored). Returns
    the artifacts and the buckets that were compiled."""
    from tqdm.auto import tqdm

    manifest = cache.manifest()
    artifacts: dict[Bucket, bytes] = {}
    compiled: list[Bucket] = []
    bar = tqdm(buckets, desc="graphs", unit="bucket", disable=not progress)
    for bucket in bar:
        data = cache.load(bucket.name, manifest)
        if data is None:
            bar.set_postfix_str(f"compiling {bucket.name}")
            data = compile_bucket(bucket)
            cache.save(bucket.name, f"{bucket.name}.{extension}", data, manifest)
            compiled.append(bucket)
        else:
            bar.set_postfix_str(f"cached {bucket.name}")
        artifacts[bucket] = data
    bar.close()
    return artifacts, compiled
