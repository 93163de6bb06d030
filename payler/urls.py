"""URL helpers shared by the drivers."""

from __future__ import annotations


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
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
