"""An S3 object as a destination: one multipart upload that survives the process.

For S3, *durable* means *in an uploaded part*. Chunks are stored first in a buffer file, an
anonymous temporary file written at the object's own offsets by a local destination (a
:class:`~copystream.destinations.local.LocalFile`, or a
:class:`~copystream.destinations.compressed.CompressedFile`, which compresses off the streaming
thread). When a chunk ends with at least :func:`part_target` bytes buffered, those chunks
become one part, cut at that chunk boundary, which :meth:`S3Object.sync` reads and uploads on
the commit thread while the next chunk streams, then punches out of the buffer file: at most
one part is buffered and one in flight, both in the buffer file (the page cache), streamed to
S3 from there, never held whole in memory. Only then does the checkpoint advance:
:meth:`~S3Object.sync` says whether the ended chunks are durable
(:class:`~copystream.destinations.Synced`), so the checkpoint in the bucket always ends at a
part boundary and records the upload id and every part's number, ETag and size. A resume lists
the upload's parts (``ListParts``), keeps them if they are the ones the checkpoint vouches for,
and re-exports what was buffered but not uploaded from the checkpoint's last key. Every part but
the last is at least 5 MiB (S3's minimum), the last one holds what is left at the end.

A compressed export stores one zstd frame (gzip member) per chunk, as a compressed file does.

An xxh3 state cannot be saved and the parts of an unfinished upload cannot be read back, so a
resumed export hashes from where it resumed (``hashed_from`` in its state; the checkpoint's
prefix digest covers the bytes from there) and, once the object is complete, reads it back
once (:func:`hash_object`) to compute the whole object's digests for the manifest, checking
every chunk's digest on the way.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import queue
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import xxhash

from ..checkpoint import ChunkRecord
from ..errors import PrefixMismatch
from ..join import punch_hole
from ..s3url import S3Url, classify
from . import ChunkWritten, Synced
from .compressed import CompressedFile, CorruptFrame, codec
from .local import LocalFile

__all__ = [
    "KIND",
    "MAX_PARTS",
    "PART_MIN",
    "Edges",
    "Hashed",
    "S3Object",
    "append_state",
    "fresh_state",
    "hash_object",
    "head_object",
    "multipart_etag",
    "part_target",
    "range_per",
]

log = logging.getLogger("copystream")

#: The ``kind`` of an S3 object's state in a checkpoint.
KIND = "s3"

#: S3's smallest part (all but the last) and its largest part count.
PART_MIN = 5 * 1024 * 1024
MAX_PARTS = 10_000

#: Bytes read at a time when an object is read back.
PIECE = 1024 * 1024

_EMPTY = xxhash.xxh3_128().hexdigest()


def part_target(stored: int, per: int = 1000) -> int:
    """The size at which the chunks buffered after ``stored`` bytes of parts are cut into a part.

    5 MiB, growing with the object (a ``per``-th of it) so that no object S3 can hold (5 TB)
    needs more than its 10,000 parts whatever the table's size estimate said (``per`` is
    smaller for a key range, which has fewer part numbers: :func:`range_per`). Pure.
    """
    return max(PART_MIN, stored // per)


def range_per(numbers: int) -> int:
    """The ``per`` of :func:`part_target` for a key range allotted ``numbers`` part numbers:
    such that a range of 5 TB (S3's largest object) stays within them. Pure."""
    return max(1, numbers // 14)


def multipart_etag(etags: Sequence[str]) -> str:
    """The ETag S3 gives the object that a multipart upload of parts with ``etags`` completes
    into (the MD5 of the parts' MD5s, ``-`` their count), quoted as S3 quotes it. Pure."""
    md5 = hashlib.md5(usedforsecurity=False)
    for etag in etags:
        md5.update(bytes.fromhex(etag.strip('"')))
    return f'"{md5.hexdigest()}-{len(etags)}"'


def fresh_state(
    url: S3Url,
    upload_id: str,
    compress: dict[str, Any] | None,
    edges: Edges | None = None,
) -> dict[str, Any]:
    """An S3 object's state before anything is stored (the upload is created already);
    ``edges``: the object is one key range of a ``workers`` export (see :class:`Edges`)."""
    state: dict[str, Any] = {
        "kind": KIND,
        "bucket": url.bucket,
        "key": url.key,
        "upload_id": upload_id,
        "parts": [],
        "hashed_from": 0,
    }
    if edges is not None:
        state["range"] = {"edge_key": edges.key, "numbers": list(edges.numbers),
                          "head": None, "tail": None}  # fmt: skip
    if compress is not None:
        state.update(
            codec=compress["codec"],
            level=int(compress["level"]),
            uncompressed_bytes=0,
            uncompressed_xxh3_128=_EMPTY,
        )
    return state


def append_state(
    client: Any, url: S3Url, compress: dict[str, Any] | None, head: dict[str, Any]
) -> dict[str, Any]:
    """The state of a new upload to ``url`` that appends to the object ``head`` describes.

    The object's bytes are the upload's first bytes (its *prefix*, recorded with the ETag it
    had): an object of at least 5 MiB is copied server-side as part 1 (``UploadPartCopy``, on
    condition that it still has that ETag); a smaller one is read back into the buffer file
    when the destination is opened and uploaded as the beginning of part 1 (S3's smallest part
    but the last is 5 MiB). Until the upload is completed the object stays as it was.
    """
    size, etag = int(head["ContentLength"]), str(head["ETag"])
    try:
        upload_id = client.create_multipart_upload(Bucket=url.bucket, Key=url.key)["UploadId"]
    except Exception as e:
        raise classify(e, url, "starting the upload") from e
    state = {**fresh_state(url, upload_id, compress), "hashed_from": size,
             "prefix": {"bytes": size, "etag": etag}}  # fmt: skip
    if size < PART_MIN:
        return state
    try:
        copied = client.upload_part_copy(
            Bucket=url.bucket, Key=url.key, UploadId=upload_id, PartNumber=1,
            CopySource={"Bucket": url.bucket, "Key": url.key}, CopySourceIfMatch=etag,
        )  # fmt: skip
    except Exception as e:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=url.bucket, Key=url.key, UploadId=upload_id)
        raise classify(e, url, "copying the object into the upload") from e
    part = {"number": 1, "etag": str(copied["CopyPartResult"]["ETag"]), "bytes": size}
    return {**state, "parts": [part]}


def _stored(state: dict[str, Any]) -> int:
    """The bytes of the object ``state`` vouches for: its parts, or the prefix of an append
    before its first part, and a key range's head."""
    head = (state.get("range") or {}).get("head") or {"bytes": 0}
    prefix = (state.get("prefix") or {}).get("bytes", 0) if not state["parts"] else 0
    return sum(int(p["bytes"]) for p in state["parts"]) + int(prefix) + int(head["bytes"])


def head_object(client: Any, url: S3Url) -> dict[str, Any] | None:
    """The ``HeadObject`` answer for ``url``, or ``None`` if there is no object."""
    from botocore.exceptions import ClientError

    try:
        return dict(client.head_object(Bucket=url.bucket, Key=url.key))
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise classify(e, url, f"reading {url}") from e
    except Exception as e:
        raise classify(e, url, f"reading {url}") from e


class Edges(NamedTuple):
    """What one key range of a ``workers`` export uploads besides its parts.

    Its parts take the numbers ``numbers`` (first, last) of the export's one upload. Every
    part but the very last of an upload must be at least 5 MiB, so neither end of a range can
    be a part of its own: its first bytes (the *head*, the first cut, at least 5 MiB) and its
    last (the *tail*, what is left after its last cut, any size) are stored as the objects
    ``KEY.head`` and ``KEY.tail`` (``key``: ``OUTPUT.part-NNNN``), which the end of the
    export stitches into the parts between the ranges' (:mod:`copystream.s3ranges`).
    """

    key: str
    numbers: tuple[int, int]


HEAD, TAIL = 0, -1  # the "part numbers" of a range's head and tail objects


class _Part(NamedTuple):
    """Ended chunks cut into a part: the buffer file's bytes ``[start, start + size)``."""

    number: int
    start: int
    size: int


def _buffer(offset: int, state: dict[str, Any]) -> tuple[int, LocalFile | CompressedFile]:
    """An anonymous buffer file, and the local destination that stores (and compresses) the
    chunks in it at the object's own offsets (what precedes ``offset`` is a hole)."""
    fd, name = tempfile.mkstemp(prefix="copystream-s3-", suffix=".buffer")
    os.unlink(name)  # gone with the process, whatever happens to it
    path = Path(name)
    if "codec" not in state:
        return fd, LocalFile(fd, path, offset, xxhash.xxh3_128())
    raw = (int(state.get("uncompressed_bytes", 0)), xxhash.xxh3_128())
    cdc = codec(str(state["codec"]), int(state["level"]))
    return fd, CompressedFile(fd, path, cdc, offset, xxhash.xxh3_128(), raw)


class _Range(io.RawIOBase):
    """``size`` bytes of the file ``fd`` from ``start``, as a seekable read-only file: the
    body of one part, streamed to S3 without holding the part in memory."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buffer)[:n]], self._start + self._pos)
        if got == 0:
            raise OSError("the S3 buffer file ends before its part does")
        self._pos += got
        return got

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


class S3Object:
    """The output object, uploaded in parts cut at chunk boundaries, with a rolling digest.

    A :class:`~copystream.destinations.Destination`. Open it with :meth:`create` (a new
    multipart upload) or :meth:`resume` (the upload a checkpoint records, its parts checked
    against the bucket). ``offset`` is the end of the stored bytes (uploaded or buffered).
    """

    def __init__(self, client: Any, url: S3Url, state: dict[str, Any], offset: int) -> None:
        self._client, self.url = client, url
        self.upload_id: str = state["upload_id"]
        self._parts: list[dict[str, Any]] = list(state["parts"])
        self.hashed_from = int(state["hashed_from"])
        self._compressed = "codec" in state
        self._fd, self._buf = _buffer(offset, state)
        self._buf_start = offset
        self._prefix: dict[str, Any] | None = state.get("prefix")
        if self._prefix is not None and not self._parts:
            self._load_prefix()
        self._range: dict[str, Any] | None = state.get("range")
        first, self._last_number = (1, MAX_PARTS)
        if self._range is not None:
            first, self._last_number = self._range["numbers"]
        self._per = 1000 if self._range is None else range_per(self._last_number - first + 1)
        self._next_part = len(self._parts) + first
        self._ended: queue.SimpleQueue[_Part | None] = queue.SimpleQueue()
        self.completed = False

    @property
    def offset(self) -> int:
        """The end of the stored bytes (in uploaded parts or in the buffer file)."""
        return self._buf.offset

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def create(cls, client: Any, url: S3Url, compress: dict[str, Any] | None) -> S3Object:
        """Start a new multipart upload to ``url`` (nothing is visible at ``url`` until the end)."""
        try:
            upload = client.create_multipart_upload(Bucket=url.bucket, Key=url.key)
        except Exception as e:
            raise classify(e, url, "starting the upload") from e
        return cls(client, url, fresh_state(url, upload["UploadId"], compress), 0)

    @classmethod
    def resume(cls, client: Any, url: S3Url, state: dict[str, Any], offset: int) -> S3Object:
        """The upload ``state`` records, continued at ``offset`` (the end of its last part).

        The bucket's parts must be the recorded ones (number, ETag, size); parts uploaded after
        the last checkpoint are overwritten as the export goes on. An upload that is gone was
        completed (the object is then checked against the recorded parts) or aborted
        (:class:`PrefixMismatch`).
        """
        if _stored(state) != offset:
            raise PrefixMismatch(f"{url}.checkpoint.json does not match its parts: damaged")
        dest = cls(client, url, {**state, "hashed_from": offset}, offset)
        try:
            dest._check_parts()
        except BaseException:
            dest.close()
            raise
        return dest

    def _load_prefix(self) -> None:
        """Read the object an append begins with into the buffer file (at its offsets, not
        hashed: ``hashed_from`` is its end); the upload's first part begins there."""
        assert self._prefix is not None
        size, etag = int(self._prefix["bytes"]), str(self._prefix["etag"])
        try:
            got = self._client.get_object(Bucket=self.url.bucket, Key=self.url.key, IfMatch=etag)
            data = got["Body"].read()
        except Exception as e:
            self.close()
            error = classify(e, self.url, f"reading {self.url}")
            if "PreconditionFailed" in str(e) or "412" in str(e):
                error = PrefixMismatch(f"{self.url} was replaced since the append began")
            raise error from e
        if len(data) != size:
            self.close()
            raise PrefixMismatch(f"{self.url} is not the object the append began with")
        os.pwrite(self._fd, data, 0)
        self._buf_start = 0

    def _check_parts(self) -> None:
        listed = self._listed()
        if listed is None and self._range is None:
            self._check_completed()
            return
        if listed is None:  # a key range's upload is completed only once every range is done
            raise PrefixMismatch(f"the multipart upload to {self.url} is gone (aborted)")
        head = self._range["head"] if self._range is not None else None
        if head is not None:
            got = head_object(self._client, self._edge("head"))
            if got is None or (str(got["ETag"]), int(got["ContentLength"])) != (
                head["etag"], int(head["bytes"])
            ):
                raise PrefixMismatch(f"{self._edge('head')} is not the one its checkpoint records")
        for p in self._parts:
            if listed.get(int(p["number"])) != (str(p["etag"]), int(p["bytes"])):
                raise PrefixMismatch(
                    f"part {p['number']} of the upload to {self.url} is not the one its "
                    "checkpoint records: another process wrote to it"
                )

    def _listed(self) -> dict[int, tuple[str, int]] | None:
        """The upload's parts in the bucket (number: ETag, size), or ``None`` if it is gone."""
        from botocore.exceptions import ClientError

        listed: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            try:
                page = self._client.list_parts(
                    Bucket=self.url.bucket, Key=self.url.key, UploadId=self.upload_id,
                    PartNumberMarker=marker,
                )  # fmt: skip
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    return None
                raise classify(e, self.url, "listing the upload's parts") from e
            except Exception as e:
                raise classify(e, self.url, "listing the upload's parts") from e
            for p in page.get("Parts", []):
                listed[int(p["PartNumber"])] = (str(p["ETag"]), int(p["Size"]))
            if not page.get("IsTruncated"):
                return listed
            marker = int(page["NextPartNumberMarker"])

    def _check_completed(self) -> None:
        """The upload is gone: accept it only if it completed into the recorded parts."""
        head = self.head()
        etag = multipart_etag([str(p["etag"]) for p in self._parts]) if self._parts else None
        if (
            head is None
            or int(head["ContentLength"]) != self.offset
            or (etag is not None and head["ETag"] != etag)
        ):
            raise PrefixMismatch(
                f"the multipart upload to {self.url} that its checkpoint records is gone "
                "(aborted, or completed by another process)"
            )
        self.completed = True

    def head(self) -> dict[str, Any] | None:
        """The object's ``HeadObject`` answer, or ``None`` if there is no object."""
        return head_object(self._client, self.url)

    # -- the Destination interface --------------------------------------------------------------

    def begin_chunk(self) -> None:
        """Start a chunk (in the buffer file)."""
        self._buf.begin_chunk()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` in the buffer file (compressed first, for a compressed export)."""
        self._buf.write(data)

    def end_chunk(self) -> ChunkWritten:
        """End the chunk; cut the buffered chunks into a part once they are large enough."""
        written = self._buf.end_chunk()
        size = self.offset - self._buf_start
        if size >= part_target(self._buf_start, self._per):
            self._ended.put(self._cut(size))
        else:
            self._ended.put(None)
        return written

    def _cut(self, size: int) -> _Part:
        if self._range is not None and self._buf_start == 0:
            part = _Part(HEAD, 0, size)  # a key range's first bytes: its head object
        else:
            part = _Part(self._next_part, self._buf_start, size)
            if part.number > self._last_number:
                raise PrefixMismatch(
                    f"the upload to {self.url} needs more than the part numbers "
                    f"{self._next_part - len(self._parts)}-{self._last_number} it has"
                )
            self._next_part += 1
        self._buf_start += size
        return part

    def rollback(self) -> None:
        """Forget the chunk in progress."""
        self._buf.rollback()

    def cut(self, position: int) -> None:
        """Nothing to give back: what was not uploaded is only in this process's buffer."""

    def sync(self) -> Synced:
        """Upload the part the chunk ended last was cut into, if it was (commit thread)."""
        part = self._ended.get_nowait()
        if part is None:
            return Synced(False, {})
        self._upload(part)
        if self._range is not None:
            return Synced(True, {"parts": list(self._parts), "range": dict(self._range)})
        return Synced(True, {"parts": list(self._parts)})

    def _edge(self, which: str) -> S3Url:
        assert self._range is not None
        return S3Url(self.url.bucket, f"{self._range['edge_key']}.{which}")

    def _upload(self, part: _Part) -> None:
        body = io.BufferedReader(_Range(self._fd, part.start, part.size), PIECE)
        if part.number in (HEAD, TAIL):
            which = "head" if part.number == HEAD else "tail"
            edge = self._edge(which)
            try:
                put = self._client.put_object(
                    Bucket=edge.bucket, Key=edge.key, Body=body, ContentLength=part.size
                )
            except Exception as e:
                raise classify(e, self.url, f"writing {edge}") from e
            punch_hole(self._fd, part.start, part.size)
            assert self._range is not None
            self._range = {**self._range, which: {"bytes": part.size, "etag": str(put["ETag"])}}
            return
        try:
            answer = self._client.upload_part(
                Bucket=self.url.bucket, Key=self.url.key, UploadId=self.upload_id,
                PartNumber=part.number, Body=body, ContentLength=part.size,
            )  # fmt: skip
        except Exception as e:
            raise classify(e, self.url, f"uploading part {part.number}") from e
        punch_hole(self._fd, part.start, part.size)  # uploaded: give the buffer's space back
        self._parts.append({"number": part.number, "etag": answer["ETag"], "bytes": part.size})

    @property
    def digest(self) -> str:
        """xxh3-128 hex digest of the bytes stored since ``hashed_from`` (all, unless resumed)."""
        return self._buf.digest

    def state(self) -> dict[str, Any]:
        """The upload id and uploaded parts (and the uncompressed size and digest so far)."""
        state: dict[str, Any] = {
            "kind": KIND,
            "bucket": self.url.bucket,
            "key": self.url.key,
            "upload_id": self.upload_id,
            "parts": list(self._parts),
            "hashed_from": self.hashed_from,
        }
        if self._range is not None:
            state["range"] = dict(self._range)
        if self._compressed:
            state.update({k: v for k, v in self._buf.state().items() if k != "kind"})
        return state

    # -- the end ------------------------------------------------------------------------------

    def flush(self) -> dict[str, Any]:
        """Upload what is still buffered as the last part (after the last chunk); the state."""
        while True:  # every ended chunk was synced already; an unsynced part is uploaded now
            try:
                part = self._ended.get_nowait()
            except queue.Empty:
                break
            if part is not None:
                self._upload(part)
        size = self.offset - self._buf_start
        if self._range is not None:  # a key range's last bytes: its tail object
            if self._range["tail"] is None:
                self._upload(_Part(TAIL, self._buf_start, size))
        elif not self.completed and (size or not self._parts):
            self._upload(self._cut(size))
        return self.state()

    def complete(self) -> None:
        """Complete the upload: the object appears at its key (idempotent)."""
        if self.completed:
            return
        from botocore.exceptions import ClientError

        parts = [{"PartNumber": int(p["number"]), "ETag": str(p["etag"])} for p in self._parts]
        t0 = time.monotonic()
        try:
            self._client.complete_multipart_upload(
                Bucket=self.url.bucket, Key=self.url.key, UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
            )  # fmt: skip
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise classify(e, self.url, "completing the upload") from e
            self._check_completed()  # an attempt whose answer was lost completed it
        except Exception as e:
            raise classify(e, self.url, "completing the upload") from e
        self.completed = True
        log.info("%s: upload completed (%d parts) in %.2fs", self.url, len(parts),
                 time.monotonic() - t0)  # fmt: skip

    def close(self) -> None:
        """Drop what is buffered (idempotent); the upload stays, for a resume."""
        self._buf.close()  # closes the buffer file too


class Hashed(NamedTuple):
    """An object read back: its size, digest, and uncompressed size and digest (or ``None``)."""

    bytes: int
    xxh3_128: str
    raw: tuple[int, str] | None


def _pieces(read: Callable[[int], bytes], length: int, states: Sequence[Any]) -> Iterator[bytes]:
    """``length`` bytes from ``read`` in pieces, each fed to ``states`` too."""
    while length > 0:
        data = read(min(PIECE, length))
        if not data:
            return
        for st in states:
            st.update(data)
        length -= len(data)
        yield data


def hash_object(
    read: Callable[[int], bytes],
    chunks: Sequence[ChunkRecord],
    compress: dict[str, Any] | None,
    *,
    deep: bool,
) -> Hashed:
    """Hash a stored object read through ``read`` chunk by chunk against ``chunks``.

    ``deep`` (for a compressed object) also decompresses every chunk and checks its uncompressed
    digest. Raises ``ValueError`` with the index of the first chunk that differs.
    """
    cdc = codec(str(compress["codec"]), int(compress["level"])) if deep and compress else None
    whole, raw, size, raw_size = xxhash.xxh3_128(), xxhash.xxh3_128(), 0, 0
    for c in chunks:
        h, r = xxhash.xxh3_128(), xxhash.xxh3_128()
        pieces = _pieces(read, c.bytes, (whole, h))
        if cdc is None:
            n = sum(len(p) for p in pieces)
            ok = n == c.bytes
        else:
            try:
                n = 0
                for block in cdc.decode(pieces):
                    raw.update(block)
                    r.update(block)
                    n += len(block)
            except CorruptFrame:
                raise ValueError(c.index) from None
            raw_size += n
            ok = (n, r.hexdigest()) == c.raw
        if not ok or h.hexdigest() != c.xxh3_128:
            raise ValueError(c.index)
        size += c.bytes
    size += sum(len(p) for p in _pieces(read, 1 << 62, (whole,)))  # bytes past the last chunk
    return Hashed(size, whole.hexdigest(), (raw_size, raw.hexdigest()) if cdc else None)
