"""``s3://bucket/key`` outputs: parsing, the client, and botocore's errors in copystream's words.

Credentials, region and endpoint come from the standard AWS chain (environment variables,
``AWS_PROFILE`` and the config files, instance roles; ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` for MinIO, Ceph, R2 and the like): copystream never sees a secret, and
none of its records or messages holds one. Throttling (503 SlowDown), timeouts and dropped
connections are retried by botocore's ``standard`` retry mode (:data:`ATTEMPTS` attempts with
backoff); what still fails is an :class:`~copystream.errors.ExportFailed` (the checkpoint in
the bucket is intact: run again to resume). A missing bucket, missing credentials or a refused
request are usage errors (:func:`classify`), reported before anything is read from PostgreSQL.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from .errors import CopystreamError, ExportFailed, OutputProblem, Remedy

__all__ = ["ATTEMPTS", "S3Url", "classify", "client", "is_s3", "parse"]

#: Attempts of one S3 request (botocore's standard retry mode: throttling, 5xx, timeouts and
#: dropped connections, with exponential backoff and jitter).
ATTEMPTS = 10

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


def client() -> Any:
    """An S3 client from the standard AWS chain, retrying throttling and dropped connections."""
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
