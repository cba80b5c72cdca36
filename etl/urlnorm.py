"""Takedown selectors and pool URLs, normalised by one versioned rule set (pure Python, no Spark).

Pool rows are matched against takedown selectors by equality joins, so both sides pass through
the same rules: :func:`normalize_selector` gives a selector's canonical value and
:func:`candidates` the ``(kind, value)`` keys a pool row's URL can match. A selector matches a URL
iff ``(kind, normalize_selector(kind, v)) in candidates(url)``. Each ledger row stores
:data:`RULES_VERSION`; bump it whenever a rule below changes.

URL rules (v1), giving ``scheme://host[:port]path[?query]``:

1. Leading/trailing ASCII whitespace is stripped. The URL must read ``scheme://host...``
   (scheme ``[A-Za-z][A-Za-z0-9+.-]*``, a non-empty host); otherwise it has no normal form.
2. The scheme is lower-cased.
3. Userinfo (``user:pass@``, up to the last ``@``) is dropped: credentials never reach a ledger.
4. Host: percent-escapes decoded (as UTF-8), lower-cased, trailing dots removed; each non-ASCII
   label (split at ``.`` and its IDNA 2003 look-alikes) becomes punycode with Python's ``idna``
   codec (``bücher.de`` -> ``xn--bcher-kva.de``); ASCII labels, punycode included, are kept.
   A host that fails IDNA or then holds a WHATWG forbidden domain code point (controls, space,
   ``#%/:<>?@[\\]^|``) has no normal form. ``[IPv6]`` literals keep their brackets and are
   written in Python's compressed lower-case form; zone ids and IPvFuture are refused.
5. Port: ASCII digits, 0-65535, leading zeros dropped; removed when it is the scheme's default
   (http/ws 80, https/wss 443, ftp 21); an empty port (``host:``) counts as none; any other port
   has no normal form.
6. Path: escapes of unreserved characters (``A-Za-z0-9-._~``) are decoded, other escapes get
   upper-case hex (``%2f`` -> ``%2F``, kept escaped); non-ASCII (as UTF-8; a lone surrogate
   ``\\udcXX`` as byte XX), space, controls and ``"<>\\^`{|}`` are escaped; a ``%`` not before two
   hex digits becomes ``%25``. Then dot segments are removed (RFC 3986 5.2.4), an empty path
   becomes ``/`` and trailing ``/`` of a non-root path are removed (``/a//`` -> ``/a``, so the
   rules are idempotent). Case and other repeated slashes are kept.
7. Query: kept in order with the path's escaping rules (``+`` stays ``+``); ``?`` alone dropped.
8. The fragment is dropped.

Selectors: ``uid`` and ``md5`` are 32 hex digits, ``sha256`` 64 (lower-cased); ``url`` is a URL
by the rules above; ``prefix`` is such a URL without query or fragment and matches URLs equal to
it or below it at a ``/`` boundary (``https://ex.com/a/`` matches ``/a`` and ``/a/b.jpg``, not
``/ab.jpg``); ``host`` is a bare host (no port) matching only itself; ``domain`` is a host of two
or more labels, not an IP address nor a listed public suffix, with ``*.`` or ``.`` ignored in front,
and matches itself and every subdomain. A host is an IP address when bracketed or when its last
label is numeric (``4``, ``0x7f``), as WHATWG parses hosts.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from urllib.parse import unquote

RULES_VERSION: int = 1
KINDS = ("uid", "url", "prefix", "host", "domain", "sha256", "md5")

PUBLIC_SUFFIXES = frozenset({
    "com", "net", "org", "edu", "gov", "io", "co.uk", "org.uk", "ac.uk", "gov.uk", "com.au",
    "co.jp", "com.br", "co.in", "de", "fr", "jp", "cn", "ru", "uk", "us", "eu", "info", "biz"})
_DEFAULT_PORTS = {"http": "80", "https": "443", "ftp": "21", "ws": "80", "wss": "443"}
_WS = " \t\n\r\x0b\x0c"
_SPLIT = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)([^?#]*)(?:\?([^#]*))?", re.S)
_NEEDS_ESCAPE = re.compile(r'[\x00-\x20"%<>\\^`{|}\x7f-\U0010ffff]')
_ESCAPE = re.compile(r'%[0-9A-Fa-f]{2}|%|[\x00-\x20"<>\\^`{|}\x7f-\U0010ffff]+')
_FORBIDDEN = re.compile(r"[\x00-\x20#%/:<>?@\[\\\]^|\x7f]")
_DOTS = re.compile("[.\u3002\uff0e\uff61]")
_NUMERIC = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]*)\Z")
_HEX = re.compile(r"[0-9A-Fa-f]*")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_BYTE = tuple(f"%{b:02X}" for b in range(256))
_PCT = {f"%{a}{b}": (chr(int(a + b, 16)) if chr(int(a + b, 16)) in _UNRESERVED
                     else f"%{a}{b}".upper())
        for a in "0123456789abcdefABCDEF" for b in "0123456789abcdefABCDEF"}


class SelectorError(ValueError):
    """A takedown selector that cannot be normalised; the message says what is expected."""


def _escape(m: re.Match[str]) -> str:
    t = m.group()
    done = _PCT.get(t)
    return done if done is not None else "".join(
        _BYTE[b] for b in t.encode("utf-8", "surrogateescape"))


def _remove_dots(path: str) -> str:
    segs = path.split("/")
    out: list[str] = []
    for seg in segs[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    if segs[-1] in (".", "..") and out:
        out.append("")
    return "/" + "/".join(out)


def _hostport(auth: str) -> tuple[str, str | None]:
    """Split ``host[:port]`` (``[v6]:port`` too); the port is None without a colon."""
    if auth.startswith("["):
        end = auth.find("]")
        rest = auth[end + 1:]
        if end < 0 or (rest and rest[0] != ":"):
            raise SelectorError("has an unclosed or malformed [IPv6] host")
        return auth[:end + 1], (rest[1:] if rest else None)
    host, sep, port = auth.partition(":")
    if ":" in port:
        raise SelectorError("has more than one ':'; write an IPv6 address in [brackets]")
    return host, (port if sep else None)


def _host(raw: str) -> str:
    """The normal form of a host (rule 4); raises SelectorError."""
    if raw.startswith("["):
        try:
            if "%" in raw:
                raise ValueError(raw)
            return f"[{ipaddress.IPv6Address(raw[1:-1]).compressed}]"
        except ValueError:
            raise SelectorError("has an invalid IPv6 address (zone ids are refused)") from None
    host = raw
    try:
        if "%" in host:
            host = unquote(host, errors="strict")
        host = host.lower().rstrip(".")
        if not host.isascii():
            host = ".".join(label if label.isascii() else label.encode("idna").decode("ascii")
                            for label in _DOTS.split(host)).lower().rstrip(".")
    except UnicodeError:
        raise SelectorError("has a host that cannot be IDNA-encoded") from None
    bad = _FORBIDDEN.search(host)
    if not host or bad:
        raise SelectorError(f"has a forbidden {bad.group()!r} in its host" if bad else
                            "has an empty host")
    return host


@functools.lru_cache(maxsize=1 << 14)  # pool rows share hosts; a few MiB at most
def _authority(scheme: str, auth: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``("scheme://host[:port]", host and domain keys)`` of a lower-case scheme and an
    authority without userinfo; raises SelectorError."""
    host, port = _hostport(auth)
    host = _host(host)
    if port:
        if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
            raise SelectorError(f"has an invalid port {port[:20]!r}")
        port = str(int(port))
        port = "" if _DEFAULT_PORTS.get(scheme) == port else ":" + port
    keys = [("host", host)]
    if "." in host and not _is_ip(host):
        d = host
        while "." in d:
            keys.append(("domain", d))
            d = d[d.find(".") + 1:]
    return f"{scheme}://{host}{port or ''}", tuple(keys)


