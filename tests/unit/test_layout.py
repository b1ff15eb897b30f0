"""The code's shape, checked: every module is imported as apexq.*, never by a bare folder name."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("actors", "learner", "replay_server", "cluster", "configs")


def python_files():
    for folder in (*PACKAGES, "tests", "benchmarks", "scripts"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def imported_names(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_nothing_imports_a_bare_folder_name():
    bare = [f"{p.relative_to(ROOT)}: {name}" for p in python_files() for name in imported_names(p)
            if name.split(".")[0] in PACKAGES]
    assert not bare, bare


def test_the_default_config_is_package_data():
    from apexq.cluster.config import DEFAULT_CONFIG
    assert DEFAULT_CONFIG.is_file() and DEFAULT_CONFIG.name == "mountaincar.yaml"
