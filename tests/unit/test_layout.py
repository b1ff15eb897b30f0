"""The code's shape, checked: every module is imported as apexq.*, never by a bare folder name; the
packages depend on each other in one direction; every implementation of an interface of
apexq.core.interfaces has each of its members."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "actors", "learner", "replay_server", "cluster", "configs")
# The apexq packages each package may import besides itself. Dependencies point one way: down to
# core, which imports none; actors and learner never import each other; cluster, the composition
# root, sits above them all and nothing imports it.
MAY_IMPORT = {
    "core": set(),
    "replay_server": {"core"},
    "actors": {"core", "replay_server"},
    "learner": {"core", "replay_server"},
    "cluster": {"core", "replay_server", "actors", "learner", "configs"},
    "configs": set(),
}


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
    bare = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in python_files()
        for name in imported_names(p)
        if name.split(".")[0] in PACKAGES
    ]
    assert not bare, bare


def test_the_default_config_is_package_data():
    from apexq.cluster.config import DEFAULT_CONFIG

    assert DEFAULT_CONFIG.is_file() and DEFAULT_CONFIG.name == "mountaincar.yaml"


def apexq_imports(tree: ast.AST, package: list) -> set:
    """The apexq packages a module of ``package`` (e.g. ["apexq", "cluster", "services"]) imports,
    relative imports resolved."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names = [base + (node.module.split(".") if node.module else [])]
        else:
            continue
        found |= {name[1] for name in names if name[0] == "apexq" and len(name) > 1}
    return found


def test_packages_import_only_downwards():
    wrong = []
    for folder, allowed in MAY_IMPORT.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            package = ["apexq", *path.relative_to(ROOT).parent.parts]
            for target in apexq_imports(ast.parse(path.read_text(), str(path)), package) - allowed - {folder}:
                wrong.append(f"{path.relative_to(ROOT)} imports apexq.{target}")
    assert not wrong, wrong


def test_the_import_check_sees_relative_and_function_level_imports():
    code = "from ..metrics import a\nfrom . import b\nimport numpy\ndef f():\n    from apexq.learner import c\n"
    assert apexq_imports(ast.parse(code), ["apexq", "cluster", "services"]) == {"cluster", "learner"}
    assert apexq_imports(ast.parse("import apexq.core.batch"), ["apexq", "actors"]) == {"core"}


# -- interfaces ---------------------------------------------------------------------------------

# A class defining these methods, with these first parameters, implements the protocol of core/interfaces.py.
PROTOCOLS = {
    "Shard": {"sample": ["self", "n"], "update_priorities": ["self", "keys"]},
    "BlockSink": {"append": ["self", "block"]},
    "WeightsSource": {"poll": ["self"], "wait_first": ["self", "timeout"]},
}
# the implementations there are today: finding fewer means the search above is broken
KNOWN = {
    "Shard": {"ReplayShard", "RayShardProxy", "RedisShardClient", "ShardProcess"},
    "BlockSink": {"StreamWriter", "DirectWriter", "EncodingWriter"},
    "WeightsSource": {"WeightsClient", "DirectWeights", "NoWeights"},
}


def classes(path: Path) -> dict:
    """name -> ClassDef of the module's top-level classes."""
    return {n.name: n for n in ast.parse(path.read_text(), str(path)).body if isinstance(n, ast.ClassDef)}


def methods(cls: ast.ClassDef) -> dict:
    """name -> arguments of each method (a property is an attribute here)."""
    return {
        n.name: n.args
        for n in cls.body
        if isinstance(n, ast.FunctionDef)
        and not any(isinstance(d, ast.Name) and d.id == "property" for d in n.decorator_list)
    }


def members(cls: ast.ClassDef) -> set:
    """Every name the class defines: methods, properties, class attributes (annotated or
    assigned) and the attributes its __init__ assigns to self."""
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    for n in cls.body:
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    for n in cls.body:
        if isinstance(n, ast.FunctionDef) and n.name == "__init__":
            names |= {
                a.attr
                for a in ast.walk(n)
                if isinstance(a, ast.Attribute)
                and isinstance(a.ctx, ast.Store)
                and isinstance(a.value, ast.Name)
                and a.value.id == "self"
            }
    return names - {"__init__"}


def takes(impl: ast.arguments, spec: ast.arguments) -> bool:
    """Does a method with parameters ``impl`` accept every call that ``spec`` allows: the same
    parameters first, and defaults for the ones ``spec`` gives defaults and for any further ones?"""
    names, wanted = [a.arg for a in impl.args], [a.arg for a in spec.args]
    extra = len(names) - len(wanted)
    return names[: len(wanted)] == wanted and len(impl.defaults) >= extra + len(spec.defaults)


def implementations() -> dict:
    """protocol -> [(where, ClassDef)] for every class of the packages and benchmarks that implements it."""
    found: dict = {name: [] for name in PROTOCOLS}
    for folder in (*PACKAGES, "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for cls in classes(path).values():
                have = methods(cls)
                for proto, sig in PROTOCOLS.items():
                    if all(
                        m in have and [a.arg for a in have[m].args[: len(first)]] == first for m, first in sig.items()
                    ):
                        found[proto].append((f"{path.relative_to(ROOT)}:{cls.name}", cls))
    return found


def test_every_implementation_defines_each_member_of_its_protocol():
    protocols = classes(ROOT / "core" / "interfaces.py")
    assert set(protocols) == set(PROTOCOLS)
    for proto, impls in implementations().items():
        assert KNOWN[proto] <= {cls.name for _, cls in impls}, (proto, [where for where, _ in impls])
        spec = protocols[proto]
        for where, cls in impls:
            missing = members(spec) - members(cls)
            assert not missing, f"{where} lacks {sorted(missing)} of apexq.core.interfaces.{proto}"
            have = methods(cls)
            for name, args in methods(spec).items():
                assert name in have and takes(have[name], args), (
                    f"{where}.{name} does not take the parameters of apexq.core.interfaces.{proto}.{name}"
                )


def test_a_class_that_forgets_a_member_or_a_parameter_fails_the_check():
    forgetful = ast.parse(
        "class W:\n    def __init__(self):\n        self.version = -1\n"
        "    def poll(self):\n        pass\n    def wait_first(self):\n        pass\n"
    ).body[0]
    spec = classes(ROOT / "core" / "interfaces.py")["WeightsSource"]
    assert members(spec) - members(forgetful) == {"lag", "close"}
    assert not takes(methods(forgetful)["wait_first"], methods(spec)["wait_first"])
