"""The template's shape: what a newcomer sees at the top, what the engine may import, and
no import circle anywhere (imports are read from the source, not run)."""
import ast
import subprocess
import sys

from conftest import ROOT, child_env

TOP = sorted(p.stem for p in ROOT.glob("*.py"))
PACKAGE = "engine"


def project_files():
    return sorted([*ROOT.glob("*.py"), *(ROOT / PACKAGE).glob("*.py"), *(ROOT / "tests").glob("*.py"),
                   *(ROOT / "bench").glob("*.py")])


def module_name(path):
    relative = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in relative.parts if p not in ("tests", "bench")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path):
    """Every module of ours that `path` imports, at the top or inside a function; imports
    under `if TYPE_CHECKING:` are left out (they never run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                 for node in ast.walk(block)}
    parts = module_name(path).split(".")
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .mod import y
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in (*TOP, PACKAGE) and n in MODULES}
    return found


MODULES = {module_name(p) for p in project_files()}
GRAPH = {module_name(p): imported_modules(p) for p in project_files()}


def test_the_top_level_is_the_users():
    assert len(TOP) <= 6, TOP
    assert set(TOP) == {"main", "config", "model", "util", "analyze", "bootstrap"}
    assert (ROOT / PACKAGE / "__init__.py").exists()
    assert len((ROOT / "config.py").read_text().splitlines()) <= 350  # the schema a user reads


def test_no_import_cycle():
    state = {}  # module -> "visiting" | "done"

    def visit(module, path):
        state[module] = "visiting"
        for imported in sorted(GRAPH.get(module, ())):
            if state.get(imported) == "visiting":
                cycle = path[path.index(imported):] + [imported]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert GRAPH["config"] and GRAPH["engine.run"]  # the parser found imports at all


def test_the_cycle_check_sees_a_cycle():
    GRAPH["engine.errors"].add("engine.run")  # errors -> run -> ... -> errors
    try:
        test_no_import_cycle()
    except AssertionError as e:
        assert "import cycle: " in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")
    finally:
        GRAPH["engine.errors"].discard("engine.run")


def test_the_engine_imports_none_of_the_users_files():
    for module, imports in GRAPH.items():
        if module.startswith(f"{PACKAGE}."):
            assert not {name.split(".")[0] for name in imports} - {PACKAGE}, (module, imports)
    assert GRAPH["engine.errors"] == set()  # a leaf: everything may import it


def test_lines_stay_within_110_characters():
    long = [f"{p.relative_to(ROOT)}:{i}" for p in project_files()
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 110]
    assert not long, long


def test_the_package_and_the_schema_import_no_torch():
    probe = "import sys, engine, config, engine.loader, engine.resolve; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
