"""``s3://bucket/key`` outputs: parsing, the client, and botocore's errors in copystream's words.

Credentials, region and endpoint come from the standard AWS chain (environment variables,
``AWS_PROFILE`` and the config files, instance roles; ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` for MinIO, Ceph, R2 and the like): copystream never sees a secret, and
none of its records or messages holds one. Throttling (503 SlowDown and other 5xx answers),
timeouts and dropped connections are retried twice: by botocore's ``standard`` retry mode
(:data:`ATTEMPTS` attempts with backoff, within one call), then, as an outage of the database
would be, by :class:`RetryingClient`: the call is made again, with the export's backoff, until
it has been failing for the export's ``max_outage`` seconds (:func:`transient` says which
errors; each retry is a log line). What still fails is an
:class:`~copystream.errors.ExportFailed` (the checkpoint in the bucket is intact: run again to
resume). A missing bucket, missing credentials or a refused request are usage errors
(:func:`classify`), reported before anything is read from PostgreSQL.
"""

from __future__ import annotations

import functools
import io
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from .errors import CopystreamError, ExportFailed, OutputProblem, Remedy
from .retry import Failure, Retrier, RetryPolicy

__all__ = [
    "ATTEMPTS",
    "RetryingClient",
    "S3Url",
    "classify",
    "client",
    "is_s3",
    "parse",
    "transient",
]

#: Attempts of one S3 request by botocore itself (its standard retry mode: throttling, 5xx,
#: timeouts and dropped connections, with exponential backoff and jitter); a request that still
#: fails is retried as an outage by :class:`RetryingClient`.
ATTEMPTS = 3

PREFIX = "s3://"


class S3Url(NamedTuple):
    """A bucket and a key (or a key prefix, for a bulk job's ``output_dir``)."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{PREFIX}{self.bucket}/{self.key}"

    def beside(self, suffix: str) -> S3Url:
        """The object beside this one whose key ends in ``suffix`` (``.checkpoint.json``)."""
        return S3Url(self.bucket, self.key + suffix)


def is_s3(output: object) -> bool:
    """Whether ``output`` names an S3 object (a string starting with ``s3://``)."""
    return isinstance(output, str) and output.startswith(PREFIX)


def parse(output: str) -> S3Url:
    """``s3://bucket/key`` as an :class:`S3Url`; a usage error if either part is missing."""
    rest = output[len(PREFIX) :] if output.startswith(PREFIX) else ""
    bucket, _, key = rest.partition("/")
    if not bucket or not key or key.endswith("/"):
        raise OutputProblem(f"{output} is not an S3 object: write s3://BUCKET/KEY")
    return S3Url(bucket, key)


def client(policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> Any:
    """An S3 client from the standard AWS chain, retrying throttling, 5xx answers, timeouts and
    dropped connections (a :class:`RetryingClient` with ``policy``, default
    :class:`RetryPolicy`'s)."""
    return RetryingClient(_boto3_client(), policy or RetryPolicy(), sleep)


def _boto3_client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:  # the ``s3`` extra is not installed
        raise OutputProblem(
            "writing to S3 needs boto3: pip install 'copystream[s3]'", remedy=None
        ) from e
    config = Config(retries={"max_attempts": ATTEMPTS, "mode": "standard"})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=config)


#: Error codes of an endpoint that is overloaded or failing for now (any 5xx answer too).
_BUSY = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
         "ServiceUnavailable", "InternalError", "RequestLimitExceeded"}  # fmt: skip


def transient(e: BaseException) -> Failure | None:
    """Whether the S3 error ``e`` is worth another attempt: throttling, a 5xx answer, a
    timeout or a dropped or refused connection are an outage of the endpoint (limited by
    ``max_outage``, as a lost database connection is); anything else is not. Pure."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _BUSY or status >= 500:
            return Failure(f"S3 answered {code or status}", outage=True)
        return None
    if isinstance(e, ConnectionError | HTTPClientError):
        return Failure(f"S3 connection: {type(e).__name__}", outage=True)
    return None


class RetryingClient:
    """A boto3 S3 client whose calls are made again while they fail :func:`transient`-ly,
    until they have been failing for ``policy.max_outage`` seconds (each retry logged, with
    the policy's backoff); the first call that succeeds ends the streak. A request body is
    rewound before each attempt. ``raw`` is the client itself (botocore's retries only)."""

    def __init__(self, raw: Any, policy: RetryPolicy, sleep: Callable[[float], None]) -> None:
        self.raw, self._policy, self._sleep = raw, policy, sleep

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.raw, name)
        if name.startswith("_") or not callable(method):
            return method
        return functools.partial(self._call, name, method)

    def _call(self, name: str, method: Callable[..., Any], **kw: Any) -> Any:
        body = kw.get("Body")
        start = body.tell() if isinstance(body, io.IOBase) and body.seekable() else None
        retrier = Retrier(self._policy, sleep=self._sleep, classifier=transient)
        doing = f"S3 {name} of {kw.get('Key') or kw.get('Bucket')}"
        while True:
            try:
                result = method(**kw)
            except Exception as e:
                d = retrier.failed(e)
                if not d.retry:
                    raise
                retrier.wait(d, doing)
                if start is not None:
                    kw["Body"].seek(start)
                continue
            retrier.succeeded(doing)
            return result


#: Error codes that say the request itself cannot work: no retry will help.
_REFUSED = {
    "AccessDenied": "access to {where} is denied",
    "AllAccessDisabled": "access to {where} is denied",
    "InvalidAccessKeyId": "the AWS access key is not known to the S3 endpoint ({where})",
    "SignatureDoesNotMatch": "the AWS secret key does not match its access key ({where})",
    "ExpiredToken": "the AWS session token has expired ({where})",
    "InvalidToken": "the AWS session token is not valid ({where})",
    "NoSuchBucket": "bucket {bucket} does not exist",
    "InvalidBucketName": "{bucket} is not a valid bucket name",
    "403": "access to {where} is denied",
    "404": "bucket {bucket} does not exist",
}


def classify(e: BaseException, url: S3Url, doing: str) -> CopystreamError:
    """``e`` (a botocore error) as a copystream error: a usage error (exit 2) when the bucket,
    the credentials or the permissions are at fault, else an ``ExportFailed`` (exit 1) that a
    run again resumes. The message names the bucket and key, never a credential."""
    from botocore.exceptions import (
        ClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    where = f"s3://{url.bucket}"
    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return OutputProblem(f"no AWS credentials found for {where}", remedy=Remedy.CHECK_S3)
    if isinstance(e, NoRegionError):
        return OutputProblem(f"no AWS region configured for {where}", remedy=Remedy.CHECK_S3)
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _REFUSED:
            problem = _REFUSED[code].format(where=where, bucket=url.bucket)
            return OutputProblem(f"{problem} ({doing})", remedy=Remedy.CHECK_S3)
        return ExportFailed(f"S3 refused {doing} ({code or 'error'}): {_short(e)}")
    return ExportFailed(f"S3 failed while {doing}: {type(e).__name__}: {_short(e)}")


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:300] if str(e) else type(e).__name__
