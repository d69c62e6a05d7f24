"""The ``s3`` backend: AWS S3 and S3-compatible stores (MinIO, Ceph, B2's S3 endpoint) via boto3.

Credentials come only from the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role); the config names the place::

    [storage]
    backend = "s3"
    bucket = "my-bucket"
    prefix = "my_project"
    endpoint_url = "http://127.0.0.1:9000"  # optional, for S3-compatible stores
    region = "eu-west-1"                    # optional

or ``uri = "s3://my-bucket/my_project"``. Small files go up in one ``PutObject`` (boto3 adds
and the server checks a CRC32 of the body); files from :attr:`S3Remote.multipart_threshold`
up use boto3's managed multipart transfer. A file of :data:`~phd_flow.storage.progress.MIN_BYTES`
or more shows a byte-level progress bar on a terminal (boto3's transfer ``Callback``). botocore
retries a request only a few times with a short connect timeout, so an unreachable endpoint
fails fast and the sync engine's own retry/backoff takes over.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from phd_flow.errors import (
    StorageAuthError,
    StorageConfigError,
    StorageError,
    StorageNotFoundError,
    StorageUnavailableError,
)
from phd_flow.storage import progress
from phd_flow.storage.base import MAX_SMALL_BYTES, Remote, RemoteFile

if TYPE_CHECKING:
    from phd_flow.config import Config

_CREDENTIALS_FIX = (
    "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or use an instance role) "
    "to credentials allowed to read and write"
)
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class S3Remote(Remote):
    """Mirror runs into ``s3://bucket/prefix``."""

    #: Files from this size up are sent and fetched in parallel parts (S3's minimum is 5 MiB).
    multipart_threshold: ClassVar[int] = 16 << 20
    #: Size of each part of a multipart transfer.
    multipart_chunksize: ClassVar[int] = 16 << 20
    #: Parallel parts per large file.
    multipart_concurrency: ClassVar[int] = 8
    max_workers = 16

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        session: Any = None,
    ) -> None:
        """``session`` is an optional ``boto3.session.Session`` (default: the standard chain)."""
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self._session = session
        self._client: Any = None
        self._transfer: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config) -> S3Remote:
        storage = config.storage
        bucket, prefix = storage.bucket, storage.prefix
        if storage.uri:
            rest = storage.uri.split("://", 1)[1]
            bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StorageConfigError(
                'The s3 storage backend needs a bucket: set [storage] bucket = "my-bucket" '
                '(or [storage] uri = "s3://my-bucket/prefix") in the config'
                f"{f' ({config.source})' if config.source else ''}."
            )
        return cls(bucket, prefix, endpoint_url=storage.endpoint_url, region=storage.region)

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where

    # --- boto3 plumbing -------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 S3 client (built once; boto3 clients are thread-safe, sessions are not)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client, self._transfer = self._build()
        return self._client

    def _build(self) -> tuple[Any, Any]:
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config as BotoConfig

        session = self._session or _default_session()
        boto_config = BotoConfig(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=self.max_workers + self.multipart_concurrency,
        )
        try:
            with _SESSION_LOCK:  # creating clients from one session is not thread-safe
                client = session.client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    config=boto_config,
                )
        except ValueError as exc:  # a malformed endpoint_url
            raise StorageConfigError(f"[storage] endpoint_url {self.endpoint_url!r} is not usable: {exc}") from exc
        transfer = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.multipart_concurrency,
        )
        return client, transfer

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix and key else (key or self.prefix)

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def _dir(self, prefix: str) -> str:
        """The S3 Prefix of the directory ``prefix`` ("" for the bucket root)."""
        full = self._key(prefix.strip("/"))
        return f"{full}/" if full else ""

    # --- the Remote API ---------------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[RemoteFile]:
        paginator = self._call(self.client.get_paginator, "list_objects_v2", what=prefix)
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._dir(prefix))
        for page in self._iterate(pages, prefix):
            for obj in page.get("Contents", []):
                yield RemoteFile(self._rel(obj["Key"]), int(obj["Size"]))

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        base = self._dir(prefix)
        paginator = self._call(self.client.get_paginator, "list_objects_v2", what=prefix)
        pages = paginator.paginate(Bucket=self.bucket, Prefix=base, Delimiter="/")
        names = {
            p["Prefix"][len(base) :].rstrip("/")
            for page in self._iterate(pages, prefix)
            for p in page.get("CommonPrefixes", [])
        }
        return sorted(names)

    def stat(self, key: str) -> RemoteFile | None:
        try:
            head = self._call(self.client.head_object, Bucket=self.bucket, Key=self._key(key), what=key)
        except StorageNotFoundError:
            return None
        return RemoteFile(key, int(head["ContentLength"]))

    def put(self, local: Path, key: str) -> None:
        size = local.stat().st_size
        if size >= self.multipart_threshold or progress.wanted(size):
            client = self.client
            with progress.ByteProgress(f"↑ {key}", size) as bar:
                self._call(
                    client.upload_file,
                    str(local),
                    self.bucket,
                    self._key(key),
                    Config=self._transfer,
                    Callback=bar,
                    what=key,
                )
            return
        with open(local, "rb") as body:
            self._call(self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=body, what=key)

    def get(self, key: str, local: Path) -> None:
        response = self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(key), what=key)
        body = response["Body"]
        size = int(response["ContentLength"])
        if size >= self.multipart_threshold or progress.wanted(size):
            body.close()  # fetch big objects as parallel ranged GETs instead
            with progress.ByteProgress(f"↓ {key}", size) as bar:
                self._call(
                    self.client.download_file,
                    self.bucket,
                    self._key(key),
                    str(local),
                    Config=self._transfer,
                    Callback=bar,
                    what=key,
                )
            return
        with open(local, "wb") as out:
            self._call(lambda: [out.write(chunk) for chunk in body.iter_chunks(1 << 20)], what=key)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data, what=key)

    def read_bytes(self, key: str) -> bytes | None:
        try:
            response = self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(key), what=key)
        except StorageNotFoundError:
            return None
        data: bytes = self._call(response["Body"].read, what=key)
        return data

    def read_small(self, key: str, limit: int = MAX_SMALL_BYTES) -> bytes | None:
        """One GET (no HEAD first): the size is checked from the response before the body is read."""
        try:
            response = self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(key), what=key)
        except StorageNotFoundError:
            return None
        body = response["Body"]
        if int(response.get("ContentLength") or 0) > limit:
            body.close()
            raise StorageError(
                f"{self.describe()}/{key} is more than {limit} bytes, more than a record can be: refused."
            )
        data: bytes = self._call(lambda: body.read(limit + 1), what=key)
        if len(data) > limit:
            raise StorageError(f"{self.describe()}/{key} is more than {limit} bytes: refused.")
        return data

    def delete(self, keys: builtins.list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            response = self._call(
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
                what=keys[start],
            )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"Could not delete {len(errors)} object(s) from {self.describe()}, e.g. "
                    f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}".rstrip()
                )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- error translation ------------------------------------------------------------------------

    def _call(self, fn: Any, *args: Any, what: str, **kwargs: Any) -> Any:
        """Call a boto3 function, translating its errors to phd_flow's hierarchy."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError, *_boto3_errors()) as exc:
            raise self._translate(exc, what) from exc

    def _iterate(self, pages: Any, what: str) -> Iterator[Any]:
        """Walk a paginator, translating errors raised while fetching pages."""
        iterator = iter(pages)
        while True:
            try:
                page = self._call(next, iterator, what=what)
            except StopIteration:
                return
            yield page

    def _translate(self, exc: BaseException, what: str) -> StorageError:
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            CredentialRetrievalError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        exc = _unwrap(exc)
        where = f"{self.describe()}/{what}".rstrip("/")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
            return StorageAuthError(
                f"No usable AWS credentials for {where}. {_CREDENTIALS_FIX} bucket {self.bucket!r}."
            )
        if isinstance(exc, (ConnectionError, HTTPClientError)):
            endpoint = self.endpoint_url or "the AWS endpoint"
            return StorageUnavailableError(
                f"Cannot reach {endpoint} for {where} ({type(exc).__name__}). Check the network, "
                "and [storage] endpoint_url if you set one."
            )
        if not isinstance(exc, ClientError):
            return StorageError(f"S3 operation on {where} failed: {exc}")
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        detail = f"{code}: {error.get('Message', '')}".strip(": ")
        if code == "NoSuchBucket":
            return StorageConfigError(
                f"The bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}. "
                "Create it, or fix [storage] bucket (or [storage] uri / endpoint_url)."
            )
        if code in _AUTH_CODES or status == 403:
            return StorageAuthError(
                f"S3 refused the credentials for {where} ({detail}). {_CREDENTIALS_FIX} bucket {self.bucket!r}."
            )
        if code in _MISSING_CODES or status == 404:
            return StorageNotFoundError(f"{where} does not exist.")
        if code in _TRANSIENT_CODES or status >= 500:
            return StorageUnavailableError(f"S3 is unavailable for {where} ({detail}); retry later.")
        if code == "InvalidBucketName":
            return StorageConfigError(
                f"{self.bucket!r} is not a valid S3 bucket name ({detail}). Fix [storage] bucket."
            )
        return StorageError(f"S3 operation on {where} failed ({detail}).")


_SESSION_LOCK = threading.Lock()
_SESSIONS: dict[str, Any] = {}


def _default_session() -> Any:
    """One boto3 session per process (the standard credential chain), built once.

    Building a session loads botocore's service models (~0.3-0.5 s); reusing it makes every
    further client cheap. Sessions are not thread-safe, so creation happens under a lock.
    """
    with _SESSION_LOCK:
        if "default" not in _SESSIONS:
            import boto3

            _SESSIONS["default"] = boto3.session.Session()
        return _SESSIONS["default"]


def _boto3_errors() -> tuple[type[BaseException], ...]:
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    return (RetriesExceededError, S3UploadFailedError)


def _unwrap(exc: BaseException) -> BaseException:
    """The underlying botocore error of boto3's transfer wrappers."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    last = getattr(exc, "last_exception", None)
    if isinstance(exc, RetriesExceededError) and isinstance(last, BaseException):
        return last
    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        cause: BaseException = exc.__context__
        return cause
    return exc