def _parse(url: str) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    """``("scheme://host[:port]", path, "?query" or "", host and domain keys)`` of a URL;
    raises SelectorError."""
    m = _SPLIT.match(url.strip(_WS))
    if m is None or not m.group(2):
        raise SelectorError("has no scheme://host")
    scheme, auth, path, query = m.groups()
    base, keys = _authority(scheme.lower(), auth[auth.rfind("@") + 1:])
    try:
        path = _ESCAPE.sub(_escape, path) if _NEEDS_ESCAPE.search(path) else path or "/"
        if query and _NEEDS_ESCAPE.search(query):
            query = _ESCAPE.sub(_escape, query)
    except UnicodeError:
        raise SelectorError("has characters that cannot be UTF-8 encoded") from None
    if "/." in path:
        path = _remove_dots(path)
    if len(path) > 1 and path[-1] == "/":
        path = path.rstrip("/") or "/"
    return base, path, "?" + query if query else "", keys


def _split(url: object) -> tuple[str, str, str, tuple[tuple[str, str], ...]] | None:
    if not isinstance(url, str):
        return None
    try:
        return _parse(url)
    except (SelectorError, UnicodeError, ValueError):
        return None


def _is_ip(host: str) -> bool:
    return host.startswith("[") or _NUMERIC.match(host[host.rfind(".") + 1:]) is not None


