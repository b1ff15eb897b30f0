"""No module deserializes untrusted data unsafely: an AST scan of every package, and the scan's own rules
checked on small snippets (each banned form is flagged by name; the safe forms are not)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "actors", "replay_server", "learner", "benchmarks", "scripts")
PICKLE_LIKE = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}


def aliases(tree) -> dict:
    """local name -> the dotted name it stands for: ``import torch as T`` gives T -> torch,
    ``from torch import load`` gives load -> torch.load, ``import torch.export`` gives torch -> torch."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def qualified(func, names: dict) -> str:
    """The dotted name a call's function resolves to through the imports ('' when it is no plain name)."""
    if isinstance(func, ast.Name):
        return names.get(func.id, func.id)
    if isinstance(func, ast.Attribute):
        base = qualified(func.value, names)
        return f"{base}.{func.attr}" if base else ""
    return ""


def true_kw(node: ast.Call, key: str):
    kw = {k.arg: k.value for k in node.keywords}
    return isinstance(kw.get(key), ast.Constant) and kw[key].value is True


def problems(source: str, where: str = "<snippet>") -> list:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        mods = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        found += [f"{where}:{node.lineno}: imports {m}" for m in mods if m.split(".")[0] in PICKLE_LIKE]
    names = aliases(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        q, at = qualified(node.func, names), f"{where}:{node.lineno}"
        head, _, last = q.rpartition(".")
        if q == "torch.load" and not true_kw(node, "weights_only"):
            found.append(f"{at}: torch.load without weights_only=True")
        if q == "torch.export.load":
            found.append(f"{at}: torch.export.load (unpickles parts of the archive)")
        if head.split(".")[0] in PICKLE_LIKE and last in ("load", "loads", "Unpickler"):
            found.append(f"{at}: {q}")
        if q in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"{at}: {q} (use yaml.safe_load)")
        if q == "numpy.load" and true_kw(node, "allow_pickle"):
            found.append(f"{at}: numpy.load(allow_pickle=True)")
    return found


def test_no_unsafe_deserialization():
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 20
    found = [p for path in files for p in problems(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, found


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("import torch\ntorch.load('x')", "torch.load without weights_only=True"),
        ("import torch\ntorch.load('x', weights_only=False)", "torch.load without weights_only=True"),
        ("import torch as T\nT.load(f)", "torch.load without weights_only=True"),
        ("from torch import load\nload(f, map_location='cpu')", "torch.load without weights_only=True"),
        ("from torch import load as L\nL(f)", "torch.load without weights_only=True"),
        ("import torch\ntorch.export.load('policy.pt2').module()", "torch.export.load"),
        ("import torch.export\ntorch.export.load(p)", "torch.export.load"),
        ("from torch import export\nexport.load(p)", "torch.export.load"),
        ("from torch.export import load\nload(p)", "torch.export.load"),
        ("import torch.export as te\nte.load(p)", "torch.export.load"),
        ("import cloudpickle", "imports cloudpickle"),
        ("from cloudpickle import loads", "imports cloudpickle"),
        ("import pickle as p", "imports pickle"),
        ("cloudpickle.loads(b)", "cloudpickle.loads"),
        ("pickle.load(f)", "pickle.load"),
        ("pickle.loads(b)", "pickle.loads"),
        ("pickle.Unpickler(f).load()", "pickle.Unpickler"),
        ("import yaml\nyaml.load(s)", "yaml.load (use yaml.safe_load)"),
        ("import yaml\nyaml.unsafe_load(s)", "yaml.unsafe_load"),
        ("import numpy as np\nnp.load(f, allow_pickle=True)", "numpy.load(allow_pickle=True)"),
    ],
)
def test_the_scan_flags_each_banned_form(snippet, expected):
    found = problems(snippet)
    assert any(expected in p for p in found), (snippet, found)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(f, map_location='cpu', weights_only=True)",
        "from torch import load\nload(f, weights_only=True)",
        "import yaml\nyaml.safe_load(s)",
        "import numpy as np\nnp.load(f)",
        "from safetensors.torch import load\nload(b)",
        "import json\njson.loads(s)",
        "import torch\ntorch.export.save(program, p)",
    ],
)
def test_the_scan_passes_the_safe_forms(snippet):
    assert problems(snippet) == []
