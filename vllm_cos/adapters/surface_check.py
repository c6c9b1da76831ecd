"""Check the hook surface (:mod:`vllm_cos.adapters.surface`) against a vLLM source tree.

Pure stdlib: the tree is parsed with :mod:`ast`, never imported, so any vLLM release (an
unpacked wheel, a site-packages directory, a git checkout) can be checked from any Python.

A name is looked up the way Python would find it statically: module-level definitions,
assignments and imports (followed to the module they come from); in a class, its body,
``self.X = ...`` assignments in its methods, then its base classes (resolved through the
same module's definitions and imports).  Definitions under ``if`` / ``try`` blocks count.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from vllm_cos.adapters.surface import SURFACE, Entry

PRESENT, MISSING, CHANGED = "present", "missing", "changed"
_MODULE = object()  # lookup result: the name is a submodule
_MAX_DEPTH = 8  # import / base-class hops followed


@dataclass
class Result:
    entry: Entry
    status: str  # PRESENT / MISSING / CHANGED
    found_params: tuple[str, ...] | None = None
    where: str = ""  # module:qualname where the name was found, if not where expected
    detail: str = ""


def _blocks(body):
    """Statements of a body, with those nested in if / try / with blocks."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody"):
                yield from _blocks(getattr(node, field, []) or [])
            for handler in getattr(node, "handlers", []) or []:
                yield from _blocks(handler.body)


def _targets(node):
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    for t in targets:
        for leaf in ast.walk(t):
            if isinstance(leaf, ast.Name):
                yield leaf.id


class SourceTree:
    """The ``vllm`` package under ``root`` (``root/vllm/...``, or ``root`` itself)."""

    def __init__(self, root):
        root = Path(root)
        self.root = root if (root / "vllm").is_dir() else root.parent
        self._cache: dict[str, ast.Module | None] = {}

    def module(self, name: str) -> ast.Module | None:
        if name not in self._cache:
            base = self.root.joinpath(*name.split("."))
            tree = None
            for path in (base.with_suffix(".py"), base / "__init__.py"):
                if path.is_file():
                    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"), str(path))
                    break
            self._cache[name] = tree
        return self._cache[name]

    def is_package(self, name: str) -> bool:
        return self.root.joinpath(*name.split("."), "__init__.py").is_file()


