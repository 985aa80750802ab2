"""Images from data URLs and from a real HTTP server on 127.0.0.1: decoded to the pixels encoded, or refused by
place."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from PIL import Image

from worker_transformers.config import Settings
from worker_transformers.serving import images
from worker_transformers.serving.images import ImageLimits, load_images
from worker_transformers.serving.schema import RequestError

PLACE = "messages.0.content.1"
LOCAL = ImageLimits(allow_private=True, timeout_s=2)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (255, 255, 0)]


def picture() -> Image.Image:
    """3x2 pixels of six pure colours, which every format here keeps exactly (JPEG aside)."""
    image = Image.new("RGB", (3, 2))
    image.putdata(COLOURS)
    return image


def pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    return [image.getpixel((x, y)) for y in range(image.height) for x in range(image.width)]


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_header(width: int, height: int) -> bytes:
    """A PNG that holds only a header (its size) and one byte of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def refused(urls, limits=LOCAL) -> str:
    with pytest.raises(RequestError) as caught:
        load_images(urls, limits)
    return str(caught.value)


# --- data URLs


@pytest.mark.parametrize(
    ("fmt", "options"), [("PNG", {}), ("WEBP", {"lossless": True}), ("GIF", {})], ids=["png", "webp", "gif"]
)
def test_a_data_url_decodes_to_the_pixels_encoded(fmt, options):
    [image] = load_images([(data_url(encoded(picture(), fmt, **options)), PLACE)], LOCAL)
    assert (image.mode, image.size) == ("RGB", (3, 2))
    assert pixels(image) == COLOURS


def test_a_jpeg_decodes_to_its_colour():
    [image] = load_images(
        [(data_url(encoded(Image.new("RGB", (16, 8), (200, 40, 90)), "JPEG"), "image/jpeg"), PLACE)], LOCAL
    )
    assert image.size == (16, 8)
    assert all(abs(a - b) <= 3 for a, b in zip(image.getpixel((5, 5)), (200, 40, 90), strict=True))


def test_an_animated_gif_gives_its_first_frame_and_transparency_becomes_rgb():
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    [first] = load_images([(data_url(gif.getvalue(), "image/gif"), PLACE)], LOCAL)
    assert first.getpixel((0, 0)) == (255, 0, 0)
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    [flat] = load_images([(data_url(encoded(rgba, "PNG")), PLACE)], LOCAL)
    assert (flat.mode, flat.getpixel((1, 1))) == ("RGB", (10, 20, 30))


def test_the_format_is_read_from_the_data_not_the_media_type():
    [image] = load_images([(data_url(encoded(picture(), "PNG"), "image/jpeg"), PLACE)], LOCAL)
    assert pixels(image) == COLOURS
    bmp = data_url(encoded(picture(), "BMP"), "image/png")
    assert refused([(bmp, PLACE)]) == (
        f"{PLACE}.image_url: the data is not a PNG, JPEG, WebP or GIF image; send one of those"
    )


