"""Credentials never reach an artifact: the one home of redaction (pure Python, no Spark).

Everything the project writes for people (the HTML report, export manifests, console lines,
error messages) passes its config, locations and messages through here first:

* :func:`is_secret_key`: whether a setting's name says its value is a credential
  (``spark.hadoop.fs.s3a.secret.key``, ``fs.azure.account.key.<account>``,
  ``fs.azure.sas.<container>.<account>``, ``fs.gs.auth.service.account.private.key``,
  ``AWS_SESSION_TOKEN``, ``password``, ...), and not for look-alikes such as
  ``max_caption_chars`` or ``tokenizer``;
* :func:`redact_url`: a URL's ``user:password@``, and its query or Spark Connect
  (``sc://host:443/;token=...``) parameters that carry a credential or a presigned URL's
  signature;
* :func:`redact_text`: URLs and ``key=value`` / ``key: value`` pairs inside free text;
* :func:`redact`: the same over a whole structure (dicts, lists, dataclasses, strings).

A redacted value reads :data:`REDACTED`. Redaction is for what people read: a location with no
credential in it comes back unchanged, so a redacted manifest still names real paths.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

REDACTED = "***"

# a name part (after splitting on . _ - / and camelCase) holding one of these is secret
_SECRET_IN_PART = ("secret", "password", "passwd", "passphrase", "credential")
# ... or equal to one of these
_SECRET_PARTS = frozenset({
    "pwd", "creds", "sas", "sig", "signature", "auth", "authorization", "bearer", "cookie",
    "apikey", "accesskey", "accountkey", "privatekey", "sharedkey", "signingkey", "secretkey",
    "encryptionkey", "clientsecret"})
# ... or ending the name's parts in this order (``fs.s3a.access.key``, ``AWS_ACCESS_KEY_ID``)
_SECRET_PAIRS = frozenset({
    ("access", "key"), ("account", "key"), ("private", "key"), ("api", "key"),
    ("shared", "key"), ("signing", "key"), ("encryption", "key"), ("master", "key"),
    ("storage", "key"), ("client", "key")})
# a name whose last part is one of these names a kind, a switch, a class or a count, never the
# credential itself (``fs.s3a.aws.credentials.provider``, ``fs.azure.account.auth.type``)
_NOT_A_VALUE = frozenset({
    "provider", "providers", "type", "impl", "class", "enable", "enabled", "count", "length",
    "expiry", "expiration", "ttl", "timeout", "file", "path", "keyfile", "location"})
# query parameters that are credentials in a URL though not by name elsewhere (presigned S3,
# GCS, Azure SAS and CloudFront URLs; Google API keys)
_URL_SECRET_PARAMS = frozenset({
    "key", "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid",
    "x-goog-signature", "x-goog-credential", "googleaccessid", "policy", "key-pair-id", "code"})

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SPLIT = re.compile(r"[^a-z0-9]+")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://)"
                       r"(?P<user>[^/?#@\s:]*)(?::(?P<password>[^?#@\s]*))?@")
_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#?/]+)=(?P<value>[^&;#]*)")
# key=value / key: value, the key bare or quoted ('key': 'value' in a dict's repr, JSON);
# a value is quoted (spaces allowed), a bearer/basic scheme and its token, or one bare word
_PAIR = re.compile(
    r"(?P<q>['\"]?)(?P<key>[A-Za-z_][\w.\-]*)(?P=q)(?P<sep>\s*[=:]\s*)"
    r"(?:(?P<vq>['\"])(?P<quoted>[^'\"\n]*)(?P=vq)"
    r"|(?P<bare>(?:(?:bearer|basic|token)\s+)?[^\s'\",;&{}\[\]()<>]+))",
    re.IGNORECASE)
_AZURE_SCHEMES = ("abfs://", "abfss://", "wasb://", "wasbs://")  # user@ is the container


def name_parts(key: str) -> list[str]:
    """``key`` lower-cased and split on ``.``, ``_``, ``-``, ``/``, spaces and camelCase."""
    return [p for p in _SPLIT.split(_CAMEL.sub("_", key).lower()) if p]


def is_secret_key(key: str) -> bool:
    """True when a setting, environment variable or URL parameter named ``key`` holds a
    credential: a password, secret, token, credential, access/account/private/API key, SAS
    token, signature or auth value, in any of the ``.``/``_``/``-``/camelCase spellings."""
    parts = name_parts(str(key))
    if not parts or parts[-1] in _NOT_A_VALUE:
        return False
    for i, part in enumerate(parts):
        if part in _SECRET_PARTS or part.endswith("token"):
            return True
        if any(word in part for word in _SECRET_IN_PART):
            return True
        if i and (parts[i - 1], part) in _SECRET_PAIRS:
            return True
    return False


def _secret_param(name: str) -> bool:
    return name.strip().lower() in _URL_SECRET_PARAMS or is_secret_key(name)


def redact_url(url: str) -> str:
    """``url`` with its credentials replaced by :data:`REDACTED`: ``user:password@`` (any
    user part too, except an Azure URL's ``container@``), and the value of every query or Spark
    Connect ``;name=value`` parameter whose name is secret (:func:`is_secret_key`) or a
    presigned URL's (``X-Amz-Signature``, ``X-Amz-Credential``, ``sig``, ...)."""
    m = _USERINFO.match(url)
    if m and _is_userinfo(m, url):
        url = f"{m['head']}{REDACTED}@{url[m.end():]}"
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    authority, slash, tail = rest.partition("/")
    if not slash and ("?" in authority or ";" in authority):  # sc://host:443;token=... too
        cut = min(i for i in (authority.find("?"), authority.find(";")) if i >= 0)
        authority, tail = authority[:cut], authority[cut:]
    tail = _PARAM.sub(lambda p: p[0] if not _secret_param(p["name"]) or p["value"] == REDACTED
                      else f"{p['sep']}{p['name']}={REDACTED}", tail)
    return f"{head}{sep}{authority}{slash}{tail}"


def _is_userinfo(m: re.Match, url: str) -> bool:
    """Whether the ``...@`` a URL starts with is a login, not an Azure container or a path."""
    password = m["password"]
    if password is None:
        return not url.lower().startswith(_AZURE_SCHEMES) and bool(m["user"])
    return not re.match(r"\d+(/|$)", password)  # host:443/a@b is a port and a path


def redact_text(text: str) -> str:
    """Free text (a log line, an exception message, a YAML or JSON dump) with every URL passed
    through :func:`redact_url` and the value of every ``key=value`` / ``key: value`` pair
    whose key is secret replaced (``fs.s3a.secret.key=abc`` -> ``fs.s3a.secret.key=***``)."""
    text = _URL.sub(lambda m: redact_url(m[0]), str(text))
    return _PAIR.sub(_redact_pair, text)


def _redact_pair(m: re.Match) -> str:
    start = m.start("vq") if m["vq"] else m.start("bare")
    head, value = m.string[m.start():start], m.string[start:m.end()]
    if not is_secret_key(m["key"]):  # the value may hold pairs itself (conf: a.token=x)
        return head + _PAIR.sub(_redact_pair, value)
    return head + (f"{m['vq']}{REDACTED}{m['vq']}" if m["vq"] else REDACTED)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` safe to show: dataclasses become dicts; in dicts, the value of each
    secret key (:func:`is_secret_key`) is :data:`REDACTED` (each scalar of it, when a
    mapping or list); every string goes through :func:`redact_text`. ``None``, booleans and
    numbers under ordinary keys come back as they are."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return redact(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {_key(k): _mask(v) if isinstance(k, str) and is_secret_key(k) else redact(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def _key(key: Any) -> Any:
    return redact_text(key) if isinstance(key, str) and "://" in key else key


def _mask(value: Any) -> Any:
    """Every value under a secret key: scalars (not None, not a boolean switch) redacted."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {_key(k): _mask(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask(v) for v in value]
    if value is None or isinstance(value, bool) or value == "":
        return value
    return REDACTED
