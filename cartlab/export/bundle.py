"""One self-contained Python file from cartlab's own modules: the source of `modeling_cartlab.py`.

A model exported for `trust_remote_code` must load where cartlab is not installed, so its
modeling file cannot import cartlab. Copying the model code by hand into a second file would
let the two drift; instead the file is *generated* from the modules that define the model:

    bundle(["cartlab.export.hf"])
      1. follows every `from cartlab.X import ...` from the roots (ast, not regex), collecting the
         modules the roots need at run time (imports under `if TYPE_CHECKING:` name types only);
      2. orders them so each module comes after the modules it imports at its top level;
      3. removes the intra-cartlab imports (every module shares the one namespace of the file),
         keeps one `from __future__ import annotations` at the top, and binds a module imported
         as a name (`from cartlab.model import hooks as _hooks`) to the bundled file itself;
      4. refuses two modules that define the same top-level name differently (the later
         definition would silently replace the earlier one for both).

The result is cartlab's code verbatim, section by section, each under a header naming its
source file; `compile()` checks it before it is written.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "cartlab"


@dataclass
class Module:
    """One cartlab module as the bundle sees it."""

    name: str
    path: Path
    source: str
    tree: ast.Module
    top_deps: list[str] = field(default_factory=list)
    """cartlab modules imported at the module's top level (run when the module is imported)."""
    lazy_deps: list[str] = field(default_factory=list)
    """cartlab modules imported inside functions (needed in the bundle, not before this module)."""


def _is_cartlab(name: str | None) -> bool:
    return name is not None and (name == PACKAGE or name.startswith(PACKAGE + "."))


def _is_type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _locate(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(f"bundle: cannot find the source of module {name!r}")
    return Path(spec.origin)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _imported(node: ast.ImportFrom | ast.Import, where: str) -> list[tuple[str, str | None, str | None]]:
    """The cartlab modules an import statement reads: (module, imported module alias or None, name)."""
    if isinstance(node, ast.Import):
        bad = [a.name for a in node.names if _is_cartlab(a.name)]
        if bad:
            raise ValueError(f"bundle: {where} line {node.lineno}: `import {bad[0]}` cannot be bundled; "
                             f"write `from {bad[0]} import NAME`")
        return []
    if node.level or not _is_cartlab(node.module):
        return []
    out = []
    for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        if _is_module(sub):  # `from cartlab.model import hooks as _hooks`: a module bound to a name
            out.append((sub, alias.asname or alias.name, None))
        elif Path(_locate(node.module)).name == "__init__.py":
            raise ValueError(f"bundle: {where} line {node.lineno}: imports {alias.name!r} from the package "
                             f"{node.module}; import it from the module that defines it")
        else:
            out.append((node.module, None, alias.name))
    return out


def load(name: str) -> Module:
    """Parse one module and record which cartlab modules it imports, and when."""
    path = _locate(name)
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    mod = Module(name, path, source, tree)
    type_checking = {id(n) for top in tree.body if _is_type_checking(top) for n in ast.walk(top)}
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in type_checking:
            continue
        for dep, _, _ in _imported(node, name):
            target = mod.top_deps if id(node) in top_level else mod.lazy_deps
            if dep not in target:
                target.append(dep)
    return mod


def collect(roots: list[str]) -> list[Module]:
    """The modules `roots` need, each after the modules it imports at its top level."""
    loaded: dict[str, Module] = {}
    order: list[Module] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name):] + [name])
            raise ValueError(f"bundle: circular top-level imports cannot be bundled: {cycle}")
        if name in loaded:
            return
        mod = load(name)
        visiting.append(name)
        for dep in mod.top_deps:
            visit(dep)
        visiting.pop()
        loaded[name] = mod
        order.append(mod)
        for dep in mod.lazy_deps:
            visit(dep)

    for root in roots:
        visit(root)
    return order


# -- top-level names: what each module binds, to refuse silent shadowing ----------------------------
def _bindings(mod: Module) -> dict[str, tuple]:
    """Top-level names the module binds once its cartlab imports are gone: name -> ("def",
    module) for its own definitions, ("import", module, attribute or None) for imports."""
    out: dict[str, tuple] = {}

    def own(name: str) -> None:
        if not (name.startswith("__") and name.endswith("__")):
            out[name] = ("def", mod.name)

    for node in mod.tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        own(n.id)
        elif isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = ("import", a.name if a.asname else a.name.split(".")[0], None)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module != "__future__":
            for a in node.names:
                if not _is_cartlab(node.module):
                    out[a.asname or a.name] = ("import", node.module, a.name)
                elif a.asname and a.asname != a.name:
                    own(a.asname)
    return out


