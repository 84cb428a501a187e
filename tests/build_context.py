"""Which files `docker build .` sends to the daemon: the build context after .dockerignore, by Docker's rules.

Written by hand from Docker's documented rules (docs.docker.com, "Dockerignore files"): pathspec, the
well-kept matcher, implements gitignore's rules, which differ where it matters here (a pattern with no
slash, like `*.mp4`, matches at any depth under gitignore and only at the context root under Docker).

Docker's rules: each line is a pattern (`#` starts a comment line; blank lines are skipped), cleaned like a
path, a leading `/` dropped; `!` re-includes. A file is excluded by the last pattern that matches it or one
of its parent folders. `*` and `?` match within one path component, `**` any number of components (none
included), `[...]` a character class.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern[str]
    include: bool  # a `!` line


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A Docker pattern (cleaned) as a regular expression over a slash-separated relative path."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i == len(pattern) else "(.*/)?"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(char)
        i += 1
    return re.compile(f"^{out}$")


def read_patterns(dockerignore: Path) -> list[Pattern]:
    patterns = []
    for line in dockerignore.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        include = text.startswith("!")
        text = posixpath.normpath(text[1:].strip() if include else text)
        if len(text) > 1 and text.startswith("/"):
            text = text[1:]
        patterns.append(Pattern(pattern_regex(text), include))
    return patterns


def in_context(relative: str, patterns: list[Pattern]) -> bool:
    """Whether the file at `relative` (slash-separated, from the context root) is sent."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]  # the folders above, then the file
    excluded = False
    for pattern in patterns:
        if any(pattern.regex.match(path) for path in candidates):
            excluded = not pattern.include
    return not excluded
