"""Real servers on loopback for the tests: an S3-compatible server (moto, in its own process) and an https
file server with a self-signed certificate made here. Nothing is mocked: the worker talks to them over
sockets exactly as it talks to AWS or a public web server.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import boto3
from botocore.config import Config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"
INPUT_BUCKET = "inputs"
OUTPUT_BUCKET = "outputs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """An ASGI app (the local API) served by uvicorn in a thread of this process on 127.0.0.1; yields its
    base URL, and on exit stops it and waits for it (a running job stops at its next step)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://{LOOPBACK}:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=300)


# ----------------------------------------------------------------------------- S3 (moto server)


@dataclass
class S3Server:
    """moto's standalone server in a subprocess, with IAM auth enforced after setup.

    `writer` may do anything; `reader_denied` has no S3 permission (every S3 call is AccessDenied).
    """

    endpoint: str
    process: subprocess.Popen[bytes]
    writer: tuple[str, str] = ("", "")
    reader_denied: tuple[str, str] = ("", "")

    def client(self, keys: tuple[str, str] | None = None) -> Any:
        key_id, secret = keys or self.writer
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": 1}),
        )

    def env(self, keys: tuple[str, str] | None = None, bucket: str | None = OUTPUT_BUCKET) -> dict[str, str]:
        key_id, secret = keys or self.writer
        env = {
            "MULTITALK_S3_ENDPOINT_URL": self.endpoint,
            "MULTITALK_S3_ACCESS_KEY_ID": key_id,
            "MULTITALK_S3_SECRET_ACCESS_KEY": secret,
        }
        if bucket:
            env["MULTITALK_S3_BUCKET"] = bucket
        return env

    def enforce_auth(self, enforced: bool) -> None:
        """moto checks IAM on every call when enforced; it cannot check presigned URLs, so tests that GET one
        switch enforcement off around that GET."""
        body = b"0" if enforced else b"inf"
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=body,
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_s3_server() -> S3Server:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = S3Server(endpoint=f"http://{LOOPBACK}:{port}", process=process)
    try:
        _wait_for_port(port, process)
        _set_up(server)
    except BaseException:
        server.stop()
        raise
    return server


def _set_up(server: S3Server) -> None:
    """Buckets and two IAM users, then IAM enforcement switched on."""
    bootstrap = ("AKIDBOOTSTRAP0000000", "bootstrap-secret")  # accepted only before auth is enforced
    s3 = server.client(bootstrap)
    s3.create_bucket(Bucket=INPUT_BUCKET)
    s3.create_bucket(Bucket=OUTPUT_BUCKET)
    iam = boto3.client(
        "iam",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=bootstrap[0],
        aws_secret_access_key=bootstrap[1],
    )
    server.writer = _user_with_policy(iam, "writer", ["s3:*"])
    server.reader_denied = _user_with_policy(iam, "denied", ["sqs:ListQueues"])
    server.enforce_auth(True)


def _user_with_policy(iam: Any, name: str, actions: list[str]) -> tuple[str, str]:
    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the moto server exited during startup")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {LOOPBACK}:{port} after {timeout} s")


# ----------------------------------------------------------------------------- https file server


