"""Artifact locations: the one rule for "local folder or URI", and file access through ``pyarrow.fs``.

A location is a string. It is a URI when it has a scheme (``s3://``, ``gs://``, ``hdfs://``...,
or the bare ``s3:``-style prefixes some tools print); ``file://`` and plain paths are local.
Local paths are expanded (``~``) and made absolute, exactly as before; URIs are kept verbatim
(a ``Path`` would turn ``s3://bucket/runs`` into ``s3:/bucket/runs``). Files are opened through
``pyarrow.fs``, the way Ray itself reads its storage, so whatever Ray can write here can be read.

S3 endpoint and credentials come from the environment (``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``),
as boto3 reads them. Ray Train gets the ``s3://`` URI itself as its ``storage_path`` (pyarrow 25
reads the same variables there; the worker forwards ``AWS_*`` to its Ray processes); here
``filesystem`` builds the S3 filesystem from them explicitly, so both agree.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# Schemes written without "//" by some tools; "s3:/bucket" is also what Path made of "s3://bucket".
_BARE_REMOTE_PREFIXES = ("s3:", "gs:", "gcs:", "abfs:", "hdfs:")


def is_uri(location: str) -> bool:
    """True for remote storage (``s3://bucket/runs``); False for a local path or ``file://``."""
    text = str(location).strip()
    if text.startswith("file://"):
        return False
    return "://" in text or text.startswith(_BARE_REMOTE_PREFIXES)


def normalize(location: str) -> str:
    """A URI verbatim (no trailing slash); a local path expanded and absolute."""
    text = str(location).strip()
    if is_uri(text):
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text.removeprefix("file://")))


def join(location: str, *parts: str) -> str:
    """``location/part/...`` with ``/`` for URIs and the OS rule for local paths."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(normalize(location), *parts)


def _s3_from_env(env: Mapping[str, str]) -> pafs.FileSystem:
    import pyarrow.fs as pafs

    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    kwargs: dict[str, object] = {}
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs["endpoint_override"] = rest if rest else endpoint
        kwargs["scheme"] = scheme if rest else "https"
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = env["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)  # type: ignore[arg-type]


def filesystem(location: str, env: Mapping[str, str] | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``location`` and the path inside it."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), normalize(location)
    text = str(location)
    if text.startswith("s3:"):
        path = text.split(":", 1)[1].lstrip("/")
        return _s3_from_env(os.environ if env is None else env), path.rstrip("/")
    return pafs.FileSystem.from_uri(text)


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str, data: bytes) -> None:
    fs, path = filesystem(location)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def list_files(location: str) -> Iterator[str]:
    """Relative paths (``/``-separated) of every file below ``location``, sorted."""
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File:
            yield info.path[len(root):].lstrip("/")


def copy_to_local(location: str, relative: str, out_dir: str) -> str:
    """Copy ``location/relative`` to ``out_dir/relative``; returns the local path written."""
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    target = os.path.join(out_dir, *relative.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    pafs.copy_files(f"{root}/{relative}", target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


__all__ = ["copy_to_local", "exists", "filesystem", "is_uri", "join", "list_files", "normalize", "parent",
           "read_bytes", "write_bytes"]


def parent(location: str) -> str:
    """The folder holding ``location`` (``s3://b/runs/J/epoch-0002`` -> ``s3://b/runs/J``)."""
    if is_uri(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(normalize(location))
