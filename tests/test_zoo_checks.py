"""The MONAI model zoo's CI checks that can run offline: what its premerge job installs from metadata.json, its
pre-commit format of the configs and file sizes, and what a submission's large_files.yml must be.

The zoo's runner is Python 3.10 (its premerge-cpu workflow); it pip-installs ``monai_version``, ``pytorch_version``,
``numpy_version`` and ``required_packages_version`` and nothing else, with the bundle folder on ``sys.path``.
``verify_metadata``, ``verify_net_in_out`` and ``ckpt_export`` are in test_metadata.py and test_downstream_bundle.py.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import zipfile

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version
from pgl_bundle.errors import BadInputError
from pgl_bundle.release import BUNDLE_NAME, WEIGHTS, pack

ZOO_PYTHON = "3.10"  # the zoo's premerge-cpu workflow: actions/setup-python 3.10.14
NUMPY_FOR_ZOO_PYTHON = "2.3"  # numpy 2.3.0 dropped Python 3.10: the zoo's pip finds no numpy >= 2.3 there
# the zoo's necessary files (verify_bundle.py) and its README and data licence conventions
ZOO_FILES = ("LICENSE", "configs/metadata.json", "configs/inference.json", "docs/README.md", "docs/data_license.txt")
MAX_FILE_KB = 1024  # the zoo's pre-commit check-added-large-files --maxkb=1024

# in a fresh interpreter: the bundle package's modules that the configs' `$import`s and dotted `_target_`s load
LOADED_MODULES = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "pgl_bundle")))
"""


def metadata(repo_root) -> dict:
    return json.loads((repo_root / "configs" / "metadata.json").read_text())


def config_modules(repo_root) -> set[str]:
    """Modules the configs import: `$import x` / `$from x import` and the module part of dotted `_target_`s."""
    modules = set()
    for path in (repo_root / "configs").glob("*.json"):
        text = path.read_text()
        modules |= set(re.findall(r'"\$(?:import|from) ([\w.]+)', text))
        for target in re.findall(r'"_target_": "([\w.]+)\.\w+"', text):  # e.g. ignite.handlers.ProgressBar
            modules.add(target)
    return {m for m in modules if m.split(".")[0] != "monai"}  # monai's own: its requirements are monai's


def imported_names(files: list[str]) -> set[str]:
    """Top-level names of every absolute import in ``files``, at any depth (function-level imports included)."""
    names = set()
    for file in files:
        for node in ast.walk(ast.parse(open(file).read())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def requirement_closure(names: set[str]) -> set[str]:
    """``names`` and everything they require (markers evaluated here, extras left out), canonical names."""
    todo, seen = [canonicalize_name(n) for n in names], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def test_required_packages_cover_what_the_configs_import(repo_root):
    """Every third-party package the configs load (through the bundle's code) is in metadata.json, or comes with a
    listed package: the zoo's CI and `monai.bundle` users install from that list alone."""
    modules = sorted(config_modules(repo_root))
    assert "pgl_bundle" in modules and "ignite.handlers" in modules
    cmd = [sys.executable, "-c", LOADED_MODULES, json.dumps(modules)]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    files = json.loads(result.stdout.splitlines()[-1])
    third_party = imported_names(files) | {m.split(".")[0] for m in modules}
    third_party -= set(sys.stdlib_module_names) | {"pgl_bundle"}
    distributions = importlib.metadata.packages_distributions()
    meta = metadata(repo_root)
    provided = requirement_closure({"monai", "torch", "numpy", *meta["required_packages_version"]})
    missing = {
        name: distributions.get(name)
        for name in third_party
        if not {canonicalize_name(d) for d in distributions.get(name, [])} & provided
    }
    assert not missing, f"configs/metadata.json required_packages_version lacks {missing}"


def test_pinned_versions_install_on_the_zoo_python(repo_root):
    """The zoo's runner (Python 3.10) must find every pinned version: a pin whose release needs a newer Python stops
    its premerge job at `pip install`. Checked from installed metadata where the pin is the installed version."""
    meta = metadata(repo_root)
    pins = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], **meta["required_packages_version"]}
    checked = []
    for name, pin in pins.items():
        installed = importlib.metadata.distribution(name)
        if Version(installed.version).public != Version(pin).public:
            continue  # another version is installed here: its Requires-Python is not known offline
        needs = SpecifierSet(installed.metadata.get("Requires-Python") or "")
        assert needs.contains(ZOO_PYTHON), f"{name}=={pin} requires Python {needs}, the zoo runs {ZOO_PYTHON}"
        checked.append(name)
    assert {"monai", "torch", "pytorch-ignite"} <= set(checked)
    assert Version(meta["numpy_version"]) < Version(NUMPY_FOR_ZOO_PYTHON), meta["numpy_version"]


def test_configs_are_in_the_zoo_json_format(repo_root):
    """The zoo's pre-commit pretty-format-json (--no-sort-keys --indent=4): one item per line, 4 spaces, ASCII."""
    for path in sorted((repo_root / "configs").glob("*.json")):
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=True) + "\n", path.name


def test_version_is_in_the_changelog(repo_root):
    meta = metadata(repo_root)
    assert meta["version"] in meta["changelog"]  # the zoo's verify_version_changes


def published_large_files(path) -> str:
    entries = [
        {"path": w, "url": f"https://example.org/{w}", "hash_val": "0" * 32, "hash_type": "md5"} for w in WEIGHTS
    ]
    path.write_text(yaml.safe_dump({"large_files": entries}))
    return str(path)


def test_packed_bundle_has_the_zoo_files_and_no_large_ones(repo_root, tmp_path):
    """The zoo's necessary and preferred files (models/model.pt through large_files.yml); no file over 1 MB."""
    output = pack(
        str(tmp_path / "b.zip"), bundle_root=str(repo_root), large_files=published_large_files(tmp_path / "l")
    )
    members = {info.filename.removeprefix(f"{BUNDLE_NAME}/"): info for info in zipfile.ZipFile(output).infolist()}
    assert set(ZOO_FILES) <= set(members), set(ZOO_FILES) - set(members)
    listed = yaml.safe_load(zipfile.ZipFile(output).read(f"{BUNDLE_NAME}/large_files.yml"))["large_files"]
    assert "models/model.pt" in [entry["path"] for entry in listed]
    large = {name: info.file_size for name, info in members.items() if info.file_size > MAX_FILE_KB * 1024}
    assert not large, large


@pytest.mark.parametrize("unpublished", [{"hash_val": ""}, {}])
def test_pack_refuses_the_placeholder_large_files(repo_root, tmp_path, unpublished):
    """The repository's large_files.yml is a placeholder (no hashes, URLs that lead nowhere); packed, the zoo's CI
    would stop at its first step, downloading the weights. Packing it stops, naming the file and the weights."""
    entries = [
        {"path": WEIGHTS[0], "url": "https://example.org/e.pt", "hash_val": "0" * 32, "hash_type": "md5"},
        {"path": WEIGHTS[1], "url": "https://example.org/m.pt", "hash_type": "md5", **unpublished},
    ]
    placeholder = tmp_path / "large_files.yml"
    placeholder.write_text(yaml.safe_dump({"large_files": entries}))
    with pytest.raises(BadInputError, match=r"large_files\.yml: weights \['models/model\.pt'\]"):
        pack(str(tmp_path / "b.zip"), bundle_root=str(repo_root), large_files=str(placeholder))
    assert not (tmp_path / "b.zip").exists()
