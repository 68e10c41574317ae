"""The repository's shape: the model files at the top, the runtime and helpers in folders, imports that run
one way (no cycle, nothing points up a layer) and no imported module that edits sys.path."""
import ast

from conftest import REPO_ROOT

TOP_LEVEL = {"infer", "speech_llm", "unified_cfm", "local_dit", "llama4nar", "whisperx_vae", "app", "evaluate",
             "bench"}
# a module may import its own layer and the ones below it
LAYERS = {"common": 0, "media": 1, "model": 2, "runtime": 3, "training": 4, "evaluation": 4, "script": 5}
MODEL_FILES = {"speech_llm", "unified_cfm", "local_dit", "llama4nar", "whisperx_vae"}
SKIP_DIRS = {"tests", ".git", "docs", "samples"}


def _modules() -> dict:
    """{dotted name: path} of every module of the repository (packages by their __init__)."""
    out = {}
    for path in REPO_ROOT.rglob("*.py"):
        rel = path.relative_to(REPO_ROOT)
        if rel.parts[0] in SKIP_DIRS or any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _layer(name: str) -> int:
    top = name.split(".")[0]
    if top in MODEL_FILES or top in ("lia_x", "speaker_verification"):
        return LAYERS["model"]
    return LAYERS.get(top, LAYERS["script"])


def _imports(name: str, path, modules: dict) -> set:
    """The repository modules `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_top_level_holds_the_model_files_and_the_entry_points():
    assert {p.stem for p in REPO_ROOT.glob("*.py")} == TOP_LEVEL


def test_imports_run_one_way():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    upward = [f"{a} -> {b}" for a, deps in graph.items() for b in deps
              if _layer(b) > _layer(a) and not a.startswith(b + ".")]
    assert not upward, upward
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + ".") or node.startswith(dep + "."):  # a package and its own modules
                continue
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_no_imported_module_edits_sys_path():
    """Only scripts launched by path may make the repository root importable, and then only when launched so."""
    offenders = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) in ("not __package__", "__name__ == '__main__'")
                   for n in ast.walk(node)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.path.insert", "sys.path.append")
                    and id(node) not in guarded and not name.startswith("tools.")):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offenders, offenders
