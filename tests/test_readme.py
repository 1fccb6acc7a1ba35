"""The README's checked command blocks, run literally (issue 13): every line exits 0 and
prints no warning, on the embedded defaults (the bundled SmolLM2 and corpora)."""
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
