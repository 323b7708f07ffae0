"""Photos fetched over HTTP(S): `build-index --metadata` rows with an `image_url`, and `POST /items` with one.

A URL is data anyone may send, so a fetch must not become a way into the server's own network (server-side request
forgery): only http and https; the host is resolved once and refused if any of its addresses is loopback, private,
link-local, multicast, reserved or unspecified (IPv4-mapped and 6to4 IPv6 addresses judged by the IPv4 address
inside), unless the operator allows that network; the connection goes to the address that was checked (no second
DNS answer between the check and the connect); and every redirect is checked again, at most `max_redirects` of
them. The standard library's http.client does it with one small connection class: no proxy from the environment,
no new dependency. Each attempt has a connect timeout and a total one (a server that drips bytes is cut off), a
body is refused from its Content-Length and is not read past `max_bytes`, and a transient failure (5xx, a timeout,
a dropped connection) is tried again with exponential backoff; a 4xx is not.

build-index keeps what it fetched in the catalog folder's `fetched/`, one file per URL (named by the URL's hash,
dated by the server's Last-Modified), so a re-run fetches only new URLs (`--refresh-urls`: also the photos that
changed, asked with If-Modified-Since), and decodes those files as it decodes any image (the same pixel limit).
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import ipaddress
import os
import random
import socket
import ssl
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate, parsedate_to_datetime
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable
from urllib.parse import quote, urljoin, urlsplit

from PIL import Image, UnidentifiedImageError

from engine.cli import bounded_float, bounded_int
from engine.errors import EngineError, InputError
from training.files import atomic_write
from training.images import IMAGE_FORMATS

FETCHED = "fetched"  # the catalog folder's cache of photos fetched by URL
REDIRECTS = frozenset({301, 302, 303, 307, 308})
URL_SAFE = "/%:@!$&'()*+,;=-._~"  # kept as they are in a request target (RFC 3986), the rest percent-encoded
EVERY_NETWORK = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedURL(InputError):
    """A URL this server will not fetch: not http(s), malformed, or naming an address it may not reach (400)."""


class FetchFailed(EngineError):
    """The server at a URL did not give a usable photo: an error status, a dropped connection, a body over the
    limit (the service answers 502). `transient`: worth trying again."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class FetchTimeout(FetchFailed):
    """The server at a URL did not connect or answer in time (the service answers 504)."""

    def __init__(self, message: str):
        super().__init__(message, transient=True)


@dataclass(frozen=True)
class FetchPolicy:
    """How photos are fetched. The defaults suit a CDN: a photo is rarely over 20 MiB or 30 s away."""

    max_bytes: int = 20 << 20
    connect_timeout: float = 5.0
    total_timeout: float = 30.0  # one attempt: connect, headers and body
    retries: int = 2  # further attempts after a transient failure
    backoff: float = 0.5  # seconds before the first retry, doubled for each next one (with jitter)
    max_redirects: int = 5
    connections: int = 8  # build-index: fetches in flight at once
    refresh: bool = False  # build-index: ask again for photos kept from an earlier run (only a change is sent)
    allowed_networks: tuple[Network, ...] = field(default_factory=tuple)  # private networks the operator allows


def check_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; RefusedURL for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise RefusedURL(f"image_url {url!r}: not a URL ({error})") from None
    if parts.scheme not in ("http", "https"):
        raise RefusedURL(f"image_url {url!r}: only http and https URLs are fetched")
    if not parts.hostname:
        raise RefusedURL(f"image_url {url!r}: no host")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def forbidden(address: Address) -> bool:
    """Whether an address is off limits by default: anything but a public unicast one (an IPv4 address carried
    inside an IPv6 one is judged itself)."""
    inner = [address.ipv4_mapped, address.sixtofour] if address.version == 6 else []
    return any(not a.is_global or a.is_multicast or a.is_reserved or a.is_unspecified
               for a in [address, *(a for a in inner if a is not None)])


