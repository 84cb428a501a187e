"""Input fetching and output delivery against real loopback servers (moto S3 in a subprocess, https)."""

from __future__ import annotations

import base64
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from multitalk_worker.config import Settings
from multitalk_worker.errors import WorkerError
from multitalk_worker.schema import parse_source
from multitalk_worker.storage import (
    InputFetcher,
    base64_size,
    deliver_base64,
    deliver_s3,
    deliver_volume,
    make_s3_client,
    sniff,
)
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
    expect("INPUT_FETCH_FAILED", lambda: fetch(make_settings(), "inputs/none.png", tmp_path / "x"))


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
    assert "no such key" in missing.message
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
    expect("INVALID_INPUT", lambda: deliver_s3(video, "k.mp4", no_bucket, make_s3_client(no_bucket)))


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
    expect("INVALID_INPUT", lambda: deliver_volume(video, "../escape.mp4", make_settings()))