def _same(a: tuple, b: tuple) -> bool:
    """Whether two bindings are one object: the same definition, or imports of one object
    (`typing.Mapping` counts as `collections.abc.Mapping`, whose alias it is)."""
    if a == b:
        return True
    if a[0] != "import" or b[0] != "import":
        return False

    def resolve(binding):
        obj = importlib.import_module(binding[1])
        obj = obj if binding[2] is None else getattr(obj, binding[2])
        return getattr(obj, "__origin__", obj)

    try:
        return resolve(a) is resolve(b)
    except (ImportError, AttributeError):
        return False


def check_names(modules: list[Module]) -> None:
    """Refuse two modules that bind one top-level name to different things."""
    seen: dict[str, tuple[str, tuple]] = {}
    for mod in modules:
        for name, what in _bindings(mod).items():
            if name in seen and not _same(seen[name][1], what):
                first, other = seen[name]
                raise ValueError(f"bundle: {first} and {mod.name} both bind the top-level name {name!r}, to "
                                 f"different things ({other} vs {what}); one file cannot hold both: rename one")
            seen.setdefault(name, (mod.name, what))


# -- rewriting one module -------------------------------------------------------------------------------
def rewrite(mod: Module) -> str:
    """The module's source with its cartlab imports and `from __future__` line removed. A module
    bound to a name becomes that name bound to the bundle itself; an import inside a function
    becomes `pass`; an `if TYPE_CHECKING:` block left with nothing to import goes entirely."""
    lines = mod.source.splitlines()
    edits: dict[int, tuple[int, list[str]]] = {}  # first line (0-based) -> (last line, replacement)

    def replace(node: ast.stmt, new: list[str]) -> None:
        edits[node.lineno - 1] = (node.end_lineno - 1, new)

    def handle(node: ast.stmt, nested: bool) -> bool:
        """Rewrite `node` if it is an import to drop; True if it was."""
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            replace(node, [])
            return True
        if not isinstance(node, ast.ImportFrom) or not _is_cartlab(node.module):
            return False
        indent = " " * node.col_offset
        binds = []
        for (dep, as_module, name), alias in zip(_imported(node, mod.name), node.names):
            if as_module is not None:
                binds.append(f"{indent}{as_module} = _sys.modules[__name__]  # {dep} is bundled into this file")
            elif alias.asname and alias.asname != name:
                binds.append(f"{indent}{alias.asname} = {name}")
        replace(node, binds or ([f"{indent}pass"] if nested else []))
        return True

    for top in mod.tree.body:
        if _is_type_checking(top):
            if all(isinstance(n, ast.ImportFrom) and _is_cartlab(n.module) for n in top.body):
                replace(top, [])
                continue
        if handle(top, nested=False):
            continue
        for node in ast.walk(top):
            if isinstance(node, ast.stmt) and node is not top:
                handle(node, nested=True)
    out, i = [], 0
    while i < len(lines):
        if i in edits:
            last, new = edits[i]
            out += new
            i = last + 1
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out).strip("\n") + "\n"


def header(title: str) -> str:
    rule = "# " + "=" * 98
    return f"{rule}\n# {title}\n{rule}\n"


def bundle(roots: list[str], preamble: str = "") -> str:
    """One Python source holding `roots` and every cartlab module they need (module docstring)."""
    modules = collect(roots)
    check_names(modules)
    parts = [preamble.rstrip("\n") + "\n" if preamble else "",
             "from __future__ import annotations\n\nimport sys as _sys\n"]
    for mod in modules:
        rel = mod.path.relative_to(_locate(PACKAGE).parent.parent)
        parts.append("\n\n" + header(f"{rel} ({mod.name})") + "\n" + rewrite(mod))
    text = "".join(parts)
    compile(text, "<bundle>", "exec")  # a rewrite that broke the syntax fails here, not at load time
    return text


def module_names(roots: list[str]) -> list[str]:
    """The bundled modules, in file order (what `bundle(roots)` holds)."""
    return [m.name for m in collect(roots)]
