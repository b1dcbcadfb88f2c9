"""Write docs/API.md, the API reference, from the docstrings of ``kvstore``.

Run from the repository:

    python tools/gen_api.py            # rewrite docs/API.md
    python tools/gen_api.py --check    # exit 1 if docs/API.md is out of date

``tests/test_docs.py`` runs the check, so a docstring changed without
regenerating the file fails the tests.  What is documented: everything in
``kvstore.__all__`` -- ``kvstore.open``, ``Database`` and ``Transaction``
with their public methods in source order, ``Savepoint``, the errors -- each
with its signature (parameters starting with ``_`` are internal and left
out) and its docstring.  Docstrings are reStructuredText-ish: ````x```` becomes
```x```, an indented block holding ``>>>`` becomes a ```` ```python ````
block (tests/test_docs.py runs it), any other indented block a ```` ```text ````
block.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import kvstore  # noqa: E402  (after the path is set)

API_MD = os.path.join(ROOT, "docs", "API.md")

HEADER = """\
# kvstore API reference

Generated from the docstrings by `tools/gen_api.py`: do not edit by hand.
Regenerate with `python tools/gen_api.py`; `tests/test_docs.py` fails when
this file is out of date.  The concepts behind these calls are in the
README ("Concepts"); the command line is in the README ("Operating") and
`kvstore COMMAND --help`.
"""


def _markdown(doc: str | None) -> str:
    """A docstring as Markdown: paragraphs kept, indented blocks fenced."""
    if not doc:
        return ""
    lines = inspect.cleandoc(doc).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("    ") and (not out or out[-1] == ""):
            block = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                block.append(lines[i][4:])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            lang = "python" if any(b.lstrip().startswith(">>>") for b in block) else "text"
            out += [f"```{lang}", *block, "```", ""]
            continue
        if line.rstrip().endswith("::"):
            line = line.rstrip()[:-1]  # "Example::" -> "Example:"
        out.append(re.sub(r"``([^`]+)``", r"`\1`", line))
        i += 1
    return "\n".join(out).strip() + "\n"


def _signature(obj: object, name: str) -> str:
    sig = inspect.signature(obj)  # type: ignore[arg-type]
    params = []
    star_done = False
    for p in sig.parameters.values():
        if p.name == "self" or p.name.startswith("_"):
            continue
        text = p.name
        if p.annotation is not inspect.Parameter.empty:
            text += f": {p.annotation}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {p.default!r}" if p.annotation is not inspect.Parameter.empty else f"={p.default!r}"
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not star_done:
            params.append("*")
            star_done = True
        params.append(text)
    ret = "" if sig.return_annotation is inspect.Signature.empty else f" -> {sig.return_annotation}"
    return f"{name}({', '.join(params)}){ret}"


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def _members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties defined by ``cls``, in source order."""
    found = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property) or inspect.isfunction(value):
            found.append((name, value))
    return found


def _class_sections(cls: type) -> list[tuple[int, str, str]]:
    """(level, heading, body) for a class and its public members."""
    out = [(2, f"class {cls.__name__}", _markdown(cls.__doc__))]
    for name, member in _members(cls):
        head = f"{cls.__name__}.{name}"
        if isinstance(member, property):
            out.append((3, head, f"`{head}` (read-only property)\n" + ("\n" + _markdown(member.__doc__) if member.__doc__ else "")))
        else:
            out.append((3, head, f"`{_signature(member, head)}`\n\n" + (_markdown(member.__doc__) or "(Not documented yet.)\n")))
    return out


def render() -> str:
    """The text of docs/API.md for the code as it is now."""
    sections: list[tuple[int, str, str]] = [
        (2, "kvstore.__version__", f"The package version (`{kvstore.__version__!r}` here); `kvstore --version` prints it.\n"),
        (2, "kvstore.open", f"`{_signature(kvstore.open, 'kvstore.open')}`\n\n" + _markdown(kvstore.open.__doc__)),
    ]
    errors = []
    for name in kvstore.__all__:
        obj = getattr(kvstore, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            errors.append(obj)
        elif inspect.isclass(obj):
            sections += _class_sections(obj)
    errors.sort(key=lambda cls: len(cls.__mro__))  # the base class first; stable otherwise
    tree = ["```text"]
    for cls in errors:
        tree.append("    " * (len([c for c in cls.__mro__ if c in errors]) - 1) + cls.__name__)
    tree.append("```")
    errors_intro = (
        "\n".join(tree) + "\n\nBad arguments raise the built-in `TypeError` and `ValueError`; "
        "a missing database with `create=False` raises `FileNotFoundError`.\n"
    )
    sections.append((2, "Errors", errors_intro))
    sections += [(3, f"class {cls.__name__}", _markdown(cls.__doc__)) for cls in errors]

    toc = [f"- [{title}](#{_anchor(title)})" for level, title, _ in sections if level == 2]
    out = [HEADER, "## Contents\n", "\n".join(toc) + "\n"]
    out += [f"{'#' * level} {title}\n\n{body}" for level, title, body in sections]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/API.md is out of date, write nothing")
    args = parser.parse_args(argv)
    text = render()
    try:
        with open(API_MD, encoding="utf-8") as f:
            current = f.read()
    except FileNotFoundError:
        current = None
    if args.check:
        if current != text:
            print(f"{API_MD} is out of date: run python tools/gen_api.py", file=sys.stderr)
            return 1
        return 0
    if current != text:
        with open(API_MD, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {API_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
