"""configs/metadata.json validates against the shared MONAI bundle schema (offline copy)."""

from __future__ import annotations

import json
import subprocess
import sys

import tomllib


def test_metadata_validates(repo_root, shared_data):
    schema = shared_data.parent / "bundle" / "meta_schema_20240725.json"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_metadata",
        "--meta_file",
        "configs/metadata.json",
        "--filepath",
        str(schema),
    ]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "metadata is verified with no error" in result.stdout + result.stderr, (
        result.stdout + result.stderr
    )


def test_required_packages_are_pinned_third_party_packages(repo_root):
    """`required_packages_version` is what the model zoo's CI pip-installs: real packages, at the pins of
    pyproject.toml; the bundle's own code is installed from the bundle (`pip install -e <bundle>`), not listed."""
    metadata = json.loads((repo_root / "configs" / "metadata.json").read_text())
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    pins = dict(requirement.split("==") for requirement in project["dependencies"])
    required = metadata["required_packages_version"]
    assert required and project["name"] not in required
    assert {name: pins.get(name) for name in required} == required
    assert (metadata["monai_version"], metadata["pytorch_version"]) == (pins["monai"], pins["torch"])
