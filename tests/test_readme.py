"""The documentation stays true.

- The README's checked command blocks run literally: every line exits 0 and prints no
  warning, on the embedded defaults (the bundled SmolLM2 and corpora).
- Every relative Markdown link in the README, docs/, benchmarks/ and recipes/ resolves to an
  existing file, and every repository path they mention (``amct_hf/...``, ``tests/...``,
  ``benchmarks/...``, ``recipes/...``, ``docs/...``, ``scripts/...`` with a file extension)
  exists; in benchmarks/README.md and recipes/README.md a bare script name in backticks
  must be a file of that folder.
- The README is a user guide: at most 320 lines, no issue numbers, no commit hashes.
"""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- readme-check -->"


def checked_commands():
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(re.escape(MARK) + r"\s*```bash\n(.*?)```", text, flags=re.S):
        commands += [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return commands


def test_the_readme_has_checked_blocks():
    commands = checked_commands()
    assert len(commands) >= 6
    assert any(c.startswith(".venv/bin/amct-hf calibrate") for c in commands)


@pytest.mark.slow
def test_readme_commands_run_as_written(smollm2_dir, tmp_path):
    # a scratch working directory that looks like the repository root to the commands
    for name in (".venv", "recipes"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "AMCT_HF_CACHE": str(smollm2_dir.parent), "PYTHONWARNINGS": "default"}
    for command in checked_commands():
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600, stdin=subprocess.DEVNULL)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{command}\n{output[-3000:]}"
        warned = [line for line in output.splitlines() if re.search(r"warn", line, re.I)]
        assert not warned, f"{command}\n" + "\n".join(warned)
    one, two = (tmp_path / "llama_kv.txt").read_bytes(), (tmp_path / "llama_kv_2proc.txt").read_bytes()
    assert one == two and one.count(b"kv_cache_value") == 60
    assert shlex.split(checked_commands()[0])[0] == ".venv/bin/amct-hf"


DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
        "benchmarks/README.md", "recipes/README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a repository path: starts at a top-level folder, ends in a file extension
REPO_PATH = re.compile(r"(?<![\w./-])((?:amct_hf|tests|benchmarks|recipes|docs|scripts)/"
                       r"[\w./-]*?\.(?:py|sh|md|txt|toml))\b")
BARE_SCRIPT = re.compile(r"`([\w-]+\.(?:py|sh))`")
ISSUE = re.compile(r"\bissues?\s*#?\d|#\d+")
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b")


def _doc_text(name):
    path = ROOT / name
    assert path.is_file(), f"{name} is missing"
    return path.read_text()


@pytest.mark.parametrize("name", DOCS)
def test_relative_links_resolve(name):
    text = _doc_text(name)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        target = target.split("#", 1)[0]
        if not ((ROOT / name).parent / target).exists():
            broken.append(target)
    assert not broken, f"{name}: links to missing files: {broken}"


def mentioned_paths(name):
    """The repository paths a document mentions, relative to the repository root."""
    text = _doc_text(name)
    paths = set(REPO_PATH.findall(text))
    if name in ("benchmarks/README.md", "recipes/README.md"):
        folder = name.split("/")[0]
        paths |= {f"{folder}/{script}" for script in BARE_SCRIPT.findall(text)}
    return sorted(paths)


@pytest.mark.parametrize("name", DOCS)
def test_mentioned_paths_exist(name):
    missing = [p for p in mentioned_paths(name) if not (ROOT / p).exists()]
    assert not missing, f"{name} mentions paths that do not exist: {missing}"


def test_the_readme_is_a_user_guide():
    text = _doc_text("README.md")
    assert len(text.splitlines()) <= 320


@pytest.mark.parametrize("name", DOCS)
def test_no_issue_numbers_or_commit_hashes(name):
    text = _doc_text(name)
    assert not ISSUE.findall(text), f"{name} cites issues: {ISSUE.findall(text)}"
    assert not COMMIT.findall(text), f"{name} cites commits: {COMMIT.findall(text)}"
