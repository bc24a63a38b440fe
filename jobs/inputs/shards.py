"""Input shards: what a SPEC names, behind a small storage interface, and each shard's output name.

A SPEC is a tar path, a directory (every `*.tar` file below it), a glob (`data/*/part-*.tar`), a
brace pattern (`data/shard-{000000..000099}.tar`), any of these as a `file://` URL, an
`http(s)://` URL (brace patterns too), or,
only when the user opts in (`allow_shell`, `--allow-shell` on the command line), a `pipe:`
command whose output is the tar (`pipe:aws s3 cp s3://bucket/shard-000001.tar -`). Nothing else
runs a program: a source named by data (a Parquet row's `source`) goes through the same policy.
Each shard's output name is its path relative to the fixed part of its SPEC (the directory
before the first pattern character), so the name is stable across reruns and `a/x.tar` and
`b/x.tar` never collide.

A `Storage` lists the shards of a SPEC and opens them for reading; `storage_for(spec)` picks
one by the SPEC's form. `s3://bucket/prefix/...` and `gs://...` (paths, globs, brace patterns, a
prefix: every `*.tar` under it) go through pyarrow's filesystems: credentials, region and
profiles are the AWS SDK's own (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`,
`AWS_REGION`), and `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` names an S3-compatible server
(MinIO, moto, Ceph); see `jobs.objectstore`.
"""

from __future__ import annotations

import glob
import http.client
import os
import posixpath
import re
import tarfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import pyarrow.fs as pafs
from braceexpand import braceexpand
from webdataset.gopen import gopen

from jobs.objectstore import filesystem, is_object_url, split_url

_PATTERN_CHARS = re.compile(r"[*?\[{]")
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|pipe:)", re.IGNORECASE)


@dataclass(frozen=True)
class Shard:
    source: str  # what the storage opens: a local path or a URL
    name: str  # output name without suffix, e.g. "shard-000001" or "clips/part-3"

    @property
    def is_local(self) -> bool:
        return not _URL.match(self.source)


class Storage(Protocol):
    """Where input shards live: listing a SPEC, and opening one shard as a byte stream."""

    def list(self, spec: str) -> list[Shard]:
        """The shards a SPEC names, in order.

        Raises:
            ValueError: The SPEC matches nothing, or names a missing file.
        """
        ...

    def open(self, source: str) -> BinaryIO:
        """A readable stream of one shard's bytes."""
        ...


class LocalStorage:
    """Files on a local (or mounted) filesystem: paths, directories, globs and brace patterns."""

    def list(self, spec: str) -> list[Shard]:
        spec = local_path(spec)
        root = _fixed_root(spec)
        if os.path.isdir(spec):  # files only: a folder named `x.tar` is a folder
            paths = sorted(p for p in glob.glob(os.path.join(spec, "**", "*.tar"), recursive=True) if os.path.isfile(p))
            if not paths:
                raise ValueError(f"no .tar files under directory {spec}")
            root = spec
        else:
            paths = []
            for item in braceexpand(spec):
                if _PATTERN_CHARS.search(item):
                    matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
                    if not matches:
                        raise ValueError(f"input pattern {item} matches no file")
                    paths.extend(matches)
                elif os.path.isfile(item):
                    paths.append(item)
                else:
                    raise ValueError(f"input shard not found: {item}")
        return [Shard(os.path.abspath(p), _local_name(p, root)) for p in paths]

    def open(self, source: str) -> BinaryIO:
        return open(local_path(source), "rb")


def local_path(spec: str) -> str:
    """A local SPEC or source as a path: `file:///data/x.tar` (or `file://localhost/...`, its
    characters %-escaped) is `/data/x.tar`; a path is itself.

    Raises:
        ValueError: A `file://` URL of another host.
    """
    if not spec.lower().startswith("file://"):
        return spec
    # (not urlsplit: a `?` or `#` of a glob or a file name is part of the path here)
    host, slash, path = spec[len("file://") :].partition("/")
    if host not in ("", "localhost"):
        raise ValueError(f"cannot read '{spec}': a file:// URL of another host ({host})")
    return urllib.parse.unquote(slash + path)


