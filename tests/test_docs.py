"""The README and docs/ say what the code does: their examples run here.

1. Every ```` ```python ```` block in README.md and docs/*.md runs, in order,
   in one namespace per file, in a fresh temporary directory: a block with
   ``>>>`` prompts as a doctest, any other as a script.  (pytest's own
   ``--doctest-glob`` does not reach README.md, which is outside
   ``testpaths``, and would read a closing fence as expected output.)
2. The README still opens with the newcomer's two commands, and the output
   it shows for ``examples/quickstart.py`` is what that program prints.
3. docs/API.md is what ``tools/gen_api.py`` generates from the docstrings now.
4. Shell blocks, where cheap: every ``kvstore`` subcommand and option the
   README names exists in the command's parser, and the "A session" block
   is real output -- its commands are run and their output compared (the
   numbers left out where they are sizes, LSNs and times).
"""

from __future__ import annotations

import doctest
import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))

NEWCOMER_COMMANDS = [
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python examples/quickstart.py",
    ".venv/bin/python -m pytest -q",
]


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line number of the first line of code, code) per fenced block."""
    blocks = []
    lang, start, body = None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if lang is None:
            m = re.match(r"^```(\w*)\s*$", line)
            if m:
                lang, start, body = m.group(1), n + 1, []
        elif re.match(r"^```\s*$", line):
            blocks.append((lang, start, "\n".join(body) + "\n"))
            lang = None
        else:
            body.append(line)
    assert lang is None, f"a fenced block opened at line {start - 1} is never closed"
    return blocks


def python_blocks(path: str) -> list[tuple[int, str]]:
    return [(line, code) for lang, line, code in fenced_blocks(read(path)) if lang in ("python", "py", "pycon")]


# --- 1. python blocks run ----------------------------------------------------------------


def run_python_blocks(path: str) -> None:
    """Run the python blocks of ``path`` in order, in one namespace; raise
    AssertionError naming the file and line of the first failure."""
    name = os.path.relpath(path, ROOT)
    namespace: dict = {"__name__": "__docs__"}
    parser = doctest.DocTestParser()
    for line, code in python_blocks(path):
        if ">>>" in code:
            test = parser.get_doctest(code, namespace, f"{name}:{line}", path, line - 1)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
            report: list[str] = []
            runner.run(test, out=report.append, clear_globs=False)
            assert runner.failures == 0, f"{name}, the block at line {line}:\n" + "".join(report)
            namespace.update(test.globs)
        else:
            exec(compile(code, f"{name}:{line}", "exec"), namespace)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: os.path.relpath(p, ROOT))
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples open relative paths such as "mydb"
    run_python_blocks(path)


def test_readme_has_runnable_examples_for_the_quickstart_and_the_concepts():
    blocks = python_blocks(README)
    assert len(blocks) >= 8, "fewer python blocks than the Quickstart and Concepts sections hold"
    assert all(">>>" in code for _, code in blocks), "README examples are written as doctests"


def test_a_failing_example_is_reported(tmp_path):
    doc = tmp_path / "bad.md"
    doc.write_text("text\n\n```python\n>>> 1 + 1\n3\n\n```\n")
    with pytest.raises(AssertionError, match=r"bad\.md, the block at line 4"):
        run_python_blocks(str(doc))


# --- 2. the newcomer's commands and the quickstart ----------------------------------------------


def test_readme_opens_with_the_two_newcomer_commands():
    lang, _, code = fenced_blocks(read(README))[0]
    assert lang == "sh"
    assert code.splitlines() == NEWCOMER_COMMANDS
    assert os.path.exists(os.path.join(ROOT, "examples", "quickstart.py"))


def test_quickstart_output_in_readme_is_what_the_example_prints(tmp_path):
    text = read(README)
    m = re.search(r"`examples/quickstart\.py` does the same.*?prints:\n\n((?:    [^\n]*\n)+)", text, re.S)
    assert m, "README lost the quickstart's printed output"
    shown = [line[4:] for line in m.group(1).splitlines()]
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert out.stdout.splitlines() == shown


# --- 3. the API reference ----------------------------------------------------------------------


def load_gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", os.path.join(ROOT, "tools", "gen_api.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_up_to_date():
    gen_api = load_gen_api()
    assert read(os.path.join(ROOT, "docs", "API.md")) == gen_api.render(), "docs/API.md is out of date: run python tools/gen_api.py"


def test_api_reference_covers_every_public_name():
    import kvstore

    text = read(os.path.join(ROOT, "docs", "API.md"))
    for name in kvstore.__all__:
        assert re.search(rf"^##+ (class )?(kvstore\.)?{re.escape(name)}\b", text, re.M), name
    for cls in (kvstore.Database, kvstore.Transaction):
        for member, value in vars(cls).items():
            if not member.startswith("_") and (callable(value) or isinstance(value, property)):
                assert f"### {cls.__name__}.{member}\n" in text, f"{cls.__name__}.{member}"


# --- 4. shell blocks -----------------------------------------------------------------------


def cli_options() -> dict[str, set[str]]:
    """Subcommand -> its option strings, from the real parser."""
    from kvstore.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def test_every_command_and_option_the_readme_names_exists():
    options = cli_options()
    rows = re.findall(r"^\| `(kvstore [^|]*)\|", read(README), re.M)
    assert len(rows) >= 10, rows
    named = set()
    for row in rows:
        for span in re.findall(r"`kvstore ([^`]*)`", "`" + row):
            words = span.split()
            if words[0].startswith("--"):  # kvstore --version
                assert words[0] in ("--version", "--help")
                continue
            for command in words[0].split("/"):
                assert command in options, f"README names `kvstore {command}`, which does not exist"
                named.add(command)
                for flag in re.findall(r"--[a-z-]+", span):
                    assert flag in options[command], f"README names `kvstore {command} {flag}`, which does not exist"
    assert named == set(options), f"subcommands missing from the README's table: {sorted(set(options) - named)}"


def _normalize(line: str) -> str:
    line = re.sub(r"wal-[0-9a-f]{16}\.log", "wal-0.log", line)  # a segment is named by its first LSN, in hex
    line = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", line)
    return re.sub(r"\s+", " ", line).strip()


def session_block() -> list[str]:
    for _, _, code in fenced_blocks(read(README)):
        if code.startswith("$ kvstore put /tmp/shop"):
            return code.splitlines()
    raise AssertionError("README lost its kvstore session")


def run_session(lines: list[str], workdir: str) -> list[tuple[str, list[str], list[str]]]:
    """Run each ``$ `` command of the session in bash, /tmp/shop moved into
    ``workdir``.  Returns (command, shown output, real output) per command."""
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    steps: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    results = []
    for command, shown in steps:
        real = command.replace("/tmp/shop", os.path.join(workdir, "shop"))
        out = subprocess.run(["bash", "-c", real], capture_output=True, text=True, env=env, cwd=workdir, timeout=60)
        got = (out.stderr + out.stdout).replace(os.path.join(workdir, "shop"), "/tmp/shop").splitlines()
        results.append((command, shown, got))
    return results


#: Subcommands whose output holds sizes, LSNs and times: compared without numbers.
VOLATILE = ("backup", "checkpoint", "check", "stat")


def test_readme_session_is_real_output(tmp_path):
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "kvstore")):
        pytest.skip("the kvstore command is not installed next to this python")
    for command, shown, got in run_session(session_block(), str(tmp_path)):
        if command.split()[1] in VOLATILE:
            shown, got = [_normalize(x) for x in shown], [_normalize(x) for x in got]
        assert got == shown, f"$ {command}\nREADME shows:\n" + "\n".join(shown) + "\nreal output:\n" + "\n".join(got)


def test_session_check_ignores_numbers_only():
    assert _normalize("checkpoint at LSN 800: 0 pages written, 0.011 s") == _normalize("checkpoint at LSN 1260: 12 pages written, 0.5 s")
    assert _normalize("wal_bytes   892") == _normalize("wal_bytes 1536")
    assert _normalize("wal_bytes 892") != _normalize("wal_segments 892")


def test_reading_the_source_names_files_and_functions_that_exist():
    text = read(README)
    section = text[text.index("## Reading the source") : text.index("## Files in a database directory")]
    sources = ""
    for package in ("kvstore", "wal", "pages", "recovery"):
        for path in glob.glob(os.path.join(ROOT, package, "*.py")):
            sources += read(path)
    spans = re.findall(r"`([^`]+)`", section)
    files = [s for s in spans if s.endswith(".py")]
    assert len(files) >= 20, files
    for f in files:
        assert os.path.exists(os.path.join(ROOT, f)), f"README names {f}, which does not exist"
    identifiers = [s for s in spans if re.fullmatch(r"[A-Za-z_][\w.]*(\(\))?", s) and not s.endswith(".py") and not s.isupper()]
    names = [s for s in identifiers if any(c in s for c in "._(")]  # not the `kvstore` command
    assert len(names) >= 15, names
    for name in names:
        last = name.removesuffix("()").split(".")[-1]
        assert re.search(rf"^\s*(def|class) {re.escape(last)}\b", sources, re.M), f"README names `{name}`, which is not defined"