def checked_address(host: str, port: int, policy: FetchPolicy) -> str:
    """The address to connect to for `host`: every address it resolves to must be allowed (a name that also
    resolves to an internal address is refused, whichever one a connect would pick)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise FetchFailed(f"{host}: cannot resolve ({error})",
                          transient=getattr(error, "errno", None) == socket.EAI_AGAIN) from None
    addresses = [ipaddress.ip_address(entry[4][0].split("%")[0]) for entry in found]
    for address in addresses:
        if forbidden(address) and not any(address in network for network in policy.allowed_networks):
            raise RefusedURL(f"{host} resolves to {address}, a loopback, private, link-local or reserved address "
                             "this server does not fetch from (unless its operator allows that network)")
    return str(addresses[0])


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to `host` made to an address checked beforehand; TLS still verifies `host`."""

    def __init__(self, host: str, port: int, address: str, connect_timeout: float, tls: ssl.SSLContext | None):
        super().__init__(host, port, timeout=connect_timeout)
        self.address, self.tls = address, tls
        self.live: socket.socket | None = None  # kept: http.client drops `sock` once a response owns it
        self.default_port = 443 if tls is not None else 80  # the Host header names the port only if not default

    def connect(self) -> None:
        self.live = socket.create_connection((self.address, self.port), self.timeout)  # the deadline can cut it
        if self.tls is not None:  # the TLS socket owns the descriptor from here, handshake included
            self.live = self.tls.wrap_socket(self.live, server_hostname=self.host, do_handshake_on_connect=False)
            self.live.do_handshake()
        self.sock = self.live


@dataclass(frozen=True)
class Photo:
    """What a fetch brought: the body, and the server's time for it (what a later fetch asks for changes since)."""

    data: bytes | None  # None: not modified since the time a conditional fetch named
    modified: float | None = None  # the server's Last-Modified (a POSIX time), if it sent one


def fetch(url: str, policy: FetchPolicy = FetchPolicy(), since: float | None = None) -> Photo:
    """The body of `url` (status 200), following checked redirects and trying transient failures again; with
    `since` (a POSIX time), only if modified after it (If-Modified-Since)."""
    attempt = 0
    while True:
        try:
            return _follow_redirects(url, policy, since)
        except FetchFailed as failure:
            if not failure.transient or attempt >= policy.retries:
                raise
        time.sleep(policy.backoff * 2 ** attempt * random.uniform(0.5, 1.0))
        attempt += 1


def _follow_redirects(url: str, policy: FetchPolicy, since: float | None) -> Photo:
    for _ in range(policy.max_redirects + 1):
        status, location, photo = _get(url, policy, since)
        if status not in REDIRECTS:
            return photo
        if not location:
            raise FetchFailed(f"{url}: redirect ({status}) without a Location")
        url = urljoin(url, location)
    raise FetchFailed(f"{url}: more than {policy.max_redirects} redirects")


def _get(url: str, policy: FetchPolicy, since: float | None = None) -> tuple[int, str | None, Photo]:
    """One GET within `policy.total_timeout`: (status, Location, photo). The socket is shut down at the deadline,
    so a server that drips its headers or body is cut off too."""
    scheme, host, port = check_url(url)
    deadline = time.monotonic() + policy.total_timeout
    address = checked_address(host, port, policy)
    connection = _PinnedConnection(host, port, address, min(policy.connect_timeout, policy.total_timeout),
                                   ssl.create_default_context() if scheme == "https" else None)
    cut = threading.Timer(policy.total_timeout, _shut_down, (connection,))
    cut.start()
    try:
        connection.request("GET", _target(url), headers=_request_headers(since))
        response = connection.getresponse()
        if response.status in REDIRECTS or response.status == 304 and since is not None:
            return response.status, response.getheader("Location"), Photo(None)
        if response.status != 200:
            raise FetchFailed(f"{url}: the server answered {response.status} {response.reason}",
                              transient=response.status >= 500)
        body = _body(response, url, policy.max_bytes)
        if time.monotonic() >= deadline:  # cut off by the deadline: what came is not the whole photo
            raise TimeoutError
        return response.status, None, Photo(body, _timestamp(response.getheader("Last-Modified")))
    except (TimeoutError, OSError, http.client.HTTPException) as error:
        if connection.live is None and isinstance(error, TimeoutError):
            raise FetchTimeout(f"{url}: could not connect within {connection.timeout:g} s") from None
        if time.monotonic() >= deadline or isinstance(error, TimeoutError):
            raise FetchTimeout(f"{url}: no answer within {policy.total_timeout:g} s") from None
        transient = isinstance(error, (ConnectionError, http.client.IncompleteRead, http.client.BadStatusLine))
        raise FetchFailed(f"{url}: {type(error).__name__}: {error}", transient=transient) from None
    finally:
        cut.cancel()
        connection.close()


def _request_headers(since: float | None) -> dict[str, str]:
    headers = {"User-Agent": "latenthash", "Accept": "image/*"}
    if since is not None:
        headers["If-Modified-Since"] = formatdate(since, usegmt=True)
    return headers


