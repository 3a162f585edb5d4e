"""api/upload.py: the streaming multipart parser, fed through a real Starlette ``Request``.

The request body arrives as ASGI messages in chunks of a chosen size, so boundaries, headers and
limits are crossed at every position a network could split them. Every refusal is checked for its
type (``UploadTooLarge`` is the API's 413, ``MalformedUpload`` its 400), its reason, and that nothing
is left in the spool folder.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from starlette.requests import Request

from api.upload import (
    FILE_FIELD,
    MAX_FIELD_BYTES,
    MAX_FIELDS,
    MAX_HEADER_BYTES,
    MalformedUpload,
    SpooledForm,
    TooManyFiles,
    UploadTimeout,
    UploadTooLarge,
    boundary_of,
    spool_multipart,
)

BOUNDARY = "----brainscan-test-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
AUTO = "auto"  # content_length: the body's true length


def part(name: str, data: bytes, filename: str | bytes | None = None, extra_headers: bytes = b"") -> bytes:
    disposition = f'form-data; name="{name}"'.encode()
    if filename is not None:
        raw = filename.encode() if isinstance(filename, str) else filename
        disposition += b'; filename="' + raw + b'"'
    return b"Content-Disposition: " + disposition + b"\r\n" + extra_headers + b"\r\n" + data


def body_of(*parts: bytes, boundary: str = BOUNDARY, closed: bool = True) -> bytes:
    delimiter = b"--" + boundary.encode()
    out = b"".join(delimiter + b"\r\n" + p + b"\r\n" for p in parts)
    return out + (delimiter + b"--\r\n" if closed else b"")


def request_for(
    body: bytes,
    content_type: str | None = CONTENT_TYPE,
    chunk: int = 65536,
    content_length: str | None = AUTO,
    disconnect_after: int | None = None,
) -> Request:
    """A real Starlette request whose body arrives in ``chunk``-byte ASGI messages.

    ``disconnect_after``: the client goes away after that many messages (``http.disconnect``).
    """
    headers: list[tuple[bytes, bytes]] = []
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    if content_length == AUTO:
        headers.append((b"content-length", str(len(body)).encode()))
    elif content_length is not None:
        headers.append((b"content-length", content_length.encode()))
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages: list[dict] = [
        {"type": "http.request", "body": piece, "more_body": i < len(chunks) - 1}
        for i, piece in enumerate(chunks)
    ]
    if disconnect_after is not None:
        messages = messages[:disconnect_after]
        for message in messages:
            message["more_body"] = True
        messages.append({"type": "http.disconnect"})

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/jobs",
        "query_string": b"",
        "headers": headers,
    }
    return Request(scope, receive)


def spool(
    request: Request, tmp_dir: Path, max_bytes: int = 10_000_000, max_files: int = 100, **timeouts: float
) -> SpooledForm:
    return asyncio.run(spool_multipart(request, tmp_dir, max_bytes, max_files, **timeouts))


def left_in(tmp_dir: Path) -> list[str]:
    return sorted(p.name for p in tmp_dir.iterdir()) if tmp_dir.exists() else []


# ---- well-formed bodies ------------------------------------------------------------------------
def test_files_and_a_field_are_spooled_exactly(tmp_path: Path) -> None:
    scan = bytes(range(256)) * 40  # every byte value, CR and LF included
    body = body_of(
        part(FILE_FIELD, scan, "a.jpg", b"Content-Type: image/jpeg\r\n"),
        part(FILE_FIELD, b"second", "b.png"),
        part("callback_url", b"https://example.org/hook"),
    )
    form = spool(request_for(body), tmp_path / "tmp")

    assert [f.filename for f in form.files] == [b"a.jpg", b"b.png"]
    assert [f.size for f in form.files] == [len(scan), 6]
    assert form.files[0].path.read_bytes() == scan
    assert form.files[1].path.read_bytes() == b"second"
    assert form.fields == {"callback_url": "https://example.org/hook"}
    # Spool files are named by the parser, never after the client's filename.
    for spooled in form.files:
        assert spooled.path.parent == tmp_path / "tmp" and spooled.path.name.startswith("upload-")
    form.cleanup()
    assert left_in(tmp_path / "tmp") == []


@pytest.mark.parametrize("chunk", [1, 2, 7, 61, 4096])
def test_any_chunking_gives_the_same_form(tmp_path: Path, chunk: int) -> None:
    # The data holds most of the delimiter (CRLF, dashes, all but the boundary's last bytes): the
    # parser must not end the part early, wherever the chunks split it.
    tricky = b"head\r\n--" + BOUNDARY[:-3].encode() + b"\r\n-\r\n--" + BOUNDARY[:5].encode() + b" tail"
    body = body_of(part(FILE_FIELD, tricky, "t.bin"), part("callback_url", b"https://h.example/x"))
    form = spool(request_for(body, chunk=chunk), tmp_path / "tmp")
    assert [f.path.read_bytes() for f in form.files] == [tricky]
    assert form.files[0].size == len(tricky)
    assert form.fields == {"callback_url": "https://h.example/x"}


def test_empty_file_part_is_a_file_of_zero_bytes(tmp_path: Path) -> None:
    form = spool(request_for(body_of(part(FILE_FIELD, b"", "empty.jpg"))), tmp_path / "tmp")
    assert [(f.filename, f.size, f.path.read_bytes()) for f in form.files] == [(b"empty.jpg", 0, b"")]


def test_no_content_length_is_fine_when_the_body_is_within_the_cap(tmp_path: Path) -> None:
    body = body_of(part(FILE_FIELD, b"x" * 1000, "x.jpg"))
    form = spool(request_for(body, content_length=None, chunk=100), tmp_path / "tmp", max_bytes=len(body))
    assert [f.size for f in form.files] == [1000]


# ---- filenames ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("../../etc/passwd", b"../../etc/passwd"),  # kept as data; intake cleans it, storage ignores it
        ("caf\u00e9 \u00fcber.png", "caf\u00e9 \u00fcber.png".encode()),  # raw UTF-8 bytes
        (b"\xff\xfe not utf-8.jpg", b"\xff\xfe not utf-8.jpg"),  # undecodable: still bytes, no error
        ("C:\\Users\\doctor\\scan.jpg", b"scan.jpg"),  # an old browser's full Windows path
    ],
)
def test_filenames_are_kept_as_bytes_and_never_name_the_spool_file(
    tmp_path: Path, sent: str | bytes, kept: bytes
) -> None:
    form = spool(request_for(body_of(part(FILE_FIELD, b"data", sent))), tmp_path / "tmp")
    (spooled,) = form.files
    assert spooled.filename == kept
    assert spooled.path.parent == tmp_path / "tmp" and spooled.path.name.startswith("upload-")
    assert spooled.path.read_bytes() == b"data"


def test_a_files_part_without_a_filename_is_still_a_file(tmp_path: Path) -> None:
    form = spool(request_for(body_of(part(FILE_FIELD, b"anonymous"))), tmp_path / "tmp")
    assert [(f.filename, f.path.read_bytes()) for f in form.files] == [(None, b"anonymous")]


def test_a_file_under_another_field_name_is_read_and_dropped(tmp_path: Path) -> None:
    body = body_of(part("attachment", b"not a scan", "x.jpg"), part(FILE_FIELD, b"scan", "s.jpg"))
    form = spool(request_for(body), tmp_path / "tmp")
    assert [f.filename for f in form.files] == [b"s.jpg"]
    assert form.fields == {}
    assert left_in(tmp_path / "tmp") == [form.files[0].path.name]  # no spool file for the dropped one


# ---- size and part limits: 413 ---------------------------------------------------------------------
def test_declared_length_over_the_cap_is_refused_before_reading(tmp_path: Path) -> None:
    body = body_of(part(FILE_FIELD, b"x" * 2000, "x.jpg"))
    with pytest.raises(UploadTooLarge, match=rf"^request body of {len(body)} bytes$"):
        spool(request_for(body), tmp_path / "tmp", max_bytes=1000)
    assert left_in(tmp_path / "tmp") == []


def test_a_lying_content_length_is_caught_while_streaming(tmp_path: Path) -> None:
    body = body_of(part(FILE_FIELD, b"x" * 5000, "x.jpg"))
    with pytest.raises(UploadTooLarge, match=r"^request body over 1000 bytes$"):
        spool(request_for(body, content_length="10", chunk=300), tmp_path / "tmp", max_bytes=1000)
    assert left_in(tmp_path / "tmp") == []  # the partly written spool file is gone


def test_no_content_length_and_over_the_cap_is_refused(tmp_path: Path) -> None:
    body = body_of(part(FILE_FIELD, b"a" * 600, "a.jpg"), part(FILE_FIELD, b"b" * 600, "b.jpg"))
    with pytest.raises(UploadTooLarge, match=r"^request body over 1000 bytes$"):
        spool(request_for(body, content_length=None, chunk=256), tmp_path / "tmp", max_bytes=1000)
    assert left_in(tmp_path / "tmp") == []


def test_a_body_of_exactly_the_cap_is_accepted(tmp_path: Path) -> None:
    body = body_of(part(FILE_FIELD, b"z" * 500, "z.jpg"))
    form = spool(request_for(body, chunk=64), tmp_path / "tmp", max_bytes=len(body))
    assert [f.size for f in form.files] == [500]


def test_more_files_than_allowed_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    body = body_of(*(part(FILE_FIELD, f"scan {i}".encode(), f"{i}.jpg") for i in range(3)))
    with pytest.raises(TooManyFiles, match=r"^more than 2 files in one request$"):
        spool(request_for(body, chunk=16), tmp_path / "tmp", max_files=2)
    assert left_in(tmp_path / "tmp") == []  # the two parts already spooled are removed


def test_exactly_the_allowed_number_of_files_plus_form_fields_is_accepted(tmp_path: Path) -> None:
    # Form fields do not count towards the file limit (they did: a full job plus callback_url was 413).
    files = [part(FILE_FIELD, f"scan {i}".encode(), f"{i}.jpg") for i in range(3)]
    body = body_of(*files, part("callback_url", b"http://example.org/done"), part("gradcam", b"true"))
    form = spool(request_for(body), tmp_path / "tmp", max_files=3)
    assert [f.path.read_bytes() for f in form.files] == [b"scan 0", b"scan 1", b"scan 2"]
    assert form.fields == {"callback_url": "http://example.org/done", "gradcam": "true"}


def test_form_fields_past_their_count_are_malformed(tmp_path: Path) -> None:
    body = body_of(*(part(f"f{i}", b"x") for i in range(MAX_FIELDS + 1)))
    with pytest.raises(MalformedUpload, match=rf"^more than {MAX_FIELDS} form fields$"):
        spool(request_for(body), tmp_path / "tmp")


def test_malformed_body_errors_quote_nothing_from_the_body(tmp_path: Path) -> None:
    # python-multipart says e.g. "Expected boundary character 45, got 115 at index 4": bytes of the body.
    for body in (b"--" + b"secret" * 10 + b"\r\n", b"--" + BOUNDARY.encode() + b"!secret\r\n"):
        with pytest.raises(MalformedUpload) as refused:
            spool(request_for(body, chunk=7), tmp_path / "tmp")
        assert str(refused.value) == "malformed multipart body"
    assert left_in(tmp_path / "tmp") == []


def stalled_request(body: bytes, chunks_before_stall: int) -> Request:
    """A client that sends a few chunks of ``body`` and then nothing more (a slow-loris body)."""
    chunks = [body[i : i + 16] for i in range(0, len(body), 16)][:chunks_before_stall]

    async def receive() -> dict:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": True}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/jobs",
        "query_string": b"",
        "headers": [(b"content-type", CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode())],
    }
    return Request(scope, receive)


def test_a_stalled_body_times_out_and_leaves_nothing(tmp_path: Path) -> None:
    body = body_of(part(FILE_FIELD, b"x" * 1000, "a.jpg"))
    with pytest.raises(UploadTimeout):
        spool(stalled_request(body, 4), tmp_path / "tmp", idle_timeout_s=0.2, timeout_s=60)
    assert left_in(tmp_path / "tmp") == []  # the spool file of the part begun is removed


def test_a_body_that_keeps_trickling_meets_the_overall_deadline(tmp_path: Path) -> None:
    body = body_of(part(FILE_FIELD, b"x" * 100_000, "a.jpg"))
    chunks = [body[i : i + 10] for i in range(0, len(body), 10)]

    async def receive() -> dict:
        await asyncio.sleep(0.01)  # always under the idle timeout
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    request = stalled_request(body, 0)
    request._receive = receive  # the same request, trickling instead of stalling
    with pytest.raises(UploadTimeout):
        spool(request, tmp_path / "tmp", idle_timeout_s=5, timeout_s=0.3)
    assert left_in(tmp_path / "tmp") == []


# ---- malformed bodies: 400 ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/json",
        "multipart/form-data",
        "multipart/mixed; boundary=abc",
        "text/plain; boundary=x",
    ],
)
def test_not_multipart_form_data_with_a_boundary_is_malformed(content_type: str | None) -> None:
    with pytest.raises(MalformedUpload, match=r"^expected a multipart/form-data body \(with a boundary\)$"):
        boundary_of(content_type)


def test_boundary_is_read_from_the_content_type() -> None:
    assert boundary_of(CONTENT_TYPE) == BOUNDARY.encode()
    assert boundary_of('Multipart/Form-Data; boundary="quoted-b"') == b"quoted-b"


def test_wrong_content_type_stores_nothing(tmp_path: Path) -> None:
    body = body_of(part(FILE_FIELD, b"x", "x.jpg"))
    with pytest.raises(MalformedUpload, match="expected a multipart/form-data body"):
        spool(request_for(body, content_type="application/octet-stream"), tmp_path / "tmp")
    assert left_in(tmp_path / "tmp") == []


def test_an_invalid_content_length_is_malformed(tmp_path: Path) -> None:
    with pytest.raises(MalformedUpload, match=r"^invalid Content-Length header$"):
        spool(request_for(body_of(), content_length="ten"), tmp_path / "tmp")


def test_a_body_without_its_closing_boundary_is_malformed(tmp_path: Path) -> None:
    body = body_of(part(FILE_FIELD, b"cut short", "x.jpg"), closed=False)
    with pytest.raises(MalformedUpload, match=r"^multipart body ended before its closing boundary$"):
        spool(request_for(body, chunk=5), tmp_path / "tmp")
    assert left_in(tmp_path / "tmp") == []


def test_a_body_with_another_boundary_is_malformed(tmp_path: Path) -> None:
    body = body_of(part(FILE_FIELD, b"x", "x.jpg"), boundary="some-other-boundary")
    with pytest.raises(MalformedUpload, match=r"^malformed multipart body$"):
        spool(request_for(body), tmp_path / "tmp")
    assert left_in(tmp_path / "tmp") == []


def test_an_empty_body_is_malformed(tmp_path: Path) -> None:
    with pytest.raises(MalformedUpload, match=r"^multipart body ended before its closing boundary$"):
        spool(request_for(b""), tmp_path / "tmp")


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Type: image/jpeg\r\n",  # no Content-Disposition at all
        b'Content-Disposition: attachment; name="files"\r\n',  # not form-data
        b'Content-Disposition: form-data; filename="x.jpg"\r\n',  # no name
    ],
)
def test_a_part_without_a_form_data_name_is_malformed(tmp_path: Path, headers: bytes) -> None:
    good = part(FILE_FIELD, b"good", "good.jpg")
    body = body_of(good, headers + b"\r\nbad")
    with pytest.raises(
        MalformedUpload, match=r"^each part needs 'Content-Disposition: form-data; name=...'$"
    ):
        spool(request_for(body), tmp_path / "tmp")
    assert left_in(tmp_path / "tmp") == []  # the good part spooled before it is removed too


def test_a_form_field_over_its_cap_is_malformed(tmp_path: Path) -> None:
    body = body_of(part("callback_url", b"h" * (MAX_FIELD_BYTES + 1)))
    with pytest.raises(MalformedUpload, match=rf"^a form field is longer than {MAX_FIELD_BYTES} bytes$"):
        spool(request_for(body, chunk=1000), tmp_path / "tmp")


def test_a_form_field_of_exactly_its_cap_is_kept(tmp_path: Path) -> None:
    value = b"h" * MAX_FIELD_BYTES
    form = spool(request_for(body_of(part("callback_url", value))), tmp_path / "tmp")
    assert form.fields == {"callback_url": value.decode()}


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        # two headers, each under the cap, together over it: our own count
        (b"X-A: " + b"p" * 9000 + b"\r\n" + b"X-B: " + b"p" * 9000 + b"\r\n", r"^part headers too long$"),
        # one header over the cap: python-multipart's own limit
        (
            b"X-A: " + b"p" * (MAX_HEADER_BYTES + 1) + b"\r\n",
            r"^part headers too long$",
        ),
        # many short headers
        (
            b"".join(b"X-%d: v\r\n" % i for i in range(200)),
            r"^too many part headers$",
        ),
    ],
)
def test_part_headers_over_their_limits_are_malformed(tmp_path: Path, headers: bytes, reason: str) -> None:
    body = body_of(part(FILE_FIELD, b"x", "x.jpg", headers))
    with pytest.raises(MalformedUpload, match=reason):
        spool(request_for(body, chunk=4096), tmp_path / "tmp")
    assert left_in(tmp_path / "tmp") == []


def test_a_10_kb_file_name_fits_under_the_header_cap(tmp_path: Path) -> None:
    name = "n" * 10_000 + ".jpg"
    form = spool(request_for(body_of(part(FILE_FIELD, b"x", name)), chunk=999), tmp_path / "tmp")
    assert [f.filename for f in form.files] == [name.encode()]


def test_a_client_that_disconnects_mid_upload_leaves_nothing(tmp_path: Path) -> None:
    body = body_of(part(FILE_FIELD, b"x" * 4000, "x.jpg"))
    request = request_for(body, chunk=500, disconnect_after=3)
    with pytest.raises(MalformedUpload, match=r"^client disconnected during the upload$"):
        spool(request, tmp_path / "tmp")
    assert left_in(tmp_path / "tmp") == []


def test_spooled_bytes_hash_like_the_original(tmp_path: Path) -> None:
    """A larger scan, in network-sized chunks: the spooled file is the uploaded file, bit for bit."""
    scan = hashlib.sha256(b"seed").digest() * 20_000  # 640 KB
    form = spool(request_for(body_of(part(FILE_FIELD, scan, "big.dcm")), chunk=16_384), tmp_path / "tmp")
    (spooled,) = form.files
    assert spooled.size == len(scan)
    assert hashlib.sha256(spooled.path.read_bytes()).hexdigest() == hashlib.sha256(scan).hexdigest()
