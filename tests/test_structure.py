"""Structure rules of the code base, read from the source with ast (no project module is imported,
except megacpt.cli in a subprocess by the last test):

- no function over MAX_FUNCTION_LINES lines in megacpt/ or kernels/;
- no import cycle among project modules (imports inside functions count);
- the layers: what models, data, kernels and config may import, who may import the CLI, and that
  below the CLI the project's own modules are imported at module level;
- one module (megacpt/train/parallelize.py) applies tensor parallelism, ZeRO-3 partitioning,
  torch.compile and deepspeed.initialize;
- `megacpt --help` and a config error import neither torch nor deepspeed.

Module names follow the installed package: megacpt/x/y.py is `megacpt.x.y`, kernels/x.py is
`megacpt.kernels.x` (setup.py maps the folder), a package is its __init__.py. An import under
`if TYPE_CHECKING:` never runs, so it takes no part in cycles and may sit anywhere, but it is
still a dependency for the layer rules. Imports through importlib (the CLI's lazy targets) are
not imports here.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
# Source folder -> the package name it is installed as.
ROOTS = {"megacpt": "megacpt", "kernels": "megacpt.kernels"}
CLI_LAYER = ("megacpt/cli/", "megacpt/__main__.py", "megacpt/train/__main__.py", "megacpt/preflight/__main__.py")
PARALLELIZE = "megacpt/train/parallelize.py"


@dataclass(frozen=True)
class Module:
    name: str
    rel: str  # path relative to the repository, for messages
    is_package: bool
    tree: ast.Module


@dataclass(frozen=True)
class Import:
    importer: Module
    line: int
    text: str
    target: str  # the module it names, resolved as described in _targets
    in_function: bool
    type_checking: bool  # under `if TYPE_CHECKING:` (never executed)

    def where(self) -> str:
        return f"{self.importer.rel}:{self.line}: {self.text}"


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    parts[:1] = ROOTS[parts[0]].split(".")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def modules() -> dict[str, Module]:
    found = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO)
            name = _module_name(rel)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
            found[name] = Module(name, rel.as_posix(), path.name == "__init__.py", tree)
    return found


def _is_project(name: str, package: str = "megacpt") -> bool:
    return name == package or name.startswith(package + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST, in_function: bool = False, type_checking: bool = False):
    """(import node, inside a function?, under `if TYPE_CHECKING:`?) for every import below node."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function, type_checking
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), in_function, type_checking)
        else:
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from _import_nodes(child, nested, type_checking)


def _from_base(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".")
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _targets(module: Module, node) -> list[str]:
    """`import a.b.c` names a.b.c; `from pkg import name` names pkg.name when that is a project
    module, else pkg; relative imports are resolved against the importing module's package."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = _from_base(module, node)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in node.names]


@functools.cache
def project_imports() -> list[Import]:
    found = []
    for module in modules().values():
        for node, in_function, type_checking in _import_nodes(module.tree):
            text = ast.unparse(node)
            for target in dict.fromkeys(_targets(module, node)):
                if _is_project(target):
                    found.append(Import(module, node.lineno, text, target, in_function, type_checking))
    return found


def _fail(rule: str, lines: list[str]) -> None:
    if lines:
        raise AssertionError(f"{rule} — {len(lines)} violation(s):\n  " + "\n  ".join(lines))


# ---- functions --------------------------------------------------------------------------------

def test_no_function_is_longer_than_80_lines():
    long = []
    for module in modules().values():
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module.rel}:{node.lineno}: {node.name} has {n} lines")
    _fail(f"functions over {MAX_FUNCTION_LINES} lines (end_lineno - lineno + 1)", long)


# ---- import cycles ----------------------------------------------------------------------------

def _import_graph() -> dict[str, dict[str, Import]]:
    """importer -> {imported module: first import naming it}. `if TYPE_CHECKING:` imports never
    run, so they cannot take part in a cycle."""
    graph: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in project_imports():
        if imp.target in modules() and not imp.type_checking:
            graph[imp.importer.name].setdefault(imp.target, imp)
    return graph


def _strongly_connected(graph) -> list[set[str]]:
    """Tarjan's algorithm, iterative (the graph is small, but recursion depth is not ours to pick)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start), on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    out.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child), on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, {})))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def _shortest_path(graph, start: str, goal: str, within: set[str]) -> list[str]:
    previous = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = []
            while node is not None:
                path.append(node)
                node = previous[node]
            return path[::-1]
        for child in sorted(graph.get(node, {})):
            if child in within and child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"no path {start} -> {goal} inside its own component")


