"""Takedown URL normalisation: every v1 rule, selector errors, and selector/URL matching."""

from __future__ import annotations

import random

import pytest

from etl.urlnorm import (
    KINDS,
    RULES_VERSION,
    SelectorError,
    candidates,
    normalize_selector,
    normalize_url,
)


def matches(kind: str, value: str, url: str | None) -> bool:
    return (kind, normalize_selector(kind, value)) in candidates(url)


def test_version_and_kinds():
    assert RULES_VERSION == 1
    assert KINDS == ("uid", "url", "prefix", "host", "domain", "sha256", "md5")


@pytest.mark.parametrize("url, expected", [
    # 1. whitespace stripped; scheme://host required
    ("  \t http://x.com/a \r\n", "http://x.com/a"),
    ("x.com/a", None), ("/a/b", None), ("http:x.com", None), ("http:/x.com", None),
    ("file:///etc/passwd", None), ("http://", None), ("http:///a", None),
    # 2. scheme lower-cased
    ("HTTPS://x.com/a", "https://x.com/a"), ("s3://bucket/k", "s3://bucket/k"),
    # 3. userinfo dropped (up to the last @)
    ("http://user:pass@x.com/a", "http://x.com/a"), ("http://a@b@x.com/", "http://x.com/"),
    # 4. host: case, trailing dot, IDNA, punycode kept, escapes decoded, IPv6, unencodable
    ("http://Example.COM/", "http://example.com/"), ("http://x.com./a", "http://x.com/a"),
    ("http://Bücher.de/x", "http://xn--bcher-kva.de/x"),
    ("http://xn--bcher-kva.de/x", "http://xn--bcher-kva.de/x"),
    ("http://XN--BCHER-KVA.de/x", "http://xn--bcher-kva.de/x"),
    ("http://b%C3%BCcher.de/x", "http://xn--bcher-kva.de/x"),
    ("http://%45x.com/", "http://ex.com/"),
    ("http://a。b.ü/", "http://a.b.xn--tda/"),
    ("http://[FE80::0:1]:8080/x", "http://[fe80::1]:8080/x"),
    ("http://[::1]/", "http://[::1]/"),
    ("http://[::1", None), ("http://[::1]x/", None), ("http://[fe80::1%25eth0]/", None),
    ("http://[v1.abc]/", None), ("http://a b.com/", None), ("http://x%2Fy.com/", None),
    ("http://x.com%zz/", None), ("http://%ff.com/", None),
    ("http://" + "ü" * 70 + ".com/", None),
    # 5. port: default removed, others kept, bad refused
    ("http://x.com:80/a", "http://x.com/a"), ("https://x.com:443/a", "https://x.com/a"),
    ("ftp://x.com:21/a", "ftp://x.com/a"), ("ws://x.com:80/", "ws://x.com/"),
    ("wss://x.com:443/", "wss://x.com/"), ("http://x.com:080/a", "http://x.com/a"),
    ("https://x.com:8443/a", "https://x.com:8443/a"), ("http://x.com:443/", "http://x.com:443/"),
    ("https://x.com:80/", "https://x.com:80/"), ("http://x.com:/a", "http://x.com/a"),
    ("http://x.com:abc/", None), ("http://x.com:99999/", None), ("http://x.com:1:2/", None),
    ("http://x.com:٣/", None), ("http://x.com:" + "9" * 5000 + "/", None),
    # 6. path: escapes, dot segments, empty path, trailing slash, case, repeated slashes
    ("http://x.com/%7Euser", "http://x.com/~user"), ("http://x.com/%41%2d%5F", "http://x.com/A-_"),
    ("http://x.com/a%2fb", "http://x.com/a%2Fb"), ("http://x.com/a%3fb", "http://x.com/a%3Fb"),
    ("http://x.com/caf%c3%a9", "http://x.com/caf%C3%A9"), ("http://x.com/café", "http://x.com/caf%C3%A9"),
    ("http://x.com/a b", "http://x.com/a%20b"), ('http://x.com/"<>\\^`{|}', "http://x.com/%22%3C%3E%5C%5E%60%7B%7C%7D"),
    ("http://x.com/a\x01\x7fb", "http://x.com/a%01%7Fb"), ("http://x.com/\udcff", "http://x.com/%FF"),
    ("http://x.com/100%", "http://x.com/100%25"), ("http://x.com/%zz%4", "http://x.com/%25zz%254"),
    ("http://x.com/a/./b/../c", "http://x.com/a/c"), ("http://x.com/a/b/..", "http://x.com/a"),
    ("http://x.com/../../a", "http://x.com/a"), ("http://x.com/a/%2E%2e/b", "http://x.com/b"),
    ("http://x.com/.hidden/.", "http://x.com/.hidden"), ("http://x.com/a/..b", "http://x.com/a/..b"),
    ("http://x.com", "http://x.com/"), ("http://x.com/", "http://x.com/"),
    ("http://x.com/a/b/", "http://x.com/a/b"), ("http://x.com/A/b", "http://x.com/A/b"),
    ("http://x.com//a//b", "http://x.com//a//b"), ("http://x.com/a//", "http://x.com/a"), ("http://x.com//", "http://x.com/"),
    ("http://x.com/[a]!$&'()*+,;=:@", "http://x.com/[a]!$&'()*+,;=:@"),
    # 7. query: kept in order, escapes normalised, + kept, empty dropped
    ("http://x.com/a?b=1&a=2", "http://x.com/a?b=1&a=2"), ("http://x.com/a?", "http://x.com/a"),
    ("http://x.com?q=1", "http://x.com/?q=1"), ("http://x.com/a/?q", "http://x.com/a?q"),
    ("http://x.com/?q=a+b%2b%7e c%e9%", "http://x.com/?q=a+b%2B~%20c%E9%25"),
    ("http://x.com/?q=é/?", "http://x.com/?q=%C3%A9/?"),
    # 8. fragment dropped
    ("http://x.com/a#f", "http://x.com/a"), ("http://x.com/a?q=1#f?g", "http://x.com/a?q=1"),
    ("http://x.com/a?#f", "http://x.com/a"), ("http://x.com#f", "http://x.com/"),
])
def test_normalize_url(url, expected):
    assert normalize_url(url) == expected
    if expected is not None:
        assert normalize_url(expected) == expected  # idempotent
    else:
        assert candidates(url) == []