def normalize_url(url: str) -> str | None:
    """Normalised form of a pool URL, or None when it has no scheme://host (never raises)."""
    parts = _split(url)
    return None if parts is None else parts[0] + parts[1] + parts[2]


def _show(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def normalize_selector(kind: str, value: str) -> str:
    """The canonical value of one selector; raises SelectorError naming the problem."""
    if kind not in KINDS:
        raise SelectorError(f"unknown selector kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(value, str):
        raise SelectorError(f"{kind}: expected a string value, got {type(value).__name__}")
    v = value.strip(_WS)
    if kind in ("uid", "md5", "sha256"):
        digits = 64 if kind == "sha256" else 32
        if len(v) != digits or not _HEX.fullmatch(v):
            raise SelectorError(f"{kind}: {_show(value)} is not {digits} hex digits; "
                                f"give the {kind} as {digits} characters 0-9a-f")
        return v.lower()
    if kind in ("url", "prefix"):
        if kind == "prefix" and ("?" in v or "#" in v):
            raise SelectorError(f"prefix: {_show(value)} has a query or fragment; a prefix matches "
                                "at path-segment boundaries and cannot hold a query")
        try:
            base, path, query, _ = _parse(v)
        except SelectorError as e:
            raise SelectorError(f"{kind}: {_show(value)} {e}; give an absolute http(s) URL") from None
        return base + path + query
    if "/" in v:
        raise SelectorError(f"{kind}: {_show(value)} is not a bare host name; "
                            "use kind 'url' or 'prefix' for URLs and paths")
    if kind == "domain":
        v = v[2:] if v.startswith("*.") else v[1:] if v.startswith(".") else v
    if "*" in v:
        raise SelectorError(f"{kind}: {_show(value)} has a wildcard; use kind 'domain' with "
                            "example.com (or *.example.com) to match a host and its subdomains")
    try:
        raw, port = _hostport(v)
        if port is not None:
            raise SelectorError("has a :port; hosts match regardless of port")
        host = _host(raw)
    except SelectorError as e:
        raise SelectorError(f"{kind}: {_show(value)} {e}; give a bare host name") from None
    why = kind == "domain" and (
        "is an IP address (use kind 'host')" if _is_ip(host) else
        "is a public suffix and would match a whole TLD" if host in PUBLIC_SUFFIXES else
        "has a single label" if "." not in host else "")
    if why:
        raise SelectorError(f"domain: {_show(value)} {why}; give a registrable domain such as "
                            "example.com")
    return host


def candidates(url: str | None) -> list[tuple[str, str]]:
    """(kind, value) keys a pool row's URL can match: ("url", normalised), ("prefix", p) for each
    path-prefix candidate, ("host", host), ("domain", d) for each parent domain. Empty for
    None/unparseable."""
    parts = _split(url)
    if parts is None:
        return []
    base, path, query, keys = parts
    out = [("url", base + path + query), ("prefix", base + "/")]
    i = path.find("/", 1)
    while i > 0:
        if path[i - 1] != "/":  # "/a/" of "/a//b" is no selector's value: skip it
            out.append(("prefix", base + path[:i]))
        i = path.find("/", i + 1)
    if path != "/":
        out.append(("prefix", base + path))
    out.extend(keys)
    return out
