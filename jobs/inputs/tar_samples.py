"""Read the samples of one input shard as a chain of small stages, and split each sample.

    open_stream -> tar_members -> group_samples        (read_shard chains them)

Each stage takes its error policy explicitly, and the policy follows from what failed:

- the shard itself cannot be read (it cannot be opened, or its stream fails: a `pipe:` command
  that exits with an error, a dropped connection, a vanished file): `ShardReadError`. The
  attempt fails, nothing of it may be committed, and the driver retries it;
- the tar is readable but damaged (a truncated tail, a bad header, a cut at a member boundary
  that leaves no end-of-archive blocks): `on_damage(reason)`, the reason naming the byte offset,
  and the samples read before the damage are kept;
- a member or sample is unusable (no sample key in its name, a duplicate member, over the size
  limit, not a regular file): the sample carries a `problem` and becomes an error row.

Every regular member of the tar ends up in exactly one sample, ok or not. Keys are made valid
UTF-8 (an undecodable byte of a member name becomes `\\xNN`), so no later stage can fail on them.
"""

from __future__ import annotations

import bz2
import gzip
import http.client
import json
import lzma
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from jobs.inputs.shards import key_and_suffix, storage_for
from vae.errors import describe_error

_COMPRESSED = ((b"\x1f\x8b", gzip.GzipFile), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))
_BLOCK = tarfile.BLOCKSIZE


class ShardReadError(OSError):
    """The shard itself could not be read; its attempt fails and is retried."""


@dataclass
class Member:
    name: str  # valid UTF-8
    data: bytes | None  # None when `problem` is set
    problem: str | None = None


@dataclass
class RawSample:
    key: str
    index: int  # position among the shard's samples
    files: dict[str, bytes]  # lower-cased suffix -> member bytes
    problem: str | None = None  # why the sample cannot be used, found while reading it


def safe_name(name: str) -> str:
    """A member name as valid UTF-8: bytes tarfile could not decode (surrogate escapes) become `\\xNN`."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def open_stream(source: str, opener: Callable[[str], BinaryIO]) -> BinaryIO:
    """The first stage: the shard's bytes. Raises ShardReadError if it cannot be opened."""
    try:
        return opener(source)
    except Exception as e:
        raise ShardReadError(f"cannot open {source}: {describe_error(e)}") from e


class _Raw:
    """The shard's bytes as they arrive: an OSError here is the shard failing to stream."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.position = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.stream.read(n)
        except (OSError, http.client.HTTPException) as e:  # a failing command, a dropped connection, ...
            raise ShardReadError(f"reading failed at byte {self.position}: {describe_error(e)}") from e
        self.position += len(data)
        return data


class _Counting:
    """The tar's bytes: counted, with the last ones kept (to find the end-of-archive blocks)."""

    def __init__(self, stream: Any, keep: int = 1 << 16) -> None:
        self.stream = stream
        self.position = 0
        self.tail = b""
        self.keep = keep

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.position += len(data)
        self.tail = (self.tail + data[-self.keep :])[-self.keep :]  # no copy of a whole member
        return data

    def block_at(self, offset: int) -> bytes | None:
        """The 512 bytes at `offset` (reading up to them if needed); None where the stream ends first."""
        while self.position < offset + _BLOCK and self.read(offset + _BLOCK - self.position):
            pass
        start = offset - (self.position - len(self.tail))
        if start < 0 or offset + _BLOCK > self.position:
            return None
        return self.tail[start : start + _BLOCK]


class _Prefixed:
    """A stream whose first bytes were already read."""

    def __init__(self, head: bytes, stream: _Raw) -> None:
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data + (self.stream.read(n - len(data)) if len(data) < n else b"")


def _decompressed(raw: _Raw) -> Any:
    """The stream, decompressed if its first bytes say gzip, bzip2 or xz (as tarfile's `r|*` would)."""
    head = raw.read(6)
    rest = _Prefixed(head, raw)
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            return opener(fileobj=rest)  # type: ignore[operator]
    return rest


# What damage in the tar (or in its compression) raises, as opposed to the stream failing.
_DAMAGE = (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error)


def tar_members(
    stream: BinaryIO, on_damage: Callable[[str], None], max_member_bytes: int | None = None
) -> Iterator[Member]:
    """The second stage: the tar's members in order; the stream is read to its end and closed.

    Raises:
        ShardReadError: The stream broke, or closing it reported a failure (a `pipe:` command's
            exit status).
    """
    raw = _Raw(stream)
    finished = False
    try:
        tar_bytes = _Counting(_decompressed(raw))
        try:
            end = yield from _members(tar_bytes, on_damage, max_member_bytes)
            if end is not None and tar_bytes.block_at(end) != bytes(_BLOCK):
                on_damage(
                    f"tar cut short: no end-of-archive blocks at byte {end}, after the last member read; "
                    f"it ends at byte {tar_bytes.position}, and whatever members followed are missing"
                )
        except ShardReadError:
            raise
        except _DAMAGE as e:  # damage in the compressed layer, or reading past the last member
            on_damage(f"tar read error at byte {tar_bytes.position}: {describe_error(e)}")
        while raw.read(1 << 20):  # the rest, so that a pipe's command runs to its end and reports
            pass
        finished = True
    finally:
        try:
            stream.close()
        except Exception as e:  # e.g. webdataset's Pipe: "... exit 1 (read)"
            if finished:  # (a consumer that stopped early closes the stream on purpose)
                raise ShardReadError(f"reading the shard failed: {describe_error(e)}") from e