@pytest.mark.parametrize("url", [
    "", " ", "None", "null", "nan", "http://", "http://[::1", "http:// /", "://x.com", "\udcff",
    "http://\udcff/", "http://x.com/\ud800", "http://x.com/?\ud800", "http://" + "a" * 10**6,
    "http://x.com/" + "%" * 10**5, "http://x.com:" + "1" * 10**5, "\x00" * 50, "http://[]/",
    "http://@/", "http://:80/", "http://.../", "http://..com/", "http://x.com" + "/.." * 1000,
])
def test_garbage_never_raises(url):
    out = normalize_url(url)
    assert out is None or out == normalize_url(out)
    assert isinstance(candidates(url), list)


@pytest.mark.parametrize("value", [None, 1, 2.5, float("nan"), b"http://x.com/"])
def test_non_strings_have_no_normal_form(value):
    assert normalize_url(value) is None and candidates(value) == []


def test_candidates_lists_every_key_in_order():
    assert candidates("https://u:p@A.B.Example.com:8443/p1/p2/last.jpg/?q=1#x") == [
        ("url", "https://a.b.example.com:8443/p1/p2/last.jpg?q=1"),
        ("prefix", "https://a.b.example.com:8443/"),
        ("prefix", "https://a.b.example.com:8443/p1"),
        ("prefix", "https://a.b.example.com:8443/p1/p2"),
        ("prefix", "https://a.b.example.com:8443/p1/p2/last.jpg"),
        ("host", "a.b.example.com"),
        ("domain", "a.b.example.com"), ("domain", "b.example.com"), ("domain", "example.com"),
    ]
    assert candidates("http://x.com") == [
        ("url", "http://x.com/"), ("prefix", "http://x.com/"), ("host", "x.com"),
        ("domain", "x.com")]
    assert candidates("http://x.com//a/b//c") == [  # no prefix ends in "/" but the root
        ("url", "http://x.com//a/b//c"), ("prefix", "http://x.com/"),
        ("prefix", "http://x.com//a"), ("prefix", "http://x.com//a/b"),
        ("prefix", "http://x.com//a/b//c"), ("host", "x.com"), ("domain", "x.com")]
    assert candidates(None) == [] and candidates("not a url") == []


@pytest.mark.parametrize("url, host", [
    ("http://1.2.3.4/a", "1.2.3.4"), ("http://[::1]:81/", "[::1]"), ("http://10.0.0.0x7f/", "10.0.0.0x7f"),
    ("http://localhost/", "localhost"),
])
def test_ip_and_single_label_hosts_have_no_domain_keys(url, host):
    keys = candidates(url)
    assert ("host", host) in keys and not [k for k in keys if k[0] == "domain"]


