"""Connections to object stores, shared by the input side and the dataset format (a leaf: it imports
nothing of the project).

Reading (input shards, and every reader of an output on s3://) goes through pyarrow's filesystems:
its C++ client does ranged, seekable reads and needs nothing beyond pyarrow. Writing an output
goes through boto3, because the commit protocol needs what pyarrow's filesystem API does not
offer: conditional writes (`If-None-Match: *` to create, `If-Match` to renew or delete a lease),
multipart uploads that are completed or aborted explicitly (pyarrow's output stream completes its
upload when it is closed or garbage-collected, which would publish a half-written object), and the
listing of abandoned uploads.

Both read the standard AWS settings: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_REGION`, and `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`
(or a profile's `endpoint_url`, resolved by boto3 for both) for an S3-compatible server (MinIO,
Ceph, moto). `gs://` is read through pyarrow's GCS filesystem
(Google's default credentials; `STORAGE_EMULATOR_HOST` names an emulator).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import pyarrow.fs as pafs

SCHEMES = ("s3://", "gs://")


def is_object_url(url: str) -> bool:
    """Whether `url` names an object store that pyarrow can read (`s3://`, `gs://`)."""
    return url.startswith(SCHEMES)


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("s3", "bucket/a/b"), the path as pyarrow's filesystems name it.

    Raises:
        ValueError: A URL without a bucket.
    """
    scheme, _, path = url.partition("://")
    if not path or path.startswith("/"):
        raise ValueError(f"'{url}' names no bucket ({scheme}://bucket/key)")
    return scheme, path


def endpoint() -> str | None:
    """The S3-compatible server the settings name, or None for AWS itself: `AWS_ENDPOINT_URL_S3`
    or `AWS_ENDPOINT_URL`, else an `endpoint_url` in the AWS profile (as boto3 resolves it)."""
    named = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if named:
        return named
    return _profile_settings(os.environ.get("AWS_PROFILE"), os.environ.get("AWS_CONFIG_FILE"))[0]


def region() -> str | None:
    """`AWS_REGION` or `AWS_DEFAULT_REGION`, else the AWS profile's region."""
    named = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if named:
        return named
    return _profile_settings(os.environ.get("AWS_PROFILE"), os.environ.get("AWS_CONFIG_FILE"))[1]


@functools.cache
def _profile_settings(profile: str | None, config_file: str | None) -> tuple[str | None, str | None]:
    """(endpoint, region) of the AWS profile, read by botocore (its `endpoint_url`, whether at the
    top of the profile, under `s3 =` or in a `services` section), so that pyarrow's reads go to the
    server boto3's writes go to. (None, None) without boto3 or without a profile that names them."""
    try:
        import boto3
    except ImportError:
        return None, None
    try:
        session = boto3.session.Session(profile_name=profile)
        url = session.client("s3").meta.endpoint_url
        named_region = session._session.get_scoped_config().get("region")
    except Exception:  # no such profile, an unreadable config: pyarrow then uses its own defaults
        return None, None
    host = url.split("://")[-1].split("/")[0]
    return (None if host.endswith("amazonaws.com") else url), named_region


def filesystem(url: str) -> pafs.FileSystem:
    """The pyarrow filesystem that reads `url` (paths on it are `bucket/key`)."""
    scheme, _ = split_url(url)
    if scheme == "s3":
        return _s3(endpoint(), region())
    if scheme == "gs":
        return _gcs(os.environ.get("STORAGE_EMULATOR_HOST"))
    raise ValueError(f"'{url}': not an object store URL (s3:// or gs://)")


@functools.cache
def _s3(endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint_url, region=region)


@functools.cache
def _gcs(emulator: str | None) -> pafs.GcsFileSystem:
    if emulator:  # e.g. http://127.0.0.1:4443 (fake-gcs-server): no credentials
        scheme, _, host = emulator.rpartition("://")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme=scheme or "http")
    return pafs.GcsFileSystem()


# The most a quick client's request takes, its second try and back-off included: two tries of at
# most 3 s to connect and 3 s for the answer, and at most 1 s between them.
QUICK_S = 13.0


def s3_client(quick: bool = False) -> Any:
    """A boto3 S3 client for the settings above (boto3 reads them itself), one per process.

    `quick`: one that gives a request up within `QUICK_S` (the default one retries for minutes). A
    lease's holder sends through it what must not land after its lease could have been taken over
    (`jobs.dataset.store`): sent while the lease is its own, such a request lands within QUICK_S or
    not at all.

    Raises:
        ImportError: boto3 is not installed (it is a dependency of the project).
    """
    return _client(endpoint(), region(), quick)


@functools.cache
def _client(endpoint_url: str | None, region: str | None, quick: bool = False) -> Any:
    import boto3
    from botocore.config import Config

    if quick:
        config = Config(retries={"total_max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=3)
    else:
        config = Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=10, read_timeout=120)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
