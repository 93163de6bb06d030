"""URL helpers shared by the drivers."""

from __future__ import annotations

import re

#: Query parameters that carry secrets (redis-py and pymongo accept some of these).
_SECRET_PARAMS = re.compile(
    r"([?&](?:password|passwd|pwd|secret|token|sasl_plain_password|tlsCertificateKeyFilePassword)=)[^&#]*",
    re.IGNORECASE,
)


def mask_url(url: str) -> str:
    """``url`` with its password (in the user information or the query) replaced by ``***``."""
    return _mask_userinfo(_SECRET_PARAMS.sub(r"\1***", url))


#: A URL's user information in free text: ``scheme://user:password@`` (the password up to the
#: last ``@`` before a space, so that a raw ``@`` in it is not half shown).
_USERINFO_IN_TEXT = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*):[^\s'\"]*@")


#: A secret query parameter in free text: its value ends at a space or a quote too.
_SECRET_PARAMS_IN_TEXT = re.compile(_SECRET_PARAMS.pattern.replace("[^&#]*", "[^&#\\s'\"]*"), re.I)


def mask_urls(text: str) -> str:
    """``text`` (a log line, a traceback) with the password of every URL in it masked."""
    return _USERINFO_IN_TEXT.sub(r"\1:***@", _SECRET_PARAMS_IN_TEXT.sub(r"\1***", text))


def redact(text: str, url: str) -> str:
    """``text`` (a library's error message, say) without the secrets of ``url`` in it."""
    for secret in _secrets_of(url):
        text = text.replace(secret, "***")
    return text


def _secrets_of(url: str) -> list[str]:
    secrets = [m.group(0).split("=", 1)[1] for m in _SECRET_PARAMS.finditer(url)]
    masked = _mask_userinfo(url)
    if masked != url:
        rest = url.partition("://")[2]
        userinfo = rest.rpartition("@")[0] if "@" in rest else ""
        password = userinfo.split(":", 1)[1] if ":" in userinfo else ""
        secrets.append(password)
        secrets += [part for part in re.split(r"[/:@?&]", password) if len(part) >= 3]
    return sorted({s for s in secrets if s}, key=len, reverse=True)


def _mask_userinfo(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc = rest.partition("/")[0]
    if "@" in netloc:
        userinfo, _, after = rest.partition("/")[0].rpartition("@")
        after += rest[len(netloc) :]
    else:
        # A password holding a raw "/" (not valid, but users write it) ends the netloc early:
        # the user information then runs to the last "@".
        userinfo, _, after = rest.rpartition("@")
    if ":" not in userinfo or "/" in userinfo.split(":", 1)[0]:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{after}"


def scheme_of(url: str) -> str:
    """The lower-cased scheme of ``url`` (``""`` when it has none)."""
    return url.partition("://")[0].lower() if "://" in url else ""
