"""The transformers versions amct_hf declares are the ones it is tested on; any other is
refused at import of its transformers-facing parts, naming installed and required."""
import subprocess
import sys

import pytest

from amct_hf.errors import AmctHfError, DependencyVersionError
from amct_hf.modeling.compat import TRANSFORMERS_REQUIREMENT, check_transformers_version, transformers_version_problem


@pytest.mark.parametrize("version", ["5.24.0", "5.24.1", "5.25.0.dev0", "5.99"])
def test_supported_versions_pass(version):
    assert transformers_version_problem(version) is None
    check_transformers_version(version)


@pytest.mark.parametrize("version", ["4.57.6", "4.56.0", "5.0.0", "5.23.9", "6.0.0", "garbage"])
def test_other_versions_are_refused_naming_both(version):
    with pytest.raises(DependencyVersionError, match=rf"transformers {version} is installed.*>=5\.24,<6"):
        check_transformers_version(version)
    assert issubclass(DependencyVersionError, AmctHfError) and issubclass(DependencyVersionError, ImportError)


def test_not_installed():
    with pytest.raises(DependencyVersionError, match="not installed"):
        check_transformers_version(None)


def test_the_installed_version_is_the_declared_one():
    from pathlib import Path

    check_transformers_version()  # the test environment itself
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"{TRANSFORMERS_REQUIREMENT}",' in pyproject


FAKE_OLD = """
import importlib.metadata as metadata, sys
real = metadata.version
metadata.version = lambda name: "4.57.6" if name == "transformers" else real(name)
from amct_hf.cli import main
sys.exit(main(["calibrate", "--no-progress"]))
"""


def test_cli_with_an_old_transformers_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-c", FAKE_OLD], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "amct-hf: error: transformers 4.57.6 is installed, but amct_hf needs "
        f"{TRANSFORMERS_REQUIREMENT} (the versions its tests run on): pip install '{TRANSFORMERS_REQUIREMENT}'")
