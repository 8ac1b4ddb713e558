"""configs/metadata.json validates against the shared MONAI bundle schema (offline copy)."""

from __future__ import annotations

import subprocess
import sys


def test_metadata_validates(repo_root, shared_data):
    schema = shared_data.parent / "bundle" / "meta_schema_20240725.json"
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json",
           "--filepath", str(schema)]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "metadata is verified with no error" in result.stdout + result.stderr, (
        result.stdout + result.stderr
    )
