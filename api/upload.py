"""Streaming ``multipart/form-data`` to disk under a byte cap, without Starlette's form parser.

Starlette's ``request.form()`` has no cap on the body and keeps small parts in memory; here the raw
body is counted as it arrives (the ``Content-Length`` header is checked first, but not trusted), each
file part goes straight to a temporary file under the store's ``tmp/`` folder, and anything that is
not well-formed multipart is a :class:`MalformedUpload` (400), never a 500. Error texts are fixed:
they never repeat a byte of the body (python-multipart's messages quote them). A body that stalls
(``idle_timeout_s`` without a byte) or takes longer than ``timeout_s`` in all is an
:class:`UploadTimeout` (408), so a slow client cannot hold a spool file and a connection for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

FILE_FIELD = "files"
MAX_FIELD_BYTES = 8 * 1024  # a plain form field (callback_url) is short
MAX_FIELDS = 16  # plain form fields per request: the API reads two
MAX_HEADER_BYTES = 16 * 1024  # per part; a 10 KB file name still fits


class UploadTooLarge(Exception):
    pass


class TooManyFiles(Exception):
    pass


class UploadTimeout(Exception):
    pass


class MalformedUpload(Exception):
    """Not well-formed multipart. Raised with fixed texts only (never a byte of the body, never
    python-multipart's message): ``public_message`` is what the client is told."""

    @property
    def public_message(self) -> str:
        return str(self)


@dataclass
class SpooledFile:
    filename: bytes | None
    path: Path
    size: int = 0


@dataclass
class SpooledForm:
    files: list[SpooledFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)

    def cleanup(self) -> None:
        for spooled in self.files:
            spooled.path.unlink(missing_ok=True)


class _Spooler:
    """python-multipart callbacks that write file parts to disk and keep short fields."""

    def __init__(self, tmp_dir: Path, max_files: int) -> None:
        self.tmp_dir = tmp_dir
        self.max_files = max_files
        self.form = SpooledForm()
        self.fields = 0
        self.ended = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._out: BinaryIO | None = None
        self._current: SpooledFile | None = None
        self._field_name: str | None = None
        self._field_value = bytearray()

    def callbacks(self) -> dict:  # type: ignore[type-arg]
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._headers = {}
        self._header_bytes = 0
        self._field_name = None
        self._current = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._grow(self._header_field, data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._grow(self._header_value, data[start:end])

    def _grow(self, buffer: bytearray, chunk: bytes) -> None:
        self._header_bytes += len(chunk)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise MalformedUpload("part headers too long")
        buffer.extend(chunk)

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_field).strip().lower()] = bytes(self._header_value).strip()
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition.lower() != b"form-data" or b"name" not in options:
            raise MalformedUpload("each part needs 'Content-Disposition: form-data; name=...'")
        name = options[b"name"].decode("utf-8", "replace")
        if name == FILE_FIELD or b"filename" in options:
            if name != FILE_FIELD:
                self._field_name = None  # a file under another field name: read and dropped
                return
            if len(self.form.files) >= self.max_files:  # files only: form fields have their own cap
                raise TooManyFiles(f"more than {self.max_files} files in one request")
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-")
            self._out = os.fdopen(fd, "wb")
            self._current = SpooledFile(filename=options.get(b"filename"), path=Path(tmp))
            self.form.files.append(self._current)
        else:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise MalformedUpload(f"more than {MAX_FIELDS} form fields")
            self._field_name = name
            self._field_value.clear()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None and self._current is not None:
            self._out.write(data[start:end])
            self._current.size += end - start
        elif self._field_name is not None:
            self._field_value.extend(data[start:end])
            if len(self._field_value) > MAX_FIELD_BYTES:
                raise MalformedUpload(f"a form field is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        elif self._field_name is not None:
            self.form.fields[self._field_name] = self._field_value.decode("utf-8", "replace")
        self._current = None
        self._field_name = None

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self._out is not None:
            with contextlib.suppress(OSError):
                self._out.close()
            self._out = None


def boundary_of(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind.lower() != b"multipart/form-data" or not boundary:
        raise MalformedUpload("expected a multipart/form-data body (with a boundary)")
    return boundary


async def spool_multipart(
    request: Request,
    tmp_dir: Path,
    max_bytes: int,
    max_files: int,
    *,
    timeout_s: float = 600.0,
    idle_timeout_s: float = 30.0,
) -> SpooledForm:
    """Read the request body as it streams; on any error nothing is left on disk.

    At most ``max_files`` file parts (plain form fields: ``MAX_FIELDS``), ``max_bytes`` in all,
    ``timeout_s`` for the whole body and ``idle_timeout_s`` between two chunks of it.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise UploadTooLarge(f"request body of {int(declared)} bytes")
        except ValueError:
            raise MalformedUpload("invalid Content-Length header") from None
    boundary = boundary_of(request.headers.get("content-type"))
    tmp_dir.mkdir(parents=True, exist_ok=True)
    spooler = _Spooler(tmp_dir, max_files)
    try:
        try:
            parser = MultipartParser(boundary, spooler.callbacks(), max_header_size=MAX_HEADER_BYTES)
        except (FormParserError, ValueError):
            raise MalformedUpload("bad multipart boundary") from None
        received = 0
        async for chunk in _timed(request.stream(), timeout_s, idle_timeout_s):
            received += len(chunk)
            if received > max_bytes:
                raise UploadTooLarge(f"request body over {max_bytes} bytes")
            if chunk:
                # Parsing and writing to disk happen off the event loop.
                await run_in_threadpool(_feed, parser, chunk)
        _finalize(parser)
        if not spooler.ended or parser.state != MultipartState.END:
            raise MalformedUpload("multipart body ended before its closing boundary")
        return spooler.form
    except ClientDisconnect:
        spooler.close()
        spooler.form.cleanup()
        raise MalformedUpload("client disconnected during the upload") from None
    except BaseException:
        spooler.close()
        spooler.form.cleanup()
        raise
    finally:
        spooler.close()


async def _timed(
    chunks: AsyncIterator[bytes], timeout_s: float, idle_timeout_s: float
) -> AsyncIterator[bytes]:
    """``chunks``, or UploadTimeout once a chunk takes longer than ``idle_timeout_s`` to arrive or
    the whole body longer than ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    iterator = aiter(chunks)
    while True:
        wait = min(idle_timeout_s, deadline - loop.time())
        if wait <= 0:
            raise UploadTimeout
        try:
            chunk = await asyncio.wait_for(anext(iterator), wait)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadTimeout from None
        yield chunk


def _finalize(parser: MultipartParser) -> None:
    try:
        parser.finalize()
    except (FormParserError, ValueError):
        raise MalformedUpload("malformed multipart body") from None


def _feed(parser: MultipartParser, chunk: bytes) -> None:
    try:
        parser.write(chunk)
    except (FormParserError, ValueError) as exc:
        # Fixed texts: python-multipart's messages may quote bytes of the body.
        text = str(exc)
        if text.startswith("Maximum header size"):
            raise MalformedUpload("part headers too long") from None
        if text.startswith("Maximum header count"):
            raise MalformedUpload("too many part headers") from None
        raise MalformedUpload("malformed multipart body") from None
