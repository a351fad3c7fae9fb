"""Checks the relative links of the project's Markdown: every file a link names exists, and every
#anchor is a heading of the page it points into (GitHub's anchors: lower case, punctuation
dropped, spaces as hyphens, a repeated heading's with -1, -2).

    python3 tools/check_links.py README.md docs/*.md ...
"""
import re
import sys
from pathlib import Path

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6}) (.*)$")


def slug(title):
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).strip().lower()
    return "".join(c for c in title if c.isalnum() or c in " -_").replace(" ", "-")


def outside_code(text):
    """The lines of `text` outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield line


def anchors(path):
    seen = {}
    found = set()
    for line in outside_code(path.read_text()):
        if match := HEADING.match(line):
            name = slug(match.group(2))
            count = seen.get(name, 0)
            seen[name] = count + 1
            found.add(name if count == 0 else f"{name}-{count}")
    return found


def broken(path):
    """Each link of `path` that leads nowhere, with why."""
    for line in outside_code(path.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue
            name, _, anchor = target.partition("#")
            into = (path.parent / name).resolve() if name else path.resolve()
            if not into.exists():
                yield f"{path}: {target}: no such file"
            elif anchor and into.suffix == ".md" and anchor not in anchors(into):
                yield f"{path}: {target}: no such heading in {into.name}"


def main(paths):
    problems = [problem for path in paths for problem in broken(Path(path))]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
