"""A request's images, from the URLs of its image_url parts to decoded RGB pictures, within the limits Settings give.

An image comes as a `data:` URL (base64) or from an http(s) URL. A download is bounded in bytes, time and
redirects, and never reaches the worker's own network (loopback, private, link-local and other non-public
addresses) unless ALLOW_PRIVATE_IMAGE_URLS says it may: every address a host resolves to is checked, at every
redirect, and the connection goes to the address checked, so that a second DNS answer cannot swap it. The
picture's size is read from its header and checked before its pixels are decoded. Every refusal is a RequestError
that starts with the image's place in the request and never repeats the URL or its data: at most its host.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import socket
import ssl
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

from worker_transformers.config import Settings
from worker_transformers.generation.errors import RequestError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what Pillow may read the data as, whatever its media type claims
REDIRECTS = 3
FETCH_THREADS = 4
CHUNK = 65536
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
USER_AGENT = "worker-transformers"
NOT_AN_IMAGE = "the data is not a PNG, JPEG, WebP or GIF image; send one of those"
# Addresses that lead into the worker's own network or nowhere: refused unless ALLOW_PRIVATE_IMAGE_URLS.
NON_PUBLIC = ("unspecified", "loopback", "link_local", "multicast", "reserved", "private")

_SETTINGS = Settings()  # only its defaults, so that ImageLimits() has the same ones without writing them twice


@dataclass(frozen=True)
class ImageLimits:
    """What a request's images may be: how many, how large, and where and how long they may be fetched from."""

    max_images: int = _SETTINGS.max_images_per_request
    max_pixels: int = _SETTINGS.max_image_pixels
    max_bytes: int = _SETTINGS.max_image_bytes
    timeout_s: float = _SETTINGS.image_fetch_timeout_s
    max_redirects: int = REDIRECTS
    allow_private: bool = _SETTINGS.allow_private_image_urls

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_images=settings.max_images_per_request,
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
            timeout_s=settings.image_fetch_timeout_s,
            allow_private=settings.allow_private_image_urls,
        )


def load_images(urls: list[tuple[str, str]], limits: ImageLimits) -> list[Image.Image]:
    """Each (url, place) as an RGB image, fully decoded, in the order given. Raises RequestError naming the place
    of the first image that cannot be had."""
    if urls and limits.max_images == 0:
        raise RequestError("messages: this worker takes no images (MAX_IMAGES_PER_REQUEST=0); send text only")
    if len(urls) > limits.max_images:
        raise RequestError(
            f"messages: {len(urls)} images is more than MAX_IMAGES_PER_REQUEST={limits.max_images}; send fewer"
        )
    if len(urls) <= 1:
        return [_load(url, place, limits) for url, place in urls]
    # Downloads wait on the network and Pillow decodes without the GIL: a few threads overlap them.
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(urls))) as pool:
        futures = [pool.submit(_load, url, place, limits) for url, place in urls]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()


def _load(url: str, place: str, limits: ImageLimits) -> Image.Image:
    data = _data_url(url, place, limits) if url[:5].lower() == "data:" else _fetch(url, place, limits)
    return _decode(data, place, limits)


def _data_url(url: str, place: str, limits: ImageLimits) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise RequestError(
            f"{place}.image_url.url: not a base64 data URL; send data:<media type>;base64,<the file in base64>"
        )
    # Base64 takes 4 characters for 3 bytes: a payload far too long is refused before it is decoded.
    if len(payload) // 4 * 3 > limits.max_bytes + 3:
        raise _too_many_bytes(place, limits)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            f"{place}.image_url.url: the data is not valid base64; send the file base64-encoded"
        ) from None
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(place, limits)
    return data


def _too_many_bytes(place: str, limits: ImageLimits) -> RequestError:
    return RequestError(
        f"{place}.image_url: the image is more than MAX_IMAGE_BYTES={limits.max_bytes} bytes; send a smaller file"
    )


def _decode(data: bytes, place: str, limits: ImageLimits) -> Image.Image:
    try:
        # Reads the header only; Pillow's own bomb guard refuses a size far past any MAX_IMAGE_PIXELS already.
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise RequestError(f"{place}.image_url: {NOT_AN_IMAGE}") from None
    except Image.DecompressionBombError:
        raise RequestError(
            f"{place}.image_url: the image has more than MAX_IMAGE_PIXELS={limits.max_pixels} pixels; "
            "send a smaller image"
        ) from None
    with image:
        width, height = image.size
        if width * height > limits.max_pixels:
            raise RequestError(
                f"{place}.image_url: the image is {width}x{height}, {width * height} pixels, more than "
                f"MAX_IMAGE_PIXELS={limits.max_pixels}; send a smaller image"
            )
        try:
            image.load()  # every pixel of the first frame: a truncated or damaged file fails here
            return ImageOps.exif_transpose(image).convert("RGB")  # a photo's camera rotation applied
        except (OSError, SyntaxError, ValueError, EOFError, struct.error):
            raise RequestError(
                f"{place}.image_url: the image is truncated or damaged; send the complete file"
            ) from None


