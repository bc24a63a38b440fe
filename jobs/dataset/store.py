"""Where a dataset lives: a local (or mounted) directory or an `s3://bucket/prefix`, behind one interface.

Every reader and writer of the format names files relative to the dataset root and asks its
`Store`; `open_store(root)` picks one by the root's form. What each guarantee rests on:

- A data file appears complete. Local: written to a temporary beside it, fsynced, renamed. s3:
  staged in a local file, then one PUT (small) or a multipart upload completed last and aborted
  on failure; either creates the name only where it is free (`If-None-Match: *`), and a failed
  attempt removes only what it put (`If-Match` on its ETag), so that the requests of an attempt
  that lost its lease, landing late, neither replace nor remove the next holder's files.
- The commit marker is written once. Local: `link()` of an fsynced temporary, which fails if the
  marker exists. s3: a PUT with `If-None-Match: *`, which the store refuses if the object exists
  (AWS S3, MinIO, moto); on a store without conditional writes, a check before the PUT.
- One writer at a time. Local: `flock` (released with its process). s3: a lease object created
  with `If-None-Match`, renewed with `If-Match` every LEASE_S / 4 seconds, taken over (by a
  conditional delete) once not renewed for LEASE_S seconds, or at once when its process is gone
  from this machine.
- Leftovers of a killed write. Local: `.<name>.<random>.tmp` files, removed by `cleanup`. s3:
  multipart uploads never completed (no reader sees them), aborted by `cleanup`.

Reads go through pyarrow's filesystems (seekable, ranged); writes to s3 through boto3, which has
the conditional requests and explicit multipart uploads (see `jobs.objectstore`).
"""

from __future__ import annotations

import email.utils
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.fs as pafs

from jobs.dataset.atomic import make_dirs, sync_dir, temp_path
from jobs.dataset.faults import fault
from jobs.dataset.layout import DATA_DIRS, TMP_SUFFIX, is_temporary
from jobs.objectstore import filesystem, is_object_url, s3_client, split_url

log = logging.getLogger(__name__)
LEASE_S = 60.0  # an s3 lock not renewed for this long is abandoned
SINGLE_PUT_MAX = 16 * 2**20  # bytes: larger objects go up as multipart uploads
PART_BYTES = 64 * 2**20  # bytes per part (S3 takes 5 MiB to 5 GiB, at most 10,000 parts)


class LockLost(OSError):
    """A lock was taken over while held (its holder stalled past a lease's length): the holder
    must stop writing under it."""


class Lost(threading.Event):
    """What `Store.lock` gives its holder: set once the lock is lost while held (its holder must
    stop writing under it); `taken` once another process holds it."""

    taken = False