def test_text_is_not_an_image():
    assert refused([(data_url(b"hello, this is text"), PLACE)]) == (
        f"{PLACE}.image_url: the data is not a PNG, JPEG, WebP or GIF image; send one of those"
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_image_is_refused(fmt):
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    whole = encoded(noise, fmt)
    assert refused([(data_url(whole[: len(whole) // 2]), PLACE)]) == (
        f"{PLACE}.image_url: the image is truncated or damaged; send the complete file"
    )


@pytest.mark.parametrize(
    "url",
    ["data:image/png,iVBORw0KGgo=", "data:image/png;base64", "data:;base64"],
    ids=["not base64", "no comma", "no data"],
)
def test_a_data_url_must_be_base64(url):
    assert refused([(url, PLACE)]) == (
        f"{PLACE}.image_url.url: not a base64 data URL; send data:<media type>;base64,<the file in base64>"
    )


def test_bad_base64_is_named_and_not_echoed():
    message = refused([("data:image/png;base64,iVBOR%%%secret==", PLACE)])
    assert message == f"{PLACE}.image_url.url: the data is not valid base64; send the file base64-encoded"


def test_base64_broken_over_lines_is_read():
    text = base64.encodebytes(encoded(picture(), "PNG")).decode()  # a newline every 76 characters
    assert "\n" in text.strip()
    [image] = load_images([(f"data:image/png;base64,{text}", PLACE)], LOCAL)
    assert pixels(image) == COLOURS


def test_too_many_bytes_is_refused_before_decoding():
    png = encoded(picture(), "PNG")
    limits = replace(LOCAL, max_bytes=len(png) - 1)
    assert refused([(data_url(png), PLACE)], limits) == (
        f"{PLACE}.image_url: the image is more than MAX_IMAGE_BYTES={len(png) - 1} bytes; send a smaller file"
    )
    assert load_images([(data_url(png), PLACE)], replace(LOCAL, max_bytes=len(png)))[0].size == (3, 2)


def test_too_many_pixels_is_refused_from_the_header_before_decoding():
    # 4000x5000 with almost no pixel data: refused for its size, not as a damaged file, so the size came first.
    assert refused([(data_url(png_header(4000, 5000)), PLACE)]) == (
        f"{PLACE}.image_url: the image is 4000x5000, 20000000 pixels, more than MAX_IMAGE_PIXELS=16777216; "
        "send a smaller image"
    )


def test_a_real_pixel_bomb_is_refused():
    bomb = encoded(Image.new("1", (5000, 5000)), "PNG")  # 25 megapixels in a few kB
    assert len(bomb) < 20_000
    assert refused([(data_url(bomb), PLACE)]).startswith(f"{PLACE}.image_url: the image is 5000x5000, 25000000 pixels")


def test_pillows_own_bomb_guard_is_a_named_refusal():
    assert refused([(data_url(png_header(100_000, 100_000)), PLACE)]) == (
        f"{PLACE}.image_url: the image has more than MAX_IMAGE_PIXELS=16777216 pixels; send a smaller image"
    )


def test_too_many_images_are_refused_before_any_is_read(site):
    urls = [(f"{site.url}/{i}", f"messages.0.content.{i}") for i in range(9)]
    assert refused(urls) == "messages: 9 images is more than MAX_IMAGES_PER_REQUEST=8; send fewer"
    assert site.hits == []


def test_no_images_are_taken_when_the_limit_is_zero():
    assert refused([(data_url(encoded(picture(), "PNG")), PLACE)], replace(LOCAL, max_images=0)) == (
        "messages: this worker takes no images (MAX_IMAGES_PER_REQUEST=0); send text only"
    )
    assert load_images([], replace(LOCAL, max_images=0)) == []


def test_limits_come_from_settings():
    settings = Settings.from_env(
        {
            "MAX_IMAGES_PER_REQUEST": "2",
            "MAX_IMAGE_PIXELS": "100",
            "MAX_IMAGE_BYTES": "1000",
            "IMAGE_FETCH_TIMEOUT_S": "3",
            "ALLOW_PRIVATE_IMAGE_URLS": "true",
        }
    )
    assert ImageLimits.from_settings(settings) == ImageLimits(2, 100, 1000, 3, 3, True)
    assert ImageLimits.from_settings(Settings()) == ImageLimits()
    assert ImageLimits() == ImageLimits(8, 16_777_216, 20_971_520, 10, 3, False)


# --- http(s) URLs, from a real server


def start_site(tls: ssl.SSLContext | None = None):
    """An HTTP(S) server on 127.0.0.1: `routes` maps a path to what answers it; `hits` lists the paths asked for."""
    routes, hits = {}, []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            try:
                routes.get(self.path, status(404))(self)
            except (BrokenPipeError, ConnectionResetError):  # the worker stopped reading, as it should
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    scheme = "https" if tls else "http"
    return server, SimpleNamespace(url=f"{scheme}://127.0.0.1:{server.server_port}", routes=routes, hits=hits)


@pytest.fixture
def site():
    server, site = start_site()
    yield site
    server.shutdown()
    server.server_close()


@pytest.fixture
def tls_site(tmp_path, monkeypatch):
    """An HTTPS server with a certificate for `localhost`, which the worker's TLS context trusts (SSL_CERT_FILE)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server, site = start_site(context)
    yield site
    server.shutdown()
    server.server_close()


def serve(body: bytes, length: bool = True, delay_s: float = 0.0):
    def answer(request):
        time.sleep(delay_s)
        request.send_response(200)
        request.send_header("Content-Type", "image/png")
        if length:
            request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    return answer


def status(code: int, location: str | None = None):
    def answer(request):
        request.send_response(code)
        if location is not None:
            request.send_header("Location", location)
        request.send_header("Content-Length", "0")
        request.end_headers()

    return answer


def test_an_image_is_fetched_and_decoded(site):
    site.routes["/cat.png?token=x"] = serve(encoded(picture(), "PNG"))
    [image] = load_images([(f"{site.url}/cat.png?token=x", PLACE)], LOCAL)
    assert pixels(image) == COLOURS


def test_several_images_keep_their_order_and_are_fetched_together(site):
    for i in range(4):
        site.routes[f"/{i}"] = serve(encoded(Image.new("RGB", (i + 1, 1)), "PNG"), delay_s=0.4)
    started = time.monotonic()
    loaded = load_images([(f"{site.url}/{i}", f"messages.0.content.{i}") for i in range(4)], LOCAL)
    assert [image.size for image in loaded] == [(1, 1), (2, 1), (3, 1), (4, 1)]
    assert time.monotonic() - started < 1.2  # one after another would take 1.6 s


def test_the_host_is_looked_up_once_and_the_address_checked_is_the_one_connected_to(site, monkeypatch):
    looked_up = []
    real = socket.getaddrinfo
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda host, *rest, **kw: looked_up.append(host) or real(host, *rest, **kw)
    )
    site.routes["/img"] = serve(encoded(picture(), "PNG"))
    [image] = load_images([(site.url.replace("127.0.0.1", "localhost") + "/img", PLACE)], LOCAL)
    assert pixels(image) == COLOURS
    assert looked_up.count("localhost") == 1  # a second lookup could answer another address (DNS rebinding)


def test_https_checks_the_hosts_certificate_at_the_address_checked(tls_site):
    tls_site.routes["/img"] = serve(encoded(picture(), "PNG"))
    [image] = load_images([(tls_site.url.replace("127.0.0.1", "localhost") + "/img", PLACE)], LOCAL)
    assert pixels(image) == COLOURS
    # The certificate names localhost, not 127.0.0.1: verified against the URL's host, it is refused.
    assert refused([(f"{tls_site.url}/img", PLACE)]) == (
        f"{PLACE}.image_url.url: the TLS certificate of 127.0.0.1 could not be verified (IP address mismatch, "
        "certificate is not valid for '127.0.0.1'.); send a URL with a valid certificate"
    )


def test_an_error_status_is_named_without_the_url(site):
    message = refused([(f"{site.url}/missing?token=secret", PLACE)])
    assert message == (
        f"{PLACE}.image_url.url: 127.0.0.1 answered with HTTP status 404; send a URL that serves the image or the "
        "image itself as a data URL"
    )


def test_redirects_are_followed_up_to_the_limit(site):
    site.routes["/img"] = serve(encoded(picture(), "PNG"))
    for i in range(4):
        site.routes[f"/r{i}"] = status(302, f"/r{i + 1}" if i < 3 else "/img")
    [image] = load_images([(f"{site.url}/r1", PLACE)], LOCAL)  # three redirects
    assert pixels(image) == COLOURS
    assert refused([(f"{site.url}/r0", PLACE)]) == (
        f"{PLACE}.image_url.url: more than 3 redirects from 127.0.0.1; send the image's final URL"
    )
    assert "/img" not in site.hits[-4:]


@pytest.mark.parametrize("location", ["file:///etc/passwd", "http://[::1/broken"])
def test_a_redirect_to_another_scheme_is_refused(site, location):
    site.routes["/file"] = status(301, location)
    assert refused([(f"{site.url}/file", PLACE)]) == (
        f"{PLACE}.image_url.url: 127.0.0.1 redirected to a URL that is not http(s); send the image's URL"
    )


def test_a_redirect_to_a_private_address_is_refused(site, monkeypatch):
    # This test's server stands in for a public one: 127.0.0.1 counts as public here, and nothing else changes.
    real = images._private_kind
    monkeypatch.setattr(images, "_private_kind", lambda ip: None if str(ip) == "127.0.0.1" else real(ip))
    site.routes["/img"] = serve(encoded(picture(), "PNG"))
    site.routes["/to-metadata"] = status(302, "http://169.254.169.254/latest/meta-data/")
    assert load_images([(f"{site.url}/img", PLACE)], ImageLimits())[0].size == (3, 2)
    assert refused([(f"{site.url}/to-metadata", PLACE)], ImageLimits()) == (
        f"{PLACE}.image_url.url: 169.254.169.254 resolves to 169.254.169.254, a link-local address, and such "
        "addresses are not fetched; send a public URL (ALLOW_PRIVATE_IMAGE_URLS=true allows them)"
    )


@pytest.mark.parametrize(
    ("host", "address", "kind"),
    [
        ("169.254.169.254", "169.254.169.254", "link-local"),
        ("10.0.0.1", "10.0.0.1", "private"),
        ("[::1]", "::1", "loopback"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "0.0.0.0", "unspecified"),
        ("224.0.0.1", "224.0.0.1", "multicast"),
        ("100.64.0.1", "100.64.0.1", "non-public"),
        ("localhost", "127.0.0.1", "loopback"),
    ],
)
def test_non_public_addresses_are_refused_by_default_without_connecting(host, address, kind):
    started = time.monotonic()
    message = refused([(f"http://{host}/latest/meta-data/", PLACE)], ImageLimits())
    article = "an" if kind[0] in "aeiou" else "a"
    assert message.startswith(f"{PLACE}.image_url.url: {host.strip('[]')} resolves to {address}, {article} {kind} ")
    assert message.endswith("(ALLOW_PRIVATE_IMAGE_URLS=true allows them)")
    assert time.monotonic() - started < 0.5  # no connection was tried (10.0.0.1 would wait for the timeout)


def test_the_local_server_is_not_asked_by_default(site):
    site.routes["/img"] = serve(encoded(picture(), "PNG"))
    assert "a loopback address" in refused([(f"{site.url}/img", PLACE)], ImageLimits())
    assert site.hits == []


@pytest.mark.parametrize("length", [True, False], ids=["declared", "streamed"])
def test_an_oversized_body_is_refused(site, length):
    site.routes["/big"] = serve(b"\0" * 300_000, length=length)
    assert refused([(f"{site.url}/big", PLACE)], replace(LOCAL, max_bytes=100_000)) == (
        f"{PLACE}.image_url: the image is more than MAX_IMAGE_BYTES=100000 bytes; send a smaller file"
    )


def test_a_slow_server_is_given_up_on(site):
    site.routes["/slow"] = serve(encoded(picture(), "PNG"), delay_s=2)
    started = time.monotonic()
    assert refused([(f"{site.url}/slow", PLACE)], replace(LOCAL, timeout_s=0.3)) == (
        f"{PLACE}.image_url.url: fetching from 127.0.0.1 took more than IMAGE_FETCH_TIMEOUT_S=0.3 seconds; send a "
        "faster URL or the image itself as a data URL"
    )
    assert time.monotonic() - started < 1


def test_a_server_sending_a_byte_at_a_time_is_given_up_on(site):
    def drip(request):
        request.send_response(200)
        request.send_header("Content-Length", "100")
        request.end_headers()
        for _ in range(100):
            request.wfile.write(b"\0")
            request.wfile.flush()
            time.sleep(0.05)

    site.routes["/drip"] = drip
    started = time.monotonic()
    assert "took more than IMAGE_FETCH_TIMEOUT_S=0.4 seconds" in refused(
        [(f"{site.url}/drip", PLACE)], replace(LOCAL, timeout_s=0.4)
    )
    assert time.monotonic() - started < 1.5


def test_a_refused_connection_and_an_unknown_host_are_named():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert refused([(f"http://127.0.0.1:{port}/x", PLACE)]) == (
        f"{PLACE}.image_url.url: fetching from 127.0.0.1 failed (Connection refused); send a URL that serves the image"
    )
    assert refused([("https://no-such-host.invalid/x.png", PLACE)]) == (
        f"{PLACE}.image_url.url: the host no-such-host.invalid could not be resolved; check the URL"
    )


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/x.png", "gopher://x", "http://[::1/x", "http://x:99999/"]
)
def test_other_schemes_are_refused(url):
    assert refused([(url, PLACE)]) == (
        f"{PLACE}.image_url.url: send an http(s) URL or a data URL (data:image/png;base64,...)"
    )