def import_cycles(graph) -> list[list[str]]:
    """One shortest cycle through every import edge that lies on a cycle (each listed once)."""
    cycles, seen = [], set()
    for component in _strongly_connected(graph):
        for a in sorted(component):
            for b in sorted(graph.get(a, {})):
                if b not in component:
                    continue
                cycle = [a] + _shortest_path(graph, b, a, component)  # [a, a] for a self-import
                body = cycle[:-1]
                turn = body.index(min(body))
                key = tuple(body[turn:] + body[:turn])
                if key not in seen:
                    seen.add(key)
                    cycles.append(list(key) + [key[0]])
    return cycles


def test_no_import_cycles():
    graph = _import_graph()
    chains = []
    for cycle in import_cycles(graph):
        steps = [f"{a} ({graph[a][b].where()})" for a, b in zip(cycle, cycle[1:])]
        chains.append(" -> ".join(steps) + f" -> {cycle[-1]}")
    _fail("import cycles among project modules (imports inside functions count)", chains)


# ---- layers -----------------------------------------------------------------------------------

def _forbidden(importers: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{imp.where()}  [{imp.target}]" for imp in project_imports()
            if _is_project(imp.importer.name, importers) and any(_is_project(imp.target, f) for f in forbidden)]


def test_models_import_no_train_parallel_or_data():
    _fail("megacpt.models imports megacpt.train / megacpt.parallel / megacpt.data",
          _forbidden("megacpt.models", ("megacpt.train", "megacpt.parallel", "megacpt.data")))


def test_data_imports_no_models_train_or_cli():
    _fail("megacpt.data imports megacpt.models / megacpt.train / megacpt.cli",
          _forbidden("megacpt.data", ("megacpt.models", "megacpt.train", "megacpt.cli")))


def test_kernels_import_only_megacpt_kernels():
    bad = [f"{imp.where()}  [{imp.target}]" for imp in project_imports()
           if imp.importer.rel.startswith("kernels/") and not _is_project(imp.target, "megacpt.kernels")]
    _fail("kernels/ imports megacpt outside megacpt.kernels", bad)


def test_config_imports_no_train():
    _fail("megacpt.config imports megacpt.train", [
        f"{imp.where()}  [{imp.target}]" for imp in project_imports()
        if imp.importer.name == "megacpt.config" and _is_project(imp.target, "megacpt.train")])


def _in_cli_layer(module: Module) -> bool:
    return any(module.rel == p or (p.endswith("/") and module.rel.startswith(p)) for p in CLI_LAYER)


def test_only_the_cli_layer_imports_the_cli():
    bad = [f"{imp.where()}  [{imp.target}]" for imp in project_imports()
           if _is_project(imp.target, "megacpt.cli") and not _in_cli_layer(imp.importer)]
    _fail("megacpt.cli imported outside the CLI layer " + ", ".join(CLI_LAYER), bad)


HEAVY_OPTIONAL = ("triton", "transformers", "matplotlib", "lm_eval")


def _wraps_heavy_optional(target: str) -> bool:
    """A project module whose top level imports a heavy optional third-party package (e.g. the
    Triton kernels): importing it lazily is importing that package lazily, which is allowed."""
    module = modules().get(target)
    for node in module.tree.body if module is not None else []:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(n.split(".")[0] in HEAVY_OPTIONAL for n in names):
            return True
    return False