class HttpStorage:
    """`http(s)://` URLs, read with Python's own client (no shell): brace patterns, no listing."""

    def list(self, spec: str) -> list[Shard]:
        return _url_shards(spec)

    def open(self, source: str) -> BinaryIO:
        return _HttpBody(urllib.request.urlopen(source, timeout=60))  # type: ignore[return-value]


class _HttpBody:
    """A response body that fails on a connection closed early (Python's client just returns b"")."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response
        self.expected = response.length  # None without a Content-Length (chunked: the client checks)

    def read(self, n: int = -1) -> bytes:
        data = self.response.read(None if n < 0 else n)
        if not data and n != 0 and self.response.length:
            raise ConnectionError(
                f"the connection closed with {self.response.length} of {self.expected} bytes not received"
            )
        return data

    def close(self) -> None:
        self.response.close()


class ShellStorage:
    """`pipe:COMMAND`: a shell runs COMMAND and its output is the tar (webdataset's `gopen`)."""

    def list(self, spec: str) -> list[Shard]:
        return _url_shards(spec)

    def open(self, source: str) -> BinaryIO:
        return gopen(source)


class ObjectStorage:
    """`s3://bucket/key` and `gs://bucket/key` objects through pyarrow's filesystems (no shell, no
    boto3 needed; `jobs.objectstore` says which settings they read)."""

    def list(self, spec: str) -> list[Shard]:
        fs = filesystem(spec)
        scheme, path = split_url(spec)
        root = _fixed_root(path)
        if not _PATTERN_CHARS.search(path) and not path.endswith((".tar", ".tar.gz", ".tgz")):
            root = path.rstrip("/")  # a prefix: every .tar under it
            keys = [k for k in _object_keys(fs, spec, root) if k.endswith(".tar")]
            if not keys:
                raise ValueError(f"no .tar objects under {spec}")
        else:
            items = list(braceexpand(path))
            exist = _existing(fs, spec, [item for item in items if not _PATTERN_CHARS.search(item)])
            keys = []
            for item in items:
                if _PATTERN_CHARS.search(item):
                    pattern = _glob_regex(item)
                    matches = [k for k in _object_keys(fs, spec, _fixed_root(item)) if pattern.match(k)]
                    if not matches:
                        raise ValueError(f"input pattern {scheme}://{item} matches no object")
                    keys += matches
                elif item in exist:
                    keys.append(item)
                else:
                    raise ValueError(f"input shard not found: {scheme}://{item}")
        return [Shard(f"{scheme}://{k}", _strip_tar(k[len(root) + 1 :] if root else k)) for k in keys]

    def open(self, source: str) -> BinaryIO:
        return filesystem(source).open_input_stream(split_url(source)[1])  # type: ignore[return-value]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as local paths read it: `*` and `?` stay within one path part, `**` crosses parts."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith("^"):
                body = "\\" + body
            out.append(f"[{body}]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


LIST_OVER = 16  # more named objects than this are found by listing their folder, not one request each


def _existing(fs: pafs.FileSystem, spec: str, paths: list[str]) -> set[str]:
    """Which of `paths` (`bucket/key`) are objects: a request each for a few; for more (a brace
    pattern of 10,000 shards), one listing of the folder they share (a request per 1,000 keys)."""
    if len(paths) <= LIST_OVER:
        return {p for p in paths if fs.get_file_info(p).type == pafs.FileType.File}
    folder = posixpath.commonpath([posixpath.dirname(p) for p in paths])
    return set(_object_keys(fs, spec, folder)) & set(paths)


def _object_keys(fs: pafs.FileSystem, spec: str, prefix: str) -> list[str]:
    """Every object under `bucket/prefix`, sorted (`bucket/key` paths)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    except (OSError, FileNotFoundError) as e:
        raise ValueError(f"cannot list {spec.partition('://')[0]}://{prefix}: {e}") from None
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


class ShellRefused(ValueError):
    """A `pipe:` source without the user's opt-in."""


def storage_for(spec: str, allow_shell: bool = False) -> Storage:
    """The storage that lists and opens a SPEC or a shard's source.

    Raises:
        ShellRefused: A `pipe:` command, unless `allow_shell`.
        ValueError: A URL scheme that cannot be read.
    """
    if spec.startswith("pipe:"):
        if not allow_shell:
            raise ShellRefused(
                f"'{spec}' is a shell command (pipe:), which runs only when you allow it: pass --allow-shell"
            )
        return ShellStorage()
    match = _URL.match(spec)
    if match is None or spec.lower().startswith("file://"):
        return LocalStorage()
    if spec.lower().startswith(("http://", "https://")):
        return HttpStorage()
    if is_object_url(spec):
        return ObjectStorage()
    raise ValueError(
        f"cannot read '{spec}': the inputs are local paths, s3://, gs:// or http(s):// URLs, or pipe: commands "
        "(with --allow-shell)"
    )


def list_shards(specs: list[str], allow_shell: bool = False) -> list[Shard]:
    """Expands SPECs into shards, in order, without duplicates.

    Raises:
        ShellRefused: A `pipe:` SPEC, unless `allow_shell`.
        ValueError: A SPEC matches nothing, a listed file is missing, or two shards would
            get the same output name.
    """
    shards: dict[str, Shard] = {}
    for spec in specs:
        for shard in storage_for(spec, allow_shell).list(spec):
            shards.setdefault(shard.source, shard)
    by_name: dict[str, str] = {}
    for shard in shards.values():
        other = by_name.setdefault(shard.name, shard.source)
        if other != shard.source:
            raise ValueError(f"input shards {other} and {shard.source} would both be written as '{shard.name}'")
    # An output file (`<name>.tar`, `.parquet`, `.json`) must not be the folder of another's name.
    folders = {name.rsplit("/", i)[0]: name for name in by_name for i in range(1, name.count("/") + 1)}
    for name, source in by_name.items():
        for suffix in (".tar", ".parquet", ".json"):
            if name + suffix in folders:
                clash = by_name[folders[name + suffix]]
                raise ValueError(
                    f"input shards {source} and {clash} cannot both be written: the output of the first, "
                    f"'{name}{suffix}', is a folder of the second's"
                )
    return list(shards.values())


def _fixed_root(spec: str) -> str:
    """The directory part of SPEC before its first pattern character."""
    match = _PATTERN_CHARS.search(spec)
    head = spec[: match.start()] if match else spec
    return os.path.dirname(head)


def _local_name(path: str, root: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root or "."))
    if rel.startswith(".."):
        rel = os.path.basename(path)
    return _strip_tar(rel.replace(os.sep, "/"))


def _url_shards(spec: str) -> list[Shard]:
    """The URLs of a brace pattern (a URL cannot be listed), each with its output name."""
    return [Shard(url, _url_name(url)) for url in braceexpand(spec)]


def _url_name(url: str) -> str:
    # `pipe:aws s3 cp s3://b/x/shard-1.tar -` -> "shard-1"; `https://h/x/shard-1.tar` -> "shard-1"
    candidates = [w for w in url.split() if ".tar" in w] or [url]
    return _strip_tar(candidates[-1].rstrip("/").rsplit("/", 1)[-1].split("?")[0])


def _strip_tar(name: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# webdataset's grouping: the key is the path up to the first dot of the basename, the rest the
# suffix; a basename that starts with a dot, or has none, gives no key.
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^./][^./]*)[.]([^/]*)$")


def key_and_suffix(member_name: str) -> tuple[str, str] | None:
    """A tar member's sample key and suffix (suffix as written), or None if its name gives no key."""
    match = _KEY_AND_SUFFIX.match(member_name)
    return None if match is None else (match.group(1), match.group(2))


def sample_key(member_name: str) -> str | None:
    """webdataset's grouping key of a tar member: the path up to the first dot of its basename."""
    split = key_and_suffix(member_name)
    return None if split is None else split[0]


def count_samples(path: str | Path) -> int:
    """Number of distinct sample keys in a local tar, read from its headers only (for progress)."""
    keys: set[str] = set()
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isreg() and (key := sample_key(member.name)) is not None:
                    keys.add(key)
    except (tarfile.TarError, OSError, EOFError):
        pass  # a damaged shard: count what is readable; the encoder reports the damage
    return len(keys)
