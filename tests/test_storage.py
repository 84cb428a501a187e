"""Input fetching and output delivery against real loopback servers (moto S3 in a subprocess, https)."""

from __future__ import annotations

import base64
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError

from multitalk_worker.config import Settings
from multitalk_worker.errors import WorkerError
from multitalk_worker.io.delivery import (
    Base64Delivery,
    S3Delivery,
    base64_size,
    deliver_base64,
    deliver_s3,
    deliver_volume,
    part_delivery,
)
from multitalk_worker.io.fetch import InputFetcher, sniff
from multitalk_worker.io.s3 import make_s3_client, s3_reason, s3_retryable, upload_reason
from multitalk_worker.io.volume import volume_destination
from multitalk_worker.schema import parse_source
from multitalk_worker.url_policy import address_problem
from tests.conftest import EXAMPLES
from tests.servers import INPUT_BUCKET, OUTPUT_BUCKET, HttpsServer, S3Server, free_port

PNG = (EXAMPLES / "person.png").read_bytes()
WAV = (EXAMPLES / "speech_a.wav").read_bytes()


def fetch(settings: Settings, text: str, dest: Path, kind: str = "image") -> Path:
    return InputFetcher(settings).fetch(parse_source(text), dest, kind, "image").path  # type: ignore[arg-type]


def expect(code: str, call: Callable[[], object]) -> WorkerError:
    with pytest.raises(WorkerError) as info:
        call()
    assert info.value.code == code, info.value.to_dict()
    return info.value


# ----------------------------------------------------------------------------- magic bytes