class Store(ABC):
    """A dataset root; every name is a `/`-separated path relative to it."""

    url: str  # how the root is named to the user and to other processes (`open_store(url)` reopens it)
    checksummed: bool = False  # the storage checks every write's checksum and keeps what it stored

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The whole file. Raises FileNotFoundError if there is none."""

    @abstractmethod
    def open(self, rel: str) -> BinaryIO:
        """A seekable binary file for reading. Raises FileNotFoundError if there is none."""

    @abstractmethod
    def size(self, rel: str) -> int | None:
        """The file's size in bytes; None if there is no such file."""

    @abstractmethod
    def list(self, folder: str = "") -> list[str]:
        """Every file under `folder` (recursively, temporaries included), sorted, relative to the root."""

    @abstractmethod
    def write(self, rel: str, data: bytes) -> None:
        """Replaces the file with `data`, all or nothing (job.json, manifest.json, report.json)."""

    @abstractmethod
    def create(self, rel: str, data: bytes) -> bool:
        """Writes `data` only if there is no such file yet (the commit marker); False if there was."""

    @abstractmethod
    def delete(self, rel: str, version: str | None = None) -> bool:
        """Removes the file; True if there was one. With `version` (what `publish` returned), only
        that version of it: False if the name holds another one now (it is left as it is)."""

    @abstractmethod
    def staging(self, rel: str) -> Path:
        """A fresh local file to write the data of `rel` into before `publish`."""

    @abstractmethod
    def publish(self, staged: Path, rel: str) -> str | None:
        """Makes a staged file appear complete under `rel` (and consumes the staged file); returns
        the version it created where the store names versions (s3: the object's ETag), else None.

        Raises:
            FileExistsError: The store creates the name only where it is free (s3, so that a late
                write of an attempt that lost its lease never replaces another attempt's file), and
                it is taken. The staged file stays, for another try.
        """

    @abstractmethod
    def lock(self, rel: str, wait: bool = True) -> AbstractContextManager[Lost]:
        """Holds an exclusive lock named `rel` (one job per dataset, one committing attempt per shard).

        Gives a `Lost` event, set if the lock is lost while held (a lease on an object store taken
        over after its holder stalled past its length); a local lock is never lost.

        Raises:
            BlockingIOError: Another process holds it and `wait` is false.
        """

    @abstractmethod
    def lock_held(self, rel: str) -> bool:
        """Whether some process holds the lock `rel` now."""

    @abstractmethod
    def cleanup(self) -> int:
        """Removes what interrupted writes left (temporaries, unfinished uploads); how many."""

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def version(self, rel: str) -> str | None:
        """The version `rel` holds now, as `publish` names them (s3: its ETag); None if there is no
        such file, or the store names no versions."""
        return None

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.open(rel) as f:
            while chunk := f.read(8 * 2**20):
                digest.update(chunk)
        return digest.hexdigest()

    def read_range(self, rel: str, offset: int, size: int) -> bytes:
        with self.open(rel) as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.url}/{rel}: {size} bytes expected at offset {offset}, {len(data)} read")
        return data

    def __str__(self) -> str:
        return self.url


