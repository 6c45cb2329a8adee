"""Which charsets may decode legacy header bytes: light, so that reading the config stays cheap."""

from __future__ import annotations

import functools

DEFAULT_LEGACY_CHARSET = "windows-1252"  # a superset of ISO-8859-1 for printable text
_ESCAPES = b"\\n\\u0041+AGE-"  # what escape codecs and UTF-7 would read as something else


@functools.lru_cache(maxsize=32)
def ascii_compatible(charset: str) -> bool:
    """A text charset that reads every ASCII byte as itself: no UTF-16, UTF-7 or escape codecs.

    Only such a charset can decode a header without changing its structure
    (colons, commas, angle brackets, line breaks).
    """
    try:
        if _ESCAPES.decode(charset) != _ESCAPES.decode("ascii"):
            return False
        return bytes(range(128)).decode(charset) == "".join(map(chr, range(128)))
    except (LookupError, UnicodeError, ValueError):
        return False