def _fetch(url: str, place: str, limits: ImageLimits) -> bytes:
    """The body of `url`, following at most `limits.max_redirects` redirects, each checked as the first URL is."""
    where = f"{place}.image_url.url"
    deadline = time.monotonic() + limits.timeout_s
    first_host = None
    for hop in range(limits.max_redirects + 1):
        try:
            parts = urlsplit(url)
            scheme, host = parts.scheme.lower(), (parts.hostname or "")[:253]
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:  # an unclosed IPv6 bracket, a port that is not a number up to 65535
            scheme = host = ""
        if scheme not in ("http", "https") or not host:
            if hop == 0:
                raise RequestError(f"{where}: send an http(s) URL or a data URL (data:image/png;base64,...)")
            raise RequestError(f"{where}: {first_host} redirected to a URL that is not http(s); send the image's URL")
        first_host = first_host or host
        connection = _connection(scheme, host, port, _checked_address(host, port, where, limits), deadline)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", target, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in REDIRECT_STATUSES and response.getheader("Location"):
                try:
                    url = urljoin(url, response.getheader("Location"))
                except ValueError:  # a malformed Location: refused as the next URL
                    url = ""
                continue
            if response.status != 200:
                raise RequestError(
                    f"{where}: {host} answered with HTTP status {response.status}; send a URL that serves the image "
                    "or the image itself as a data URL"
                )
            return _body(response, place, limits, deadline)
        except TimeoutError:  # socket.timeout is TimeoutError
            raise _timed_out(where, host, limits) from None
        except ssl.SSLCertVerificationError as error:
            raise RequestError(
                f"{where}: the TLS certificate of {host} could not be verified ({error.verify_message}); send a URL "
                "with a valid certificate"
            ) from None
        except (OSError, http.client.HTTPException) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
            raise RequestError(
                f"{where}: fetching from {host} failed ({reason}); send a URL that serves the image"
            ) from None
        finally:
            connection.close()
    raise RequestError(
        f"{where}: more than {limits.max_redirects} redirects from {first_host}; send the image's final URL"
    )


def _checked_address(host: str, port: int, where: str, limits: ImageLimits) -> str:
    """An address `host` resolves to, once every address it resolves to has been checked."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise RequestError(f"{where}: the host {host} could not be resolved; check the URL") from None
    addresses = [info[4][0] for info in found]
    if not limits.allow_private:
        for address in addresses:
            kind = _private_kind(ipaddress.ip_address(address.split("%", 1)[0]))
            if kind is not None:
                raise RequestError(
                    f"{where}: {host} resolves to {address}, {_a(kind)} address, and such addresses are not fetched; "
                    "send a public URL (ALLOW_PRIVATE_IMAGE_URLS=true allows them)"
                )
    return addresses[0]


def _private_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What makes `ip` not public (`loopback`, `private`, ...), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in NON_PUBLIC:
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _connection(scheme: str, host: str, port: int, address: str, deadline: float) -> http.client.HTTPConnection:
    """A connection for `host` (its Host header and, for https, its certificate) made to the checked `address`."""
    timeout = max(deadline - time.monotonic(), 0.001)
    if scheme == "https":
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)

    def connect(_: tuple[str, int], timeout: float, source: object = None) -> socket.socket:
        return socket.create_connection((address, port), timeout, source)

    connection._create_connection = connect  # never a second lookup of the host
    return connection


def _body(response: http.client.HTTPResponse, place: str, limits: ImageLimits, deadline: float) -> bytes:
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > limits.max_bytes:
        raise _too_many_bytes(place, limits)
    chunks, size = [], 0
    while chunk := response.read1(CHUNK):
        size += len(chunk)
        if size > limits.max_bytes:
            raise _too_many_bytes(place, limits)
        # The socket's timeout bounds each read; a server that sends a byte at a time is bounded here.
        if time.monotonic() > deadline:
            raise TimeoutError
        chunks.append(chunk)
    return b"".join(chunks)


def _timed_out(where: str, host: str, limits: ImageLimits) -> RequestError:
    return RequestError(
        f"{where}: fetching from {host} took more than IMAGE_FETCH_TIMEOUT_S={limits.timeout_s:g} seconds; send a "
        "faster URL or the image itself as a data URL"
    )