MATCH_CASES = [
    # url: scheme/host case, escapes, ports, trailing slash, IDN, dots, fragment, userinfo, query
    ("url", "HTTP://Example.COM/a", "http://example.com/a", True),
    ("url", "http://example.com/a", "HTTP://Example.COM/a", True),
    ("url", "http://x.com/A", "http://x.com/a", False),
    ("url", "http://x.com/~user", "http://x.com/%7Euser", True),
    ("url", "http://x.com/%7euser", "http://x.com/~user", True),
    ("url", "http://x.com/a/b", "http://x.com/a%2fb", False),
    ("url", "http://x.com/a%2Fb", "http://x.com/a%2fb", True),
    ("url", "http://x.com/café", "http://x.com/caf%c3%a9", True),
    ("url", "http://x.com:80/a", "http://x.com/a", True),
    ("url", "https://x.com:443/a", "https://x.com/a", True),
    ("url", "https://x.com:8443/a", "https://x.com/a", False),
    ("url", "https://x.com/a", "http://x.com/a", False),
    ("url", "http://x.com/a/b/", "http://x.com/a/b", True),
    ("url", "http://x.com", "http://x.com/", True),
    ("url", "http://Bücher.de/x", "http://xn--bcher-kva.de/x", True),
    ("url", "http://x.com/a/./b/../c", "http://x.com/a/c", True),
    ("url", "http://x.com/a#top", "http://x.com/a#bottom", True),
    ("url", "http://x.com/a", "http://bob:secret@x.com/a", True),
    ("url", "http://x.com/a?b=1&a=2", "http://x.com/a?a=2&b=1", False),
    ("url", "http://x.com/a?b=1&a=2", "http://x.com/a?b=1&a=2#f", True),
    ("url", "http://x.com/a", "http://x.com/a?q=1", False),
    ("url", "http://x.com/a?", "http://x.com/a", True),
    ("url", " http://x.com/a ", "http://x.com/a", True),
    # prefix: boundaries, root, query ignored on the pool side, port and scheme part of it
    ("prefix", "https://ex.com/a/", "https://ex.com/a", True),
    ("prefix", "https://ex.com/a/", "https://ex.com/a/b.jpg", True),
    ("prefix", "https://ex.com/a/", "https://ex.com/a/b/c?x=1", True),
    ("prefix", "https://ex.com/a/", "https://ex.com/ab.jpg", False),
    ("prefix", "https://ex.com/a", "https://ex.com/A/b.jpg", False),
    ("prefix", "https://ex.com/a", "https://ex.com/a?x=1", True),
    ("prefix", "https://ex.com/a/b", "https://ex.com/a", False),
    ("prefix", "https://ex.com/", "https://ex.com/any/thing.jpg?q", True),
    ("prefix", "https://ex.com", "https://ex.com/", True),
    ("prefix", "https://ex.com/", "https://www.ex.com/a", False),
    ("prefix", "https://ex.com/", "http://ex.com/a", False),
    ("prefix", "https://ex.com/", "https://ex.com:8443/a", False),
    ("prefix", "https://ex.com:443/a", "https://EX.com/a/b", True),
    ("prefix", "https://ex.com/caf%C3%A9/", "https://ex.com/café/1.jpg", True),
    ("prefix", "https://ex.com/a/../b/", "https://ex.com/b/1.jpg", True),
    ("prefix", "https://ex.com//a", "https://ex.com//a/b", True),
    ("prefix", "https://ex.com/a", "https://ex.com//a/b", False),
    ("prefix", "https://ex.com/a/", "https://ex.com/a//b", True),
    ("prefix", "https://ex.com/a//", "https://ex.com/a//b", True),
    # host: exact, any port and scheme, IDN, IP
    ("host", "example.com", "http://example.com/a", True),
    ("host", "Example.COM.", "https://example.com:8443/a", True),
    ("host", "example.com", "http://www.example.com/a", False),
    ("host", "www.example.com", "http://example.com/a", False),
    ("host", "bücher.de", "http://xn--bcher-kva.de/", True),
    ("host", "xn--bcher-kva.de", "http://BÜCHER.de/", True),
    ("host", "1.2.3.4", "http://1.2.3.4:8080/", True),
    ("host", "[0:0::1]", "http://[::1]/", True),
    # domain: itself and subdomains, not look-alikes
    ("domain", "example.com", "http://img.cdn.example.com/a.jpg", True),
    ("domain", "example.com", "http://example.com/a.jpg", True),
    ("domain", "example.com", "http://notexample.com/a.jpg", False),
    ("domain", "example.com", "http://example.com.evil.net/a.jpg", False),
    ("domain", "*.example.com", "https://a.example.com/", True),
    ("domain", ".Example.com.", "https://a.EXAMPLE.com:81/", True),
    ("domain", "cdn.example.com", "http://example.com/", False),
    ("domain", "bbc.co.uk", "http://news.bbc.co.uk/", True),
    ("domain", "bücher.de", "http://shop.xn--bcher-kva.de/", True),
]