def write_self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost. Returns (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "multitalk-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@dataclass
class HttpsServer:
    """https on 127.0.0.1. `files` maps a path to (body, content type). Special paths:
    /slow (drips a byte every 0.2 s), /stall (headers, then silence), /huge (endless body, no length),
    /redirect?to=<url, percent-encoded or not> (302), /status/<code>. A POST (a webhook) is answered 200 and
    kept in `posts` as (path, parsed JSON body).
    """

    httpd: ThreadingHTTPServer
    ca_bundle: Path
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    posts: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"https://{LOOPBACK}:{self.httpd.server_address[1]}"

    def add(self, path: str, body: bytes, content_type: str) -> str:
        self.files[path] = (body, content_type)
        return self.base_url + path

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_https_server(directory: Path) -> HttpsServer:
    cert, key = write_self_signed(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    files: dict[str, tuple[bytes, str]] = {}
    posts: list[tuple[str, Any]] = []
    httpd = ThreadingHTTPServer((LOOPBACK, 0), _handler_for(files, posts))
    httpd.daemon_threads = True
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return HttpsServer(httpd=httpd, ca_bundle=cert, files=files, posts=posts)


def _handler_for(
    files: dict[str, tuple[bytes, str]], posts: list[tuple[str, Any]]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            return

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            posts.append((self.path, json.loads(self.rfile.read(length) or b"null")))
            self._send(200, b"ok", "text/plain")

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path, _, query = self.path.partition("?")
            try:
                if path in files:
                    body, content_type = files[path]
                    self._send(200, body, content_type)
                elif path == "/slow":
                    self._drip(b"\x89PNG\r\n\x1a\n" + bytes(1000), delay=0.2)
                elif path == "/stall":
                    self._headers(200, "image/png", None)
                    time.sleep(30)
                elif path == "/huge":
                    self._headers(200, "audio/wav", None)
                    chunk = b"RIFF\x00\x00\x00\x00WAVE" + bytes(65536 - 12)
                    for _ in range(100_000):
                        self.wfile.write(chunk)
                elif path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", unquote(query.removeprefix("to=")))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path.startswith("/status/"):
                    self._send(int(path.rsplit("/", 1)[1]), b"no", "text/plain")
                else:
                    self._send(404, b"not found", "text/plain")
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                return  # the client hung up (as the worker does on oversized or slow downloads)

        def _headers(self, status: int, content_type: str, length: int | None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self._headers(status, content_type, len(body))
            self.wfile.write(body)

        def _drip(self, body: bytes, delay: float) -> None:
            self._headers(200, "image/png", len(body))
            for index in range(len(body)):
                self.wfile.write(body[index : index + 1])
                self.wfile.flush()
                time.sleep(delay)

    return Handler


# ----------------------------------------------------------------------------- Hugging Face Hub (file API)

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubServer:
    """Plain http on 127.0.0.1 answering huggingface_hub's file requests as the Hub does:
    `HEAD|GET /<org>/<name>/resolve/<revision>/<path>` with the commit, ETag and size headers, byte ranges
    (resumed downloads), and 404 with `X-Error-Code: EntryNotFound` for a missing file. `repos` maps a
    repository id to {path: bytes}; `requests` logs (method, repo, path) of every file request."""

    httpd: ThreadingHTTPServer
    repos: dict[str, dict[str, bytes]]
    requests: list[tuple[str, str, str]]

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.httpd.server_address[1]}"

    def downloads(self) -> list[str]:
        """`repo/path` of every GET (a file body sent)."""
        return [f"{repo}/{path}" for method, repo, path in self.requests if method == "GET"]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_hub_server(repos: dict[str, dict[str, bytes]]) -> HubServer:
    log: list[tuple[str, str, str]] = []
    httpd = ThreadingHTTPServer((LOOPBACK, 0), _hub_handler_for(repos, log))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return HubServer(httpd=httpd, repos=repos, requests=log)


def _hub_handler_for(
    repos: dict[str, dict[str, bytes]], log: list[tuple[str, str, str]]
) -> type[BaseHTTPRequestHandler]:
    import hashlib
    import urllib.parse

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            parts = urllib.parse.unquote(self.path.split("?", 1)[0]).lstrip("/").split("/", 4)
            if len(parts) < 5 or parts[2] != "resolve":
                return self._error(404, "RepoNotFound")
            repo, path = f"{parts[0]}/{parts[1]}", parts[4]
            log.append(("GET" if body else "HEAD", repo, path))
            if repo not in repos:
                return self._error(404, "RepoNotFound")
            if path not in repos[repo]:
                return self._error(404, "EntryNotFound")
            data = repos[repo][path]
            start = 0
            ranged = self.headers.get("Range", "")
            if body and ranged.startswith("bytes="):
                start = int(ranged[6:].split("-", 1)[0] or 0)
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", HUB_COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if body:
                self.wfile.write(data[start:])

        def _error(self, status: int, code: str) -> None:
            message = json.dumps({"error": f"{code} (test hub)"}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(message)

    return Handler
