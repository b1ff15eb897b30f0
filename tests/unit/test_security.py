"""No module deserializes untrusted data unsafely."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "actors", "replay_server", "learner", "benchmarks", "scripts")


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield owner, name, node


def test_no_unsafe_deserialization():
    problems = []
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if any(n in ("pickle", "cPickle", "dill", "marshal", "shelve") for n in names):
                    problems.append(f"{path}: imports a pickle-like module")
        for owner, name, node in calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner in ("pickle", "cloudpickle") and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            if owner == "torch" and name == "load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                problems.append(f"{where}: yaml.{name} (use safe_load)")
            if owner == "np" and name == "load":
                kw = {k.arg: k.value for k in node.keywords}
                if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
                    problems.append(f"{where}: np.load(allow_pickle=True)")
    assert not problems, problems


def test_the_check_catches_what_it_claims(tmp_path):
    bad = "import torch, yaml\ntorch.load('x')\nyaml.load(s)\n"
    tree = ast.parse(bad)
    found = {(o, n) for o, n, _ in calls(tree)}
    assert ("torch", "load") in found and ("yaml", "load") in found