def _timestamp(http_date: str | None) -> float | None:
    """An HTTP date as a POSIX time (None if absent or malformed)."""
    try:
        return parsedate_to_datetime(http_date).timestamp() if http_date else None
    except (TypeError, ValueError):
        return None


def _target(url: str) -> str:
    """The request target, percent-encoded as a browser sends it (a space or a non-ASCII letter in a shop's URL,
    which http.client would refuse)."""
    parts = urlsplit(url)
    path, query = quote(parts.path or "/", safe=URL_SAFE), quote(parts.query, safe=URL_SAFE + "?")
    return path + (f"?{query}" if query else "")


def _shut_down(connection: _PinnedConnection) -> None:
    """End the TCP connection under a read in progress (the plain socket's shutdown, below any TLS layer: the
    reader then sees the end of the stream)."""
    try:
        if connection.live is not None:
            socket.socket.shutdown(connection.live, socket.SHUT_RDWR)
    except OSError:
        pass


def _body(response: http.client.HTTPResponse, url: str, max_bytes: int) -> bytes:
    """The body, refused from its declared length or as soon as it passes `max_bytes`."""
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise FetchFailed(f"{url}: {int(declared)} bytes, over the limit of {max_bytes}")
    chunks, size = [], 0
    while chunk := response.read(1 << 16):
        size += len(chunk)
        if size > max_bytes:
            raise FetchFailed(f"{url}: more than {max_bytes} bytes, over the limit")
        chunks.append(chunk)
    if declared is not None and declared.isdigit() and size != int(declared):
        raise http.client.IncompleteRead(b"", int(declared) - size)  # the connection closed early
    return b"".join(chunks)


def check_image(data: bytes, url: str) -> None:
    """Refuse a body that is no image (an HTML error page answered with 200) before it is kept; decoding, with
    its pixel limit, happens where every image decodes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the decoder's pixel limit decides
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS):
                pass
    except Image.DecompressionBombError:
        return
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise FetchFailed(f"{url}: not an image file ({type(error).__name__})") from None


# ---------------------------------------------------------------------------------- build-index's cache of photos
def fetched_folder(catalog_dir: str | os.PathLike) -> Path:
    return (Path(catalog_dir) / FETCHED).resolve()


def cache_file(folder: Path, url: str) -> Path:
    """Where the photo of `url` is kept: the same URL is always the same file, and so the same item."""
    return folder / hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass
class FetchReport:
    """What build-index fetched into `folder`, of `urls` listed: the files ready to index, one entry (url, error)
    per URL that gave no photo, and per kept photo that could not be checked again (`stale`: indexed as it was)."""

    folder: Path
    urls: int = 0
    files: list[Path] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    stale: list[dict] = field(default_factory=list)
    fetched: int = 0  # new photos, and changed ones
    cached: int = 0  # kept from an earlier run (not asked for again, or not modified since)
    seconds: float = 0.0

    def counts(self) -> dict:
        return dict(urls=self.urls, fetched=self.fetched, cached=self.cached, failed=len(self.failures),
                    stale=self.stale, seconds=round(self.seconds, 2))

    def add(self, file: Path, url: str, changed: bool, problem: str | None) -> None:
        """Count one URL's outcome (a failed check of a photo kept from before keeps it)."""
        if problem is not None and not file.is_file():
            self.failures.append(dict(url=url, error=problem))
            return
        if problem is not None:
            self.stale.append(dict(url=url, error=problem))
        self.files.append(file)
        self.fetched += changed
        self.cached += not changed


def fetch_photos(folder: Path, urls: dict[Path, str], policy: FetchPolicy, progress: bool = False) -> FetchReport:
    """Fetch each URL whose photo is not in its file in `folder` yet ({cache file: url}) and, with
    `policy.refresh`, ask again for those that are (If-Modified-Since the file's time: a changed photo replaces
    its file, whose new size and time make build-index index it again), `policy.connections` at a time. Each
    photo is written atomically, so an interrupted run leaves whole files only."""
    from tqdm import tqdm

    started, report = time.perf_counter(), FetchReport(folder, len(urls))
    asked = dict(urls) if policy.refresh else {file: url for file, url in urls.items() if not file.is_file()}
    report.files = [file for file in urls if file not in asked]
    report.cached = len(report.files)
    if asked:
        folder.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(asked), desc="fetching", unit="photo", disable=not progress or not asked)
    with ThreadPoolExecutor(max(1, min(policy.connections, len(asked)))) as pool:
        for outcome in pool.map(lambda item: _keep(*item, policy), asked.items()):
            report.add(*outcome)
            bar.update()
    bar.close()
    report.seconds = time.perf_counter() - started
    return report