def _resolve_from(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    base = ".".join(parts[:keep])
    return f"{base}.{node.module}" if node.module else base


def lookup_module_name(tree: SourceTree, module: str, name: str, depth: int = 0):
    """(node, module it is defined in) for a module-level ``name``, or (None, None)."""
    mod = tree.module(module)
    if mod is None or depth > _MAX_DEPTH:
        return None, None
    found = None
    for node in _blocks(mod.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            found = (node, module)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and name in _targets(node):
            found = found or (node, module)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name and found is None:
                    source = _resolve_from(module, node, tree.is_package(module))
                    sub = f"{source}.{alias.name}"
                    if tree.module(sub) is not None:
                        return _MODULE, sub
                    hit = lookup_module_name(tree, source, alias.name, depth + 1)
                    found = hit if hit[0] is not None else (node, module)
    return found or (None, None)


def _class_member(tree: SourceTree, cls: ast.ClassDef, module: str, name: str, depth: int = 0):
    """(node, defining class qualname) of ``name`` on ``cls`` or its bases, or (None, None)."""
    for node in _blocks(cls.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node, f"{module}:{cls.name}"
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and name in _targets(node):
            return node, f"{module}:{cls.name}"
    for node in ast.walk(cls):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if (isinstance(t, ast.Attribute) and t.attr == name and isinstance(t.value, ast.Name)
                        and t.value.id == "self"):
                    return node, f"{module}:{cls.name}"
    if depth > _MAX_DEPTH:
        return None, None
    for base in cls.bases:
        if isinstance(base, ast.Subscript):  # Generic[...] style bases
            base = base.value
        if not isinstance(base, ast.Name):
            continue
        node, where = lookup_module_name(tree, module, base.id)
        if isinstance(node, ast.ClassDef):
            hit = _class_member(tree, node, where, name, depth + 1)
            if hit[0] is not None:
                return hit
    return None, None


def find(tree: SourceTree, module: str, qualname: str):
    """(node, where) of ``module:qualname``: ``where`` is the defining module, or
    ``module:Class`` for a class member; (None, None) if absent."""
    first, *rest = qualname.split(".")
    node, where = lookup_module_name(tree, module, first)
    for part in rest:
        if isinstance(node, ast.ClassDef):
            node, where = _class_member(tree, node, where.split(":")[0], part)
        elif node is _MODULE:
            node, where = lookup_module_name(tree, where, part)
        else:
            return None, None
        if node is None:
            return None, None
    return node, where


def param_names(node, in_class: bool) -> tuple[str, ...]:
    """A def's parameter names (``*args`` / ``**kwargs`` with their stars), less self / cls."""
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args]
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
    if in_class and not static and names and names[0] in ("self", "cls"):
        names = names[1:]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    names += [p.arg for p in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return tuple(names)


_KIND_NODES = {"function": (ast.FunctionDef, ast.AsyncFunctionDef),
               "method": (ast.FunctionDef, ast.AsyncFunctionDef), "class": (ast.ClassDef,)}


def _has_string(tree: SourceTree, module: str, text: str) -> bool:
    mod = tree.module(module)
    return mod is not None and any(isinstance(n, ast.Constant) and n.value == text for n in ast.walk(mod))


def check_entry(tree: SourceTree, entry: Entry) -> Result:
    if entry.kind == "string":
        return Result(entry, PRESENT if _has_string(tree, entry.module, entry.qualname) else MISSING)
    node, where = find(tree, entry.module, entry.qualname)
    if node is None:
        return Result(entry, MISSING)
    parent = entry.qualname.rsplit(".", 1)[0].split(".")[-1] if "." in entry.qualname else ""
    shown = "" if where == (f"{entry.module}:{parent}" if parent else entry.module) else where
    kinds = _KIND_NODES.get(entry.kind)
    if kinds and not isinstance(node, kinds):
        return Result(entry, CHANGED, where=shown, detail=f"not a {entry.kind} ({type(node).__name__})")
    if entry.params is not None and kinds and entry.kind != "class":
        found = param_names(node, entry.kind == "method")
        if found != tuple(entry.params):
            return Result(entry, CHANGED, found, shown, "parameters differ")
        return Result(entry, PRESENT, found, shown)
    return Result(entry, PRESENT, where=shown)


def check_tree(root, entries=SURFACE) -> list[Result]:
    tree = SourceTree(root)
    return [check_entry(tree, e) for e in entries]


def changed_bodies(root, other_root, entries=SURFACE) -> list[str]:
    """The functions and methods of ``entries`` whose code differs between two vLLM trees
    (``ast.dump``: formatting, comments and line numbers do not count); each as
    ``module:qualname``.  Names absent from either tree are left to :func:`check_tree`."""
    trees = SourceTree(root), SourceTree(other_root)
    changed = []
    for e in entries:
        if e.kind not in ("function", "method"):
            continue
        nodes = [find(tree, e.module, e.qualname)[0] for tree in trees]
        if all(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in nodes) and \
                ast.dump(nodes[0]) != ast.dump(nodes[1]):
            changed.append(f"{e.module}:{e.qualname}")
    return changed


def format_results(results: list[Result], verbose: bool = True) -> list[str]:
    lines = []
    for r in results:
        e = r.entry
        name = f"{e.module}:{e.qualname} ({e.kind})"
        if r.status == PRESENT:
            if verbose:
                lines.append(f"present  {name}" + (f"  [found at {r.where}]" if r.where else ""))
        elif r.status == MISSING:
            lines.append(f"MISSING  {name}")
        else:
            text = f"CHANGED  {name}: {r.detail}"
            if r.found_params is not None:
                text += f"; expected ({', '.join(e.params)}), found ({', '.join(r.found_params)})"
            lines.append(text + (f"  [found at {r.where}]" if r.where else ""))
    counts = {s: sum(r.status == s for r in results) for s in (PRESENT, MISSING, CHANGED)}
    lines.append(f"hook surface: {len(results)} names, {counts[PRESENT]} present, "
                 f"{counts[MISSING]} missing, {counts[CHANGED]} changed")
    return lines


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Check vllm-cos's vLLM hook surface against a vLLM "
                                     "source tree (parsed with ast, never imported).")
    parser.add_argument("vllm_source_dir", help="directory holding the vllm package (e.g. an unpacked "
                        "wheel or site-packages), or the vllm package directory itself")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only missing / changed names")
    parser.add_argument("--bodies-against", metavar="OTHER_VLLM_SOURCE_DIR", default=None,
                        help="also list the hooked functions / methods whose code differs from this tree's")
    args = parser.parse_args(argv)
    tree = SourceTree(args.vllm_source_dir)
    if tree.module("vllm") is None:
        print(f"no vllm package under {args.vllm_source_dir}")
        return 2
    results = check_tree(args.vllm_source_dir)
    print("\n".join(format_results(results, verbose=not args.quiet)))
    if args.bodies_against:
        changed = changed_bodies(args.bodies_against, args.vllm_source_dir)
        print("\n".join(f"BODY     {name}" for name in changed))
        functions = sum(e.kind in ("function", "method") for e in SURFACE)
        print(f"code: {len(changed)} of {functions} hooked functions / methods differ from {args.bodies_against}")
    return 0 if all(r.status == PRESENT for r in results) else 1