@pytest.mark.parametrize(
    ("head", "kind", "name"),
    [
        (PNG[:16], "image", "png"),
        (b"\xff\xd8\xff\xe0" + bytes(12), "image", "jpeg"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image", "webp"),
        (b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00", "image", "heif"),  # an iPhone photo
        (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00", "image", "heif"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "image", "avif"),
        (b"II*\x00" + bytes(12), "image", "tiff"),
        (b"MM\x00*" + bytes(12), "image", "tiff"),
        (b"\x00\x00\x00\x1cftypisom\x00\x00\x00\x00", "image", None),  # an mp4 is no image
        (WAV[:16], "audio", "wav"),
        (b"ID3\x04" + bytes(12), "audio", "mp3"),
        (b"\x00\x00\x00\x20ftypM4A " + bytes(4), "audio", "mp4"),
        (b"fLaC" + bytes(12), "audio", "flac"),
        (b"<html><body>", "image", None),
        (PNG[:16], "audio", None),
        (WAV[:16], "image", None),
    ],
)
def test_sniff(head: bytes, kind: str, name: str | None) -> None:
    assert sniff(head, kind) == name  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- volume paths and inline data


def test_volume_path_is_used_in_place(
    make_settings: Callable[..., Settings], volume: Path, tmp_path: Path
) -> None:
    path = fetch(make_settings(), "inputs/person.png", tmp_path / "x")
    assert path == (volume / "inputs" / "person.png").resolve()
    assert fetch(make_settings(), str(volume / "inputs" / "person.png"), tmp_path / "x") == path


@pytest.mark.parametrize("text", ["../outside.png", "/etc/hostname", "inputs/../../outside.png"])
def test_paths_outside_the_volume_are_refused(
    make_settings: Callable[..., Settings], volume: Path, tmp_path: Path, text: str
) -> None:
    (volume.parent / "outside.png").write_bytes(PNG)
    error = expect("INVALID_INPUT", lambda: fetch(make_settings(), text, tmp_path / "x"))
    assert "volume root" in error.message


def test_symlink_out_of_the_volume_is_refused(
    make_settings: Callable[..., Settings], volume: Path, tmp_path: Path
) -> None:
    (tmp_path / "secret.png").write_bytes(PNG)
    (volume / "link.png").symlink_to(tmp_path / "secret.png")
    expect("INVALID_INPUT", lambda: fetch(make_settings(), "link.png", tmp_path / "x"))


def test_missing_volume_file(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """The job names a file that is not there: INVALID_INPUT, not a retryable fetch failure."""
    error = expect("INVALID_INPUT", lambda: fetch(make_settings(), "inputs/none.png", tmp_path / "x"))
    assert "no such file on the volume" in error.message and not error.retryable


def test_volume_name_over_the_file_system_limit(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    error = expect(
        "INVALID_INPUT", lambda: fetch(make_settings(), "inputs/" + "a" * 300 + ".png", tmp_path / "x")
    )
    assert "304 bytes" in error.message and "at most 255 bytes" in error.message


def test_data_uri_and_bare_base64(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    encoded = base64.b64encode(PNG).decode()
    assert fetch(make_settings(), "data:image/png;base64," + encoded, tmp_path / "a").read_bytes() == PNG
    assert fetch(make_settings(), encoded, tmp_path / "b").read_bytes() == PNG


def test_inline_checks(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    expect("INVALID_INPUT", lambda: fetch(make_settings(), "data:image/png;base64,@@@@", tmp_path / "a"))
    big = base64.b64encode(PNG + bytes(2_000_000)).decode()
    expect("INPUT_TOO_LARGE", lambda: fetch(make_settings(MULTITALK_MAX_INPUT_MB="1"), big, tmp_path / "b"))
    text = base64.b64encode(b"GIF0" + bytes(100)).decode()
    expect("IMAGE_DECODE_FAILED", lambda: fetch(make_settings(), text, tmp_path / "c"))
    expect(
        "AUDIO_DECODE_FAILED", lambda: fetch(make_settings(), "inputs/person.png", tmp_path / "d", "audio")
    )


# ----------------------------------------------------------------------------- https


def https_settings(make_settings: Callable[..., Settings], server: HttpsServer, **env: str) -> Settings:
    return make_settings(MULTITALK_CA_BUNDLE=str(server.ca_bundle), **env)


def test_https_fetch(
    make_settings: Callable[..., Settings], https_server: HttpsServer, tmp_path: Path
) -> None:
    url = https_server.add("/person.png", PNG, "image/png")
    settings = https_settings(make_settings, https_server)
    assert fetch(settings, url, tmp_path / "a").read_bytes() == PNG
    audio = https_server.add("/speech.wav", WAV, "audio/wav")
    assert fetch(settings, audio, tmp_path / "b", "audio").read_bytes() == WAV
    redirected = f"{https_server.base_url}/redirect?to={url}"
    assert fetch(settings, redirected, tmp_path / "c").read_bytes() == PNG


def test_https_failures(
    make_settings: Callable[..., Settings], https_server: HttpsServer, tmp_path: Path
) -> None:
    settings = https_settings(
        make_settings, https_server, MULTITALK_MAX_INPUT_MB="1", MULTITALK_FETCH_TIMEOUT_S="1"
    )
    base = https_server.base_url
    expect("INPUT_FETCH_FAILED", lambda: fetch(settings, f"{base}/status/404", tmp_path / "a"))
    page = https_server.add("/page.png", b"<html>hello</html>", "text/html")
    assert "text/html" in expect("IMAGE_DECODE_FAILED", lambda: fetch(settings, page, tmp_path / "b")).message
    not_png = https_server.add("/fake.png", b"<html>hello</html>", "image/png")
    expect("IMAGE_DECODE_FAILED", lambda: fetch(settings, not_png, tmp_path / "c"))
    declared = https_server.add("/big.png", PNG + bytes(1_100_000), "image/png")
    expect("INPUT_TOO_LARGE", lambda: fetch(settings, declared, tmp_path / "d"))
    expect("INPUT_TOO_LARGE", lambda: fetch(settings, f"{base}/huge", tmp_path / "e", "audio"))
    to_http = f"{base}/redirect?to=http://{base.removeprefix('https://')}/person.png"
    expect("INVALID_INPUT", lambda: fetch(settings, to_http, tmp_path / "f"))


@pytest.mark.parametrize("path", ["/slow", "/stall"])
def test_https_time_limit(
    make_settings: Callable[..., Settings], https_server: HttpsServer, tmp_path: Path, path: str
) -> None:
    import time

    settings = https_settings(make_settings, https_server, MULTITALK_FETCH_TIMEOUT_S="1")
    start = time.monotonic()
    error = expect(
        "INPUT_FETCH_FAILED", lambda: fetch(settings, https_server.base_url + path, tmp_path / "a")
    )
    assert "timed out" in error.message
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize(
    ("location", "problem"),
    [
        ("https://user:secret@{host}/person.png", "credentials in URLs are not accepted"),
        ("https://{hostname}:99999/person.png", "port '99999' is not a TCP port"),
        ("https://{hostname}:abc/person.png", "port 'abc' is not a TCP port"),
        ("https://{hostname}:-1/person.png", "port '-1' is not a TCP port"),
        ("https://[2002:a9fe:a9fe::1]/latest", "wraps 169.254.169.254"),
    ],
)
def test_every_redirect_passes_the_first_urls_checks(
    make_settings: Callable[..., Settings],
    https_server: HttpsServer,
    tmp_path: Path,
    location: str,
    problem: str,
) -> None:
    """Credentials, bad ports, wrapped private addresses: refused after a redirect as on the first URL."""
    https_server.add("/person.png", PNG, "image/png")
    host = https_server.base_url.removeprefix("https://")
    target = location.format(host=host, hostname=host.rsplit(":", 1)[0])
    settings = https_settings(make_settings, https_server)
    redirected = f"{https_server.base_url}/redirect?to={quote(target, safe='')}"
    error = expect("INVALID_INPUT", lambda: fetch(settings, redirected, tmp_path / "a"))
    assert problem in error.message and "secret" not in error.message


@pytest.mark.parametrize("port", ["99999", "abc", "-1", "0"])
def test_invalid_port_in_the_first_url(port: str) -> None:
    with pytest.raises(ValueError, match="is not a TCP port"):
        parse_source(f"https://example.com:{port}/a.png")


def test_http_client_errors_are_not_retryable(
    make_settings: Callable[..., Settings], https_server: HttpsServer, tmp_path: Path
) -> None:
    settings = https_settings(make_settings, https_server)
    base = https_server.base_url
    assert not expect(
        "INPUT_FETCH_FAILED", lambda: fetch(settings, f"{base}/status/404", tmp_path / "a")
    ).retryable
    assert expect(
        "INPUT_FETCH_FAILED", lambda: fetch(settings, f"{base}/status/503", tmp_path / "b")
    ).retryable


def test_untrusted_certificate_is_refused(
    make_settings: Callable[..., Settings], https_server: HttpsServer, tmp_path: Path
) -> None:
    url = https_server.add("/person.png", PNG, "image/png")
    expect("INPUT_FETCH_FAILED", lambda: fetch(make_settings(), url, tmp_path / "a"))


@pytest.mark.parametrize(
    "url",
    [
        "https://10.0.0.1/a.png",
        "https://169.254.169.254/latest",
        "https://192.168.1.1/a.png",
        "https://[fd00::1]/a",
    ],
)
def test_private_and_link_local_are_refused(
    make_settings: Callable[..., Settings], tmp_path: Path, url: str
) -> None:
    error = expect("INVALID_INPUT", lambda: fetch(make_settings(), url, tmp_path / "a"))
    assert "not a public address" in error.message


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("[fec0::1]", "a site-local address"),
        ("[2002:a9fe:a9fe::1]", "wraps 169.254.169.254"),  # 6to4 around the metadata service
        ("[2002:a00:1::1]", "wraps 10.0.0.1"),
        ("[2001:0:4136:e378:8000:63bf:f5f6:f5f6]", "wraps 10.9.10.9"),  # Teredo, client 10.9.10.9
        ("[64:ff9b::a9fe:a9fe]", "wraps 169.254.169.254"),  # NAT64
        ("[::ffff:192.168.1.1]", "wraps 192.168.1.1"),  # IPv4-mapped
        ("[::ffff:127.0.0.1]", "wraps 127.0.0.1, a loopback address"),
        ("[64:ff9b:1::1]", "a local-use NAT64 address"),
    ],
)
def test_ipv6_forms_that_wrap_private_addresses_are_refused(
    make_settings: Callable[..., Settings], tmp_path: Path, host: str, problem: str
) -> None:
    settings = make_settings(MULTITALK_ALLOW_LOOPBACK="false")
    error = expect("INVALID_INPUT", lambda: fetch(settings, f"https://{host}/a.png", tmp_path / "a"))
    assert problem in error.message


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "2002:808:808::1", "64:ff9b::808:808"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(address, allow_loopback=False) is None


def test_loopback_needs_the_setting(
    make_settings: Callable[..., Settings], https_server: HttpsServer, tmp_path: Path
) -> None:
    url = https_server.add("/person.png", PNG, "image/png")
    settings = https_settings(make_settings, https_server, MULTITALK_ALLOW_LOOPBACK="false")
    expect("INVALID_INPUT", lambda: fetch(settings, url, tmp_path / "a"))


# ----------------------------------------------------------------------------- s3 inputs


def test_s3_fetch(make_settings: Callable[..., Settings], s3_server: S3Server, tmp_path: Path) -> None:
    s3_server.client().put_object(Bucket=INPUT_BUCKET, Key="in/speech.wav", Body=WAV)
    settings = make_settings(**s3_server.env())
    path = fetch(settings, f"s3://{INPUT_BUCKET}/in/speech.wav", tmp_path / "a", "audio")
    assert path.read_bytes() == WAV


def test_s3_fetch_failures(
    make_settings: Callable[..., Settings], s3_server: S3Server, tmp_path: Path
) -> None:
    s3_server.client().put_object(Bucket=INPUT_BUCKET, Key="in/big.wav", Body=WAV + bytes(1_100_000))
    settings = make_settings(**s3_server.env())
    missing = expect(
        "INPUT_FETCH_FAILED", lambda: fetch(settings, f"s3://{INPUT_BUCKET}/nope.wav", tmp_path / "a")
    )
    assert "no such key" in missing.message and not missing.retryable
    no_bucket = expect(
        "INPUT_FETCH_FAILED", lambda: fetch(settings, "s3://no-such-bucket/a.wav", tmp_path / "n")
    )
    assert "no such bucket" in no_bucket.message and not no_bucket.retryable
    denied_settings = make_settings(**s3_server.env(s3_server.reader_denied))
    denied = expect(
        "INPUT_FETCH_FAILED",
        lambda: fetch(denied_settings, f"s3://{INPUT_BUCKET}/in/big.wav", tmp_path / "b"),
    )
    assert "access denied" in denied.message
    small = make_settings(MULTITALK_MAX_INPUT_MB="1", **s3_server.env())
    expect(
        "INPUT_TOO_LARGE", lambda: fetch(small, f"s3://{INPUT_BUCKET}/in/big.wav", tmp_path / "c", "audio")
    )


def test_s3_server_down(make_settings: Callable[..., Settings], s3_server: S3Server, tmp_path: Path) -> None:
    env = {**s3_server.env(), "MULTITALK_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    error = expect(
        "INPUT_FETCH_FAILED", lambda: fetch(make_settings(**env), "s3://inputs/a.png", tmp_path / "a")
    )
    assert "unreachable" in error.message


# ----------------------------------------------------------------------------- delivery


def test_deliver_s3_round_trip(
    make_settings: Callable[..., Settings], s3_server: S3Server, tmp_path: Path
) -> None:
    video = tmp_path / "v.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(5000))
    settings = make_settings(MULTITALK_S3_URL_EXPIRY_S="600", **s3_server.env())
    out = deliver_s3(video, "multitalk/job-1.mp4", settings, make_s3_client(settings))
    assert (out["bucket"], out["key"], out["url_expires_in_s"]) == (OUTPUT_BUCKET, "multitalk/job-1.mp4", 600)
    query = parse_qs(urlsplit(str(out["url"])).query)
    assert query["X-Amz-Expires"] == ["600"] and "X-Amz-Signature" in query
    s3_server.enforce_auth(False)  # moto cannot check presigned signatures; it still routes bucket and key
    try:
        with urllib.request.urlopen(str(out["url"]), timeout=10) as response:
            assert response.read() == video.read_bytes()
            assert response.headers["Content-Type"] == "video/mp4"
    finally:
        s3_server.enforce_auth(True)
    head = s3_server.client().head_object(Bucket=OUTPUT_BUCKET, Key="multitalk/job-1.mp4")
    assert head["ContentType"] == "video/mp4"


def test_deliver_s3_failures(
    make_settings: Callable[..., Settings], s3_server: S3Server, tmp_path: Path
) -> None:
    video = tmp_path / "v.mp4"
    video.write_bytes(bytes(100))
    denied = make_settings(**s3_server.env(s3_server.reader_denied))
    error = expect("UPLOAD_FAILED", lambda: deliver_s3(video, "k.mp4", denied, make_s3_client(denied)))
    assert "access denied" in error.message
    down = make_settings(
        **{**s3_server.env(), "MULTITALK_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    )
    expect("UPLOAD_FAILED", lambda: deliver_s3(video, "k.mp4", down, make_s3_client(down)))
    no_bucket = make_settings(**s3_server.env(bucket=None))
    expect("INVALID_INPUT", S3Delivery(no_bucket, "k.mp4", lambda: make_s3_client(no_bucket)).check)
    missing = make_settings(**s3_server.env(bucket="no-such-bucket"))
    error = expect("UPLOAD_FAILED", S3Delivery(missing, "k.mp4", lambda: make_s3_client(missing)).check)
    assert "no such bucket" in error.message and not error.retryable


def test_the_part_so_far_beside_the_video(
    make_settings: Callable[..., Settings], s3_server: S3Server, tmp_path: Path
) -> None:
    """S3 delivery with MULTITALK_S3_PART (the default) takes the part so far at `<key>.part`, replaced at
    each upload; `remove_part` deletes it (a second time is no error). With the setting off, and for the
    other deliveries, there is no part delivery."""
    settings = make_settings(**s3_server.env())
    delivery = S3Delivery(settings, "multitalk/job-3.mp4", lambda: make_s3_client(settings))
    part = part_delivery(delivery, settings)
    assert part is delivery
    client, video = s3_server.client(), tmp_path / "part.mp4"
    for size in (3000, 5000):
        video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(size))
        out = part.deliver_part(video)
        assert out["key"] == "multitalk/job-3.mp4.part" and "X-Amz-Signature=" in str(out["url"])
        head = client.head_object(Bucket=OUTPUT_BUCKET, Key="multitalk/job-3.mp4.part")
        assert (head["ContentLength"], head["ContentType"]) == (size + 12, "video/mp4")
    part.remove_part()
    part.remove_part()
    assert client.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix="multitalk/job-3")["KeyCount"] == 0
    off = make_settings(MULTITALK_S3_PART="false", **s3_server.env())
    assert part_delivery(S3Delivery(off, "multitalk/job-3.mp4", lambda: make_s3_client(off)), off) is None
    assert part_delivery(Base64Delivery(settings), settings) is None


def test_deliver_base64(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    video.write_bytes(bytes(range(256)) * 10)
    out = deliver_base64(video, make_settings())
    assert base64.b64decode(str(out["base64"])) == video.read_bytes()
    assert len(str(out["base64"])) == base64_size(2560)
    error = expect(
        "OUTPUT_TOO_LARGE", lambda: deliver_base64(video, make_settings(MULTITALK_MAX_BASE64_MB="0.001"))
    )
    assert "s3" in error.message and "volume" in error.message


def test_deliver_volume(make_settings: Callable[..., Settings], volume: Path, tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    video.write_bytes(b"video-bytes")
    out = deliver_volume(video, "outputs/a/b.mp4", make_settings())
    assert Path(str(out["path"])) == (volume / "outputs" / "a" / "b.mp4").resolve()
    assert Path(str(out["path"])).read_bytes() == b"video-bytes"
    assert sorted(p.name for p in (volume / "outputs" / "a").iterdir()) == ["b.mp4"]
    assert Path(str(out["path"])).stat().st_mode & 0o777 == 0o644  # readable by others, as the CLI's files
    expect("INVALID_INPUT", lambda: deliver_volume(video, "../escape.mp4", make_settings()))


def test_volume_destination_is_checked_before_writing(
    make_settings: Callable[..., Settings], volume: Path
) -> None:
    settings = make_settings()
    assert (
        volume_destination("renders/new/a.mp4", settings) == (volume / "renders" / "new" / "a.mp4").resolve()
    )
    assert (volume / "renders" / "new").is_dir() and not list((volume / "renders" / "new").iterdir())
    (volume / "renders" / "file").write_bytes(b"x")
    error = expect("INVALID_INPUT", lambda: volume_destination("renders/file/a.mp4", settings))
    assert "a part of the folder is a file" in error.message
    error = expect("INVALID_INPUT", lambda: volume_destination("renders/" + "b" * 260 + ".mp4", settings))
    assert "at most 255 bytes" in error.message
    expect("INVALID_INPUT", lambda: volume_destination("renders", settings))


def _raised_in_handling(code: str, http_status: int) -> S3UploadFailedError:
    """An S3UploadFailedError raised while handling S3's ClientError, as boto3's upload_file raises it."""
    answer = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": http_status}}
    try:
        try:
            raise ClientError(answer, "PutObject")  # type: ignore[arg-type]
        except ClientError:
            raise S3UploadFailedError("Failed to upload a.mp4 to b/a.mp4: ...") from None
    except S3UploadFailedError as exc:
        return exc


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [
        ("AccessDenied", 403, "access denied"),
        ("NoSuchBucket", 404, "no such bucket"),
        ("InvalidAccessKeyId", 403, "access denied (unknown access key)"),
        ("SlowDown", 503, "S3 error SlowDown"),
    ],
)
def test_s3_faults_by_error_code(code: str, status: int, reason: str) -> None:
    """S3's answers are read from `exc.response["Error"]["Code"]`, through boto3's wrapper too."""
    wrapped = _raised_in_handling(code, status)
    assert upload_reason(wrapped) == reason
    assert s3_reason(wrapped.__context__) == reason  # type: ignore[arg-type]
    assert s3_retryable(wrapped.__context__) is (status >= 500)  # type: ignore[arg-type]
    # never by the message: a wrapper that only says AccessDenied in its text has no code to read
    bare = S3UploadFailedError("Failed to upload: An error occurred (AccessDenied) ... Forbidden 403")
    assert upload_reason(bare) == "S3 endpoint unreachable or refused (S3UploadFailedError)"