def _keep(file: Path, url: str, policy: FetchPolicy) -> tuple[Path, str, bool, str | None]:
    """Fetch one photo into `file`, or only a change of it when the file is there: (file, url, whether the file
    changed, why it failed or None). The file takes the server's Last-Modified time, to ask with next time."""
    since = file.stat().st_mtime if file.is_file() else None
    try:
        photo = fetch(url, policy, since)
        if photo.data is not None:
            check_image(photo.data, url)
    except (FetchFailed, RefusedURL) as failure:
        return file, url, False, str(failure)
    if photo.data is None or since is not None and file.read_bytes() == photo.data:
        return file, url, False, None
    atomic_write(file, lambda tmp: _write_photo(tmp, photo))
    return file, url, True, None


def _write_photo(file: Path, photo: Photo) -> None:
    file.write_bytes(photo.data)
    if photo.modified is not None:
        os.utime(file, (photo.modified, photo.modified))


def add_url_sources(failures: Iterable[dict], products: dict[Path, dict]) -> None:
    """Name the URL beside the cache file of each failure that is a fetched photo (e.g. over the pixel limit)."""
    for failure in failures:
        url = (products.get(Path(failure.get("path", ""))) or {}).get("image_url")
        if "url" not in failure and url is not None:
            failure["url"] = url


# --------------------------------------------------------------------------------------------- the commands' flags
def network(text: str) -> Network:
    """An argparse type: an IP network (10.1.0.0/16, fd00::/8, or one address)."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP network: {text!r}") from None


def add_url_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of fetching photos by URL, the same for build-index and the service."""
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="fetch image_url photos from loopback, private and link-local addresses too "
                        "(default: refused, so that a URL cannot reach this machine's own network)")
    parser.add_argument("--allow-url-network", type=network, action="append", default=[], metavar="CIDR",
                        help="fetch from this private network only (e.g. 10.20.0.0/16 for an internal CDN); "
                        "may be repeated")
    parser.add_argument("--fetch-timeout", type=bounded_float(0.001), default=FetchPolicy.total_timeout,
                        metavar="SECONDS", help="longest one attempt to fetch a photo may take, connect included "
                        "(default %(default)g)")


def add_fetch_flags(parser: argparse.ArgumentParser) -> None:
    """build-index's flags: those of `add_url_flags`, and how many, how large and whether to ask again."""
    add_url_flags(parser)
    parser.add_argument("--fetch-connections", type=bounded_int(1, 256), default=FetchPolicy.connections,
                        metavar="N", help="image_url photos fetched at once (default %(default)s)")
    parser.add_argument("--max-photo-mb", type=bounded_float(0.001), default=FetchPolicy.max_bytes / (1 << 20),
                        metavar="MIB", help="largest image_url photo, in MiB; a longer one is not read further "
                        "(default %(default)g)")
    parser.add_argument("--refresh-urls", action="store_true",
                        help="ask again for the image_url photos fetched by earlier runs (If-Modified-Since): a "
                        "changed photo is fetched and its item indexed again (default: a kept photo is used as is)")


def url_policy(args: argparse.Namespace, max_bytes: int = FetchPolicy.max_bytes) -> FetchPolicy:
    """The FetchPolicy the flags of `add_url_flags` ask for, photos up to `max_bytes` (the service sets its own:
    its upload limit)."""
    networks = EVERY_NETWORK if args.allow_private_urls else tuple(args.allow_url_network)
    return FetchPolicy(max_bytes=max_bytes, total_timeout=args.fetch_timeout, allowed_networks=networks)


def fetch_policy(args: argparse.Namespace) -> FetchPolicy:
    """The FetchPolicy the flags of `add_fetch_flags` ask for."""
    return replace(url_policy(args, int(args.max_photo_mb * (1 << 20))), connections=args.fetch_connections,
                   refresh=args.refresh_urls)


def describe_fetching(counts: dict) -> str:
    """FetchReport.counts() in one line, for the command's output."""
    stale = (f"; {len(counts['stale'])} could not be checked again and were indexed as before"
             if counts["stale"] else "")
    return (f"image_url photos: {counts['fetched']} fetched, {counts['cached']} already here, {counts['failed']} "
            f"failed of {counts['urls']} URLs in {counts['seconds']:.1f}s{stale}")