class LocalStore(Store):
    """A directory on a local or mounted filesystem (NFS, Lustre, a cloud disk)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.url = str(self.root)

    def _path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def read_bytes(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def open(self, rel: str) -> BinaryIO:
        return open(self._path(rel), "rb")

    def size(self, rel: str) -> int | None:
        path = self._path(rel)
        return path.stat().st_size if path.is_file() else None

    def list(self, folder: str = "") -> list[str]:
        base = self._path(folder)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def write(self, rel: str, data: bytes) -> None:
        tmp = self._write_temporary(rel, data)
        try:
            os.replace(tmp, self._path(rel))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        sync_dir(tmp.parent)

    def create(self, rel: str, data: bytes) -> bool:
        tmp = self._write_temporary(rel, data)
        try:
            os.link(tmp, self._path(rel))  # fails if the name exists: no second marker
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        sync_dir(tmp.parent)
        return True

    def _write_temporary(self, rel: str, data: bytes) -> Path:
        tmp = temp_path(self._path(rel))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not leave a half-written temporary behind
            raise
        return tmp

    def delete(self, rel: str, version: str | None = None) -> bool:
        path = self._path(rel)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        sync_dir(path.parent)
        return True

    def staging(self, rel: str) -> Path:
        return temp_path(self._path(rel))  # beside the final name: the rename stays on one filesystem

    def publish(self, staged: Path, rel: str) -> None:
        """Renames the staged file into place. (A local lock is held until its process dies, so no
        attempt writes on after losing it: no version is needed to tell attempts' files apart.)"""
        final = self._path(rel)
        os.replace(staged, final)
        sync_dir(final.parent)  # the name is on disk before a marker names it

    @contextmanager
    def lock(self, rel: str, wait: bool = True) -> Iterator[Lost]:
        with file_lock(self._path(rel), wait):
            yield Lost()  # held until released: never set

    def lock_held(self, rel: str) -> bool:
        try:
            fd = os.open(self._path(rel), os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def cleanup(self) -> int:
        removed = 0
        for sub in (*DATA_DIRS, ""):
            base = self._path(sub)
            pattern = f".*{TMP_SUFFIX}"
            for tmp in base.rglob(pattern) if sub else base.glob(pattern):
                if is_temporary(tmp) and tmp.is_file():
                    tmp.unlink(missing_ok=True)
                    removed += 1
        return removed


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """Holds the kernel's exclusive lock (`flock`) on `path`, created with its folder if needed; a
    killed holder's lock goes with its process.

    Raises:
        BlockingIOError: Another process holds it and `wait` is false.
    """
    make_dirs(path.parent)  # (the commit markers' folder: made durably before a marker is linked in it)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield


class S3Store(Store):
    """`s3://bucket/prefix`: objects under the prefix, on AWS S3 or an S3-compatible server.

    boto3 sends a checksum with every upload (CRC32 by default), which the server checks.

    Args:
        url: `s3://bucket/prefix`.
        part_bytes: Bytes per part of a multipart upload.
        single_put_max: Objects up to this size go up in one PUT; larger ones as multipart uploads.
    """

    def __init__(self, url: str, part_bytes: int = PART_BYTES, single_put_max: int = SINGLE_PUT_MAX) -> None:
        _, path = split_url(url.rstrip("/"))
        self.bucket, _, self.prefix = path.partition("/")
        self.url = f"s3://{path}"
        self.part_bytes = part_bytes
        self.single_put_max = single_put_max
        self.conditional = True  # cleared when the server refuses conditional writes (markers, leases)
        self.conditional_uploads = True  # the same, for data objects' PUTs and multipart completions
        self.checksummed = True

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}".strip("/") if self.prefix else rel

    def _path(self, rel: str) -> str:
        return f"{self.bucket}/{self._key(rel)}"

    def read_bytes(self, rel: str) -> bytes:
        with self.open(rel) as f:
            return f.read()

    def open(self, rel: str) -> BinaryIO:
        try:
            return filesystem(self.url).open_input_file(self._path(rel))  # type: ignore[return-value]
        except FileNotFoundError:
            raise
        except OSError as e:
            if "NoSuchKey" in str(e) or "does not exist" in str(e):
                raise FileNotFoundError(f"{self.url}/{rel}") from None
            raise

    def size(self, rel: str) -> int | None:
        info = filesystem(self.url).get_file_info(self._path(rel))
        return info.size if info.type == pafs.FileType.File else None

    def list(self, folder: str = "") -> list[str]:
        base = self._path(folder).rstrip("/")
        try:
            infos = filesystem(self.url).get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except FileNotFoundError:
            return []
        start = len(f"{self.bucket}/{self.prefix}".rstrip("/")) + 1
        return sorted(i.path[start:] for i in infos if i.type == pafs.FileType.File)

    def write(self, rel: str, data: bytes) -> None:
        s3_client().put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def create(self, rel: str, data: bytes) -> bool:
        """The marker goes through the quick client: sent after a lease check, it lands within
        `QUICK_S` or not at all."""
        client = s3_client(quick=True)
        return self._create_only(rel, lambda condition: client.put_object(**self._at(rel), Body=data, **condition))

    def _at(self, rel: str) -> dict[str, str]:
        return {"Bucket": self.bucket, "Key": self._key(rel)}

    def _create_only(
        self, rel: str, put: Callable[[dict[str, str]], dict[str, Any]], upload: bool = False
    ) -> str | None:
        """Runs `put(condition)`, a request that creates `rel`, so that it creates it only where there
        is none: with `If-None-Match: *` where the server takes it, else after a check (best effort).
        The new object's ETag; None if `rel` was there. A server that refuses the condition is
        remembered per kind of request: `upload` (a data object's PUT or multipart completion), or
        the marker's and the leases' (`conditional`)."""
        if self.conditional_uploads if upload else self.conditional:
            try:
                return put({"IfNoneMatch": "*"})["ETag"]
            except s3_client().exceptions.ClientError as e:
                code = _error_code(e)
                if code in _TAKEN:
                    return None
                if code not in _UNSUPPORTED:
                    raise
                if upload:  # a store without conditional writes: check, then put
                    self.conditional_uploads = False
                else:
                    self.conditional = False
        if self.exists(rel):
            return None
        return put({})["ETag"]

    def version(self, rel: str) -> str | None:
        client = s3_client()
        try:
            return client.head_object(**self._at(rel))["ETag"]
        except client.exceptions.ClientError as e:
            if _error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def delete(self, rel: str, version: str | None = None) -> bool:
        """With `version`, through the quick client (a lease's holder deletes only after a lease
        check) and with `If-Match` on it; where the server takes no condition, after a check."""
        if version is None:
            if not self.exists(rel):
                return False
            s3_client().delete_object(**self._at(rel))
            return True
        client = s3_client(quick=True)
        if self.conditional:
            try:
                client.delete_object(**self._at(rel), IfMatch=version)
                return True
            except client.exceptions.ClientError as e:
                if _error_code(e) in (*_TAKEN, "NoSuchKey", "404"):
                    return False  # another version is there now (or none): not ours to remove
                if _error_code(e) not in _UNSUPPORTED:
                    raise
        if self.version(rel) != version:  # (best effort: check, then delete)
            return False
        client.delete_object(**self._at(rel))
        return True

    def staging(self, rel: str) -> Path:
        """A file in this machine's staging folder, named by this process (`<pid>.<random>.tmp`);
        staged files of processes that died (a killed upload) are removed first."""
        folder = staging_folder()
        _sweep_staging(folder)
        fd, name = tempfile.mkstemp(prefix=f"{os.getpid()}.", suffix=TMP_SUFFIX, dir=folder)
        os.close(fd)
        return Path(name)

    def publish(self, staged: Path, rel: str) -> str:
        """One PUT for a small file; else a multipart upload whose completion (last) makes the object
        appear, and which is aborted if any part fails. A killed process leaves an unfinished upload,
        which no reader sees and `cleanup` aborts. Either creates `rel` only where it is free
        (`create`'s condition): an attempt whose lease was taken over while its request was on the
        way (a network partition, the client's retries) cannot replace the next holder's file."""
        client = s3_client()
        size = staged.stat().st_size
        if size <= self.single_put_max:
            with open(staged, "rb") as f:

                def put(condition: dict[str, str]) -> dict[str, Any]:
                    f.seek(0)  # (again after a refused condition)
                    return client.put_object(**self._at(rel), Body=f, **condition)

                try:
                    etag = self._create_only(rel, put, upload=True)
                except BaseException:
                    staged.unlink(missing_ok=True)
                    raise
        else:
            etag = self._upload_parts(staged, rel)
        if etag is None:
            raise FileExistsError(f"{self.url}/{rel}: exists (the staged file stays, {staged})")
        staged.unlink(missing_ok=True)
        return etag

    def _upload_parts(self, staged: Path, rel: str) -> str | None:
        client, at = s3_client(), self._at(rel)
        upload = client.create_multipart_upload(**at)["UploadId"]
        try:
            parts = []
            with open(staged, "rb") as f:
                while chunk := f.read(self.part_bytes):
                    number = len(parts) + 1
                    etag = client.upload_part(**at, UploadId=upload, PartNumber=number, Body=chunk)["ETag"]
                    parts.append({"PartNumber": number, "ETag": etag})
                    fault("mid-upload")
            done = self._create_only(
                rel,
                lambda condition: client.complete_multipart_upload(
                    **at, UploadId=upload, MultipartUpload={"Parts": parts}, **condition
                ),
                upload=True,
            )
        except BaseException:
            client.abort_multipart_upload(**at, UploadId=upload)
            staged.unlink(missing_ok=True)
            raise
        if done is None:
            try:
                client.abort_multipart_upload(**at, UploadId=upload)
            except client.exceptions.ClientError:
                pass  # (a completion that went through, its answer lost, and refused when retried: no upload left)
        return done

    def lock(self, rel: str, wait: bool = True) -> AbstractContextManager[Lost]:
        return _Lease(self, self._key(rel), wait)

    def lock_held(self, rel: str) -> bool:
        state = _lease_state(self.bucket, self._key(rel))
        return state is not None and not state["abandoned"]

    def cleanup(self) -> int:
        """Aborts every unfinished multipart upload under the prefix (the job holds the dataset's
        lock when it calls this, so they are all of attempts that died)."""
        client, aborted = s3_client(), 0
        prefix = f"{self.prefix}/" if self.prefix else ""
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted


def staging_folder() -> Path:
    """Where data bound for an object store is staged on this machine (`$TMPDIR/latent-precompute`)."""
    folder = Path(tempfile.gettempdir()) / "latent-precompute"
    folder.mkdir(exist_ok=True)
    return folder


def _sweep_staging(folder: Path) -> None:
    for path in folder.glob(f"*{TMP_SUFFIX}"):
        pid = path.name.split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _error_code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


# This process as a lease owner: host, boot and pid namespace make a pid comparable.
def _process_identity() -> dict[str, Any]:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, namespace = "", 0
    return {"host": socket.gethostname(), "boot": boot, "pidns": namespace, "pid": os.getpid()}


def _owner_gone(owner: dict[str, Any]) -> bool:
    """Whether the lease's owner is a process of this machine (and pid namespace) that has exited."""
    me = _process_identity()
    if any(owner.get(k) != me[k] for k in ("host", "boot", "pidns")) or not me["boot"]:
        return False
    try:
        return not _pid_alive(int(owner["pid"]))
    except (KeyError, TypeError, ValueError):
        return False


def _lease_state(bucket: str, key: str) -> dict[str, Any] | None:
    """The lease object's ETag, owner and whether it is abandoned; None if there is none."""
    client = s3_client()
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except client.exceptions.ClientError as e:
        if _error_code(e) in ("NoSuchKey", "404"):
            return None
        raise
    body = response["Body"].read()
    try:
        owner = json.loads(body)
    except ValueError:
        owner = {}
    # Both times are the server's: no clock of ours is compared with another machine's.
    now = email.utils.parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
    age = (now - response["LastModified"]).total_seconds()
    return {"etag": response["ETag"], "owner": owner, "abandoned": age > LEASE_S or _owner_gone(owner)}


_TAKEN = ("PreconditionFailed", "ConditionalRequestConflict")  # a conditional write that lost
_UNSUPPORTED = ("NotImplemented", "InvalidArgument")  # a store without conditional headers


class _Held(Lost):
    """Set once a lease is lost (`taken`: another process holds it, or it is gone); and, for good,
    once it has gone unrenewed for most of its length (`LEASE_S`), even while a renewal still waits
    in its retries (a network down, a partition): another process may take it over then. Its
    holder stops writing under it; the renewals go on (the lease is kept while it is still ours)."""

    def __init__(self) -> None:
        super().__init__()
        self.renewed = time.monotonic()

    def is_set(self) -> bool:
        if not super().is_set() and time.monotonic() - self.renewed > LEASE_S * 3 / 4:
            self.set()
        return super().is_set()


class _Lease(AbstractContextManager[Lost]):
    """An exclusive lock on an object store: a lease object created only if absent, renewed by a
    thread while held, deleted on release; one left by a dead or silent holder is taken over.

    On a store without conditional writes (`store.conditional` false) every step is a check, then
    a plain write, then (for the claim) a read-back of whose lease is there: best effort, since two
    processes that both check before either writes can both take it."""

    def __init__(self, store: S3Store, key: str, wait: bool) -> None:
        self.store, self.bucket, self.key, self.wait = store, store.bucket, key, wait
        self.owner = {**_process_identity(), "lease": uuid.uuid4().hex}
        self.beats = 0
        self.etag = ""
        self.lost = _Held()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> Lost:
        while True:
            sent = time.monotonic()  # a lease counts from when its request left (dated on arrival), not its answer
            if self._claim():
                break
            state = _lease_state(self.bucket, self.key)
            if state is None:
                continue  # released meanwhile
            if state["abandoned"]:
                self._delete(state["etag"])  # only the lease we judged: one renewed meanwhile stays
                continue
            if not self.wait:
                raise BlockingIOError(f"s3://{self.bucket}/{self.key} is held by {state['owner']}")
            time.sleep(0.5)
        self.lost.renewed = sent
        self._renewer = threading.Thread(target=self._renew, name=f"lease {self.key}", daemon=True)
        self._renewer.start()
        return self.lost

    def _claim(self) -> bool:
        """Creates the lease object if there is none; whether this process holds it now."""
        client = s3_client()
        if self.store.conditional:
            try:
                self.etag = client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfNoneMatch="*")[
                    "ETag"
                ]
                return True
            except client.exceptions.ClientError as e:
                if _error_code(e) in _TAKEN:
                    return False
                if _error_code(e) not in _UNSUPPORTED:
                    raise
                self.store.conditional = False
        if _lease_state(self.bucket, self.key) is not None:
            return False
        self.etag = client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body())["ETag"]
        return self._ours()

    def _ours(self) -> bool:
        state = _lease_state(self.bucket, self.key)
        return state is not None and state["owner"].get("lease") == self.owner["lease"]

    def _delete(self, etag: str) -> None:
        client = s3_client()
        if not self.store.conditional:
            client.delete_object(Bucket=self.bucket, Key=self.key)
            return
        try:
            client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except client.exceptions.ClientError as e:
            if _error_code(e) not in (*_TAKEN, "NoSuchKey", "404"):
                raise

    def _body(self) -> bytes:
        """The lease's content; every renewal differs (so its ETag does, and a conditional delete
        by a process that judged an older one fails)."""
        self.beats += 1
        return json.dumps({**self.owner, "beat": self.beats}).encode()

    def _renew(self) -> None:
        client = s3_client()
        while not self._stop.wait(LEASE_S / 4):
            sent = time.monotonic()  # (see `__enter__`)
            try:
                if self.store.conditional:
                    self.etag = client.put_object(
                        Bucket=self.bucket, Key=self.key, Body=self._body(), IfMatch=self.etag
                    )["ETag"]
                elif self._ours():
                    self.etag = client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body())["ETag"]
                else:
                    self._taken()  # another process's lease is there now
                    return
                self.lost.renewed = sent
            except client.exceptions.ClientError as e:
                if _error_code(e) in (*_TAKEN, "NoSuchKey", "404"):
                    self._taken()  # taken over (this process stalled past LEASE_S): stop claiming it
                    return
                # (a server error or throttling, past the client's own retries: again at the next
                # beat, until the lease has gone unrenewed too long, `_Held`)
            except Exception:  # a network error: the same
                continue

    def _taken(self) -> None:
        self.lost.taken = True
        self.lost.set()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.lost.taken:
            return
        try:
            if self.store.conditional:
                self._delete(self.etag)  # no longer ours if it fails
            elif self._ours():
                self._delete(self.etag)
        except Exception as e:  # (not in place of what the holder raised): it runs out instead
            log.warning("could not release s3://%s/%s (%s); it runs out in %g s", self.bucket, self.key, e, LEASE_S)


def open_store(root: str | Path | Store) -> Store:
    """The store of a dataset root: a `Store` as it is, `s3://bucket/prefix`, or a local path.

    Raises:
        ValueError: A URL of a scheme the dataset cannot be kept in (gs://, http://, ...).
    """
    if isinstance(root, Store):
        return root
    text = str(root)
    if text.startswith("s3://"):
        return S3Store(text)
    if is_object_url(text) or "://" in text:
        raise ValueError(
            f"cannot keep a dataset at '{text}': the output is a local or mounted directory or an s3:// prefix "
            "(gs:// and other schemes can be read as inputs, not written)"
        )
    return LocalStore(text)