def _members(tar_bytes: _Counting, on_damage: Callable[[str], None], limit: int | None) -> Iterator[Member]:
    """Yields the members; returns where the archive continues after the last one (None after damage)."""
    try:
        tar = tarfile.open(fileobj=tar_bytes, mode="r|")  # type: ignore[call-overload]
    except ShardReadError:
        raise
    except _DAMAGE as e:
        on_damage("the shard is empty (0 bytes)" if tar_bytes.position == 0 else f"not a tar file: {describe_error(e)}")
        return None
    end = at = 0  # where the archive continues after the last member; what is being read
    try:
        for info in tar:
            name, at = safe_name(info.name), info.offset
            end = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
            if info.isdir():
                continue
            if not info.isreg():
                yield Member(name, None, "not a regular file (a link or a device)")
            elif limit is not None and info.size > limit:
                yield Member(name, None, f"member of {info.size} bytes is over the limit of {limit}")
            else:
                file = tar.extractfile(info)
                assert file is not None
                yield Member(name, file.read())
            tar.members = []  # a streamed tar keeps no index
            at = end
    except ShardReadError:
        raise
    except _DAMAGE as e:
        on_damage(f"tar read error at byte {at}: {describe_error(e)}")
        return None
    return end


def group_samples(members: Iterator[Member], max_sample_bytes: int | None = None) -> Iterator[RawSample]:
    """The third stage: consecutive members of one key form a sample (webdataset's rule).

    A member whose name has no key (no dot, or a name starting with a dot) is a sample of its
    own, with a problem. A member that cannot be used (over the size limit, not a regular file),
    a second member with the same suffix (which of the two is meant?), or members that together
    are over `max_sample_bytes` (their bytes are dropped as they come) make the sample unusable.
    """
    current: RawSample | None = None
    held = 0  # bytes of the current sample's members
    index = 0
    for member in members:
        split = key_and_suffix(member.name)
        if split is None:
            if current is not None:
                yield current
                current = None
            problem = f"{member.name}: member name has no sample key (webdataset keys are the name up to a dot)"
            yield RawSample(member.name, index, {}, problem)
            index += 1
            continue
        key, suffix = split[0], split[1].lower()
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = RawSample(key, index, {})
            held = 0
            index += 1
        held += len(member.data or b"")
        if max_sample_bytes is not None and held > max_sample_bytes:
            current.files.clear()
            current.problem = (
                current.problem or f"the sample's members hold over {max_sample_bytes} bytes (limits.max_member_bytes)"
            )
        elif member.problem is not None:
            current.problem = current.problem or f"{member.name}: {member.problem}"
        elif suffix in current.files:
            current.problem = current.problem or f"duplicate member {member.name} (two .{suffix} in one sample)"
        else:
            assert member.data is not None
            current.files[suffix] = member.data
    if current is not None:
        yield current


def read_shard(
    source: str,
    on_damage: Callable[[str], None],
    max_member_bytes: int | None = None,
    allow_shell: bool = False,
) -> Iterator[RawSample]:
    """Yields the samples of one shard, in order.

    Args:
        source: Path or URL of the tar (opened by the storage of its form, `jobs.inputs.shards`).
        on_damage: Called with the reason of each damage found inside the tar; reading stops there.
        max_member_bytes: Members larger than this are not read, and a sample's members may not
            hold more together (their sample has a problem).
        allow_shell: Whether a `pipe:` source may run its command (the user's opt-in).

    Raises:
        ShellRefused: A `pipe:` source without `allow_shell` (before anything runs).
        ShardReadError: The shard could not be opened or streamed to its end.
    """
    stream = open_stream(source, storage_for(source, allow_shell).open)
    yield from group_samples(tar_members(stream, on_damage, max_member_bytes), max_member_bytes)


@dataclass
class SampleParts:
    video: bytes | None
    caption: str | None
    meta: str | None  # the `.json` member as text, if any
    problem: str | None = None  # why the sample cannot be encoded (its error row's reason)


CAPTION_MEMBERS = ("txt", "caption")  # members whose text is the caption, in order of preference


def split_sample(sample: RawSample, video_extensions: list[str]) -> SampleParts:
    """Finds a sample's video, caption (`.txt` or `.caption`, else the JSON's `caption`/`text`) and metadata.

    Never raises: a sample without a video member, with invalid JSON (or JSON Python refuses:
    nested too deep, an integer of thousands of digits), or with a reading problem comes back
    with `problem` set, and with whatever caption and metadata it does have, for its error row.
    """
    problem = sample.problem
    meta_text, meta = None, None
    if "json" in sample.files:
        meta_text = _text(sample.files["json"])
        try:
            meta = json.loads(meta_text)
        except (ValueError, RecursionError) as e:
            problem = problem or f"invalid .json member: {describe_error(e)}"
    caption = None
    text_member = next((ext for ext in CAPTION_MEMBERS if ext in sample.files), None)
    if text_member is not None:
        caption = _text(sample.files[text_member]).strip()
    elif isinstance(meta, dict):
        caption = _caption_from(meta)
    video = next((sample.files[ext] for ext in video_extensions if ext in sample.files), None)
    if video is None and problem is None:
        found = ", ".join(sorted(sample.files)) or "nothing"
        problem = f"no video member (looked for {', '.join(video_extensions)}; found {found})"
    return SampleParts(video=video, caption=caption, meta=meta_text, problem=problem)


def _text(data: bytes) -> str:
    """Member bytes as text; invalid UTF-8 is replaced (U+FFFD)."""
    return data.decode("utf-8", errors="replace")


def _caption_from(meta: dict[str, Any]) -> str | None:
    for key in ("caption", "text"):
        value = meta.get(key)
        if isinstance(value, str):
            return value.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate: `\ud800`
    return None