@pytest.mark.parametrize("kind, value, url, expected", MATCH_CASES)
def test_selector_matches_url_iff_key_in_candidates(kind, value, url, expected):
    assert matches(kind, value, url) is expected
    if kind == "url":
        assert (normalize_url(value) == normalize_url(url)) is expected


@pytest.mark.parametrize("kind", ["uid", "md5", "sha256"])
def test_hash_selectors_are_lower_cased(kind):
    digits = 64 if kind == "sha256" else 32
    assert normalize_selector(kind, " " + "AbC0" * (digits // 4) + "\n") == "abc0" * (digits // 4)


@pytest.mark.parametrize("kind, value, message", [
    ("uid", "xyz", "uid: 'xyz' is not 32 hex digits"),
    ("uid", "a" * 33, "is not 32 hex digits"),
    ("md5", "g" * 32, "md5: 'gggg"),
    ("sha256", "a" * 32, "is not 64 hex digits"),
    ("url", "foo", "url: 'foo' has no scheme://host; give an absolute http(s) URL"),
    ("url", "http://x.com:bad/", "invalid port 'bad'"),
    ("url", "http://[::1/", "[IPv6]"),
    ("url", "http://a b/", "forbidden ' '"),
    ("url", "", "no scheme://host"),
    ("prefix", "https://ex.com/a?x=1", "cannot hold a query"),
    ("prefix", "https://ex.com/a#f", "cannot hold a query"),
    ("prefix", "ex.com/a", "prefix: 'ex.com/a' has no scheme://host"),
    ("host", "http://ex.com", "use kind 'url' or 'prefix'"),
    ("host", "ex.com/a", "not a bare host name"),
    ("host", "ex.com:8080", "hosts match regardless of port"),
    ("host", "[::1]:80", "hosts match regardless of port"),
    ("host", "::1", "[brackets]"),
    ("host", "", "empty host"),
    ("host", "user@ex.com", "forbidden '@'"),
    ("host", "*.ex.com", "wildcard"),
    ("domain", "com", "public suffix"),
    ("domain", "*.co.uk", "would match a whole TLD"),
    ("domain", "localhost", "single label"),
    ("domain", "1.2.3.4", "IP address"),
    ("domain", "[::1]", "IP address"),
    ("domain", "ex.com:443", "hosts match regardless of port"),
    ("domain", "a.*.ex.com", "wildcard"),
    ("domain", "https://ex.com/", "use kind 'url' or 'prefix'"),
    ("image", "x", "expected one of uid, url, prefix, host, domain, sha256, md5"),
    ("URL", "http://x.com/", "unknown selector kind 'URL'"),
])
def test_selector_errors_name_the_problem(kind, value, message):
    with pytest.raises(SelectorError) as err:
        normalize_selector(kind, value)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_selector_value_must_be_a_string_and_long_values_are_cut_in_messages():
    with pytest.raises(SelectorError, match="expected a string"):
        normalize_selector("url", None)  # type: ignore[arg-type]
    with pytest.raises(SelectorError) as err:
        normalize_selector("url", "x" * 10_000)
    assert len(str(err.value)) < 300


def test_prefix_and_url_selectors_drop_userinfo():
    assert normalize_selector("prefix", "https://u:p@ex.com/a/") == "https://ex.com/a"
    assert "secret" not in normalize_selector("url", "https://u:secret@ex.com/a")


def _random_url(rng: random.Random) -> str:
    host = rng.choice(["Example.com", "img.cdn.example.com", "bücher.de", "1.2.3.4", "[::1]",
                       "a.b.c.d.e.org", "xn--bcher-kva.de.", "localhost"])
    port = rng.choice(["", ":80", ":443", ":8080"])
    parts = [rng.choice(["a", "B", "..", ".", "", "%7e", "%2f", "caf%C3%A9", "é", "x y", "%"])
             for _ in range(rng.randrange(6))]
    query = rng.choice(["", "?", "?a=1&b=2", "?q=a+b%2b"])
    frag = rng.choice(["", "#f", "#"])
    userinfo = rng.choice(["", "u:p@"])
    return f"{rng.choice(['http', 'HTTPS'])}://{userinfo}{host}{port}/" + "/".join(parts) + \
        query + frag


def test_sanity_over_many_generated_urls():
    rng = random.Random(7)
    for _ in range(3000):
        url = _random_url(rng)
        norm = normalize_url(url)
        keys = candidates(url)
        assert norm is not None and normalize_url(norm) == norm
        assert keys[0] == ("url", norm) and candidates(norm) == keys
        assert len(set(keys)) == len(keys)
        for kind, value in keys:
            assert normalize_selector(kind, value) == value  # keys are canonical selectors
            if kind == "prefix":
                rest = norm[len(value):]
                assert norm.startswith(value) and (value.endswith("/") or rest[:1] in "/?")
