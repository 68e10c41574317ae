"""pyproject.toml installs every top-level module and package (`pip install -e .`: imports from any folder)."""
import tomllib

from conftest import REPO_ROOT


def test_every_module_and_package_is_installed():
    tool = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(tool["py-modules"]) == {p.stem for p in REPO_ROOT.glob("*.py")}
    packages = {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")} - {"tests"}
    assert set(tool["packages"]) == packages