def test_project_imports_are_at_module_level_below_the_cli():
    bad = [imp.where() for imp in project_imports()
           if imp.in_function and not imp.type_checking and not _in_cli_layer(imp.importer)
           and not _wraps_heavy_optional(imp.target)]
    bad = list(dict.fromkeys(bad))  # one line per import statement, whatever it names
    _fail("project modules imported inside a function (below the CLI they go at the top of the file)", bad)


# ---- one module applies parallelism and compile -----------------------------------------------

def _dotted(node: ast.expr) -> str | None:
    """`a.b.c` for a chain of names and attributes, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _bindings(tree: ast.Module) -> tuple[dict[str, str], set[str]]:
    """Local name -> the qualified name an import binds to it (wherever the import is), and the
    names bound by plain `import x` statements (modules for certain)."""
    names, module_names = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                local = a.asname or a.name.partition(".")[0]
                names[local] = a.name if a.asname else local
                module_names.add(local)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names, module_names


def _qualified(dotted: str, names: dict[str, str]) -> str:
    head, _, rest = dotted.partition(".")
    head = names.get(head, head)
    return f"{head}.{rest}" if rest else head


def _application(func: ast.expr, names: dict[str, str], module_names: set[str]) -> str | None:
    """What a call of `func` applies, if it is one of the calls reserved to parallelize.py."""
    dotted = _dotted(func)
    qualified = _qualified(dotted, names) if dotted else None
    last = dotted.rpartition(".")[2] if dotted else (func.attr if isinstance(func, ast.Attribute) else None)
    if last in ("apply_tp", "compile_pointwise"):
        return last
    if qualified == "deepspeed.initialize":
        return "deepspeed.initialize"
    if last == "Init" and dotted and (dotted.endswith("zero.Init") or qualified.startswith("deepspeed.")):
        return "zero.Init"
    if qualified == "torch.compile":
        return "torch.compile"
    if isinstance(func, ast.Attribute) and func.attr == "compile":
        receiver = func.value
        # `re.compile(...)` and the like: a function of an imported (non-torch) module.
        if isinstance(receiver, ast.Name) and receiver.id in module_names:
            return None
        return f"{ast.unparse(receiver)}.compile()"
    return None


def _functions_by_node(tree: ast.Module) -> dict[ast.AST, list[ast.AST]]:
    """Each node -> the function definitions it lies in, outermost first."""
    enclosing: dict[ast.AST, list[ast.AST]] = {}

    def visit(node, chain):
        for child in ast.iter_child_nodes(node):
            enclosing[child] = chain
            inner = chain + [child] if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else chain
            visit(child, inner)

    visit(tree, [])
    return enclosing


def _kernel_functions(module: Module) -> set[str]:
    """Names in a kernels/ module that are functions of kernels/: defined in it, or imported from
    megacpt.kernels."""
    names = {n.name for n in ast.walk(module.tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom) and _is_project(_from_base(module, node), "megacpt.kernels"):
            names.update(a.asname or a.name for a in node.names)
    return names


def _exempt(module: Module, what: str, target: ast.AST | None, functions: list[ast.AST],
            kernel_functions: set[str]) -> bool:
    """The named exemptions (see test_parallelism_and_compile_are_applied_in_parallelize_only)."""
    in_def = {f.name for f in functions}
    if module.rel == "megacpt/bench/peers.py":
        return True
    if module.rel.startswith("kernels/") and what == "torch.compile":
        return isinstance(target, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
            isinstance(target, ast.Name) and target.id in kernel_functions)
    if module.rel == "megacpt/models/llama.py" and what == "torch.compile":
        return "compile_pointwise" in in_def
    if module.rel == "megacpt/parallel/tp.py" and what == "apply_tp":
        return "apply_tp" in in_def
    return False


def parallelism_applications() -> list[str]:
    found = []
    for module in modules().values():
        if module.rel == PARALLELIZE:
            continue
        names, module_names = _bindings(module.tree)
        enclosing = _functions_by_node(module.tree)
        kernel_functions = _kernel_functions(module) if module.rel.startswith("kernels/") else set()
        decorators = {d for n in ast.walk(module.tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for d in n.decorator_list}
        for node in ast.walk(module.tree):
            applied = []  # (what, the node applying it, what it is applied to, the defs it lies in)
            if isinstance(node, ast.Call) and node not in decorators:
                what = _application(node.func, names, module_names)
                if what:
                    applied.append((what, node, node.args[0] if node.args else None, enclosing.get(node, [])))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # @torch.compile on a def
                for deco in node.decorator_list:
                    func = deco.func if isinstance(deco, ast.Call) else deco
                    if _qualified(_dotted(func) or "", names) == "torch.compile":
                        applied.append(("torch.compile", deco, node, enclosing.get(node, [])))
            for what, at, target, functions in applied:
                if not _exempt(module, what, target, functions, kernel_functions):
                    found.append((module.rel, at.lineno, f"{what}: {ast.unparse(at).splitlines()[0][:100]}"))
    return [f"{rel}:{line}: {text}" for rel, line, text in sorted(found)]


def test_parallelism_and_compile_are_applied_in_parallelize_only():
    """apply_tp, zero.Init, torch.compile / <module>.compile() / compile_pointwise and
    deepspeed.initialize are called from megacpt/train/parallelize.py only. Exemptions, and no
    others: megacpt/bench/peers.py (the peer baselines are the other system); kernels/ compiling
    their own functions; megacpt/models/llama.py's compile_pointwise, which defines the compiled
    pieces (applying it is parallelize.py's); megacpt/parallel/tp.py's apply_tp calling itself."""
    _fail(f"parallelism / compile applied outside {PARALLELIZE}", parallelism_applications())


# ---- the CLI stays light ----------------------------------------------------------------------

_LIGHT_CLI = r"""
import contextlib, io, json, sys

from megacpt.cli import build_parser, main

HEAVY = ("torch", "deepspeed")
steps = {}


def record(step, rc=None, err=""):
    steps[step] = {"heavy": [m for m in HEAVY if m in sys.modules], "rc": rc, "stderr": err[-2000:],
                   "project": sorted(m for m in sys.modules if m.startswith("megacpt"))}


build_parser()
record("build_parser()")
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        main(["--help"])
except SystemExit as e:
    record("megacpt --help", e.code)
else:
    record("megacpt --help", "no SystemExit")
for step, argv in (("missing config", ["train", sys.argv[1]]), ("unknown config key", ["train", sys.argv[2]])):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(argv)
    except BaseException as e:
        rc = f"raised {type(e).__name__}: {e}"
    record(step, rc, err.getvalue())
print("RESULT " + json.dumps(steps))
"""


def test_cli_help_and_config_errors_import_neither_torch_nor_deepspeed(tmp_path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("optim:\n  lr_max: 1\n")
    r = subprocess.run([sys.executable, "-c", _LIGHT_CLI, str(tmp_path / "missing.yaml"), str(bad_key)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    result = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and result, r.stdout[-3000:] + r.stderr[-3000:]
    steps = json.loads(result[0][len("RESULT "):])
    assert steps["megacpt --help"]["rc"] == 0, steps
    for step in ("missing config", "unknown config key"):
        assert steps[step]["rc"] == 2 and steps[step]["stderr"].startswith("error: "), (step, steps[step])
    assert "unknown config key 'optim.lr_max'" in steps["unknown config key"]["stderr"], steps
    heavy = [f"{step}: {s['heavy']} (project modules loaded by then: {', '.join(s['project'])})"
             for step, s in steps.items() if s["heavy"]]
    _fail("torch / deepspeed imported by the CLI (modules in sys.modules after each step, cumulative)", heavy)
