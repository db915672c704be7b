"""Which first-party source files a stage script runs, computed from the code (pure ``ast``, no imports).

Two things need that answer and must agree on it: the code ``deps:`` of each stage in ``dvc.yaml`` (an
edit to a module re-runs exactly the stages that run it; ``python -m pipeline.codedeps --write``, or
``make deps``, rewrites them and ``tests/test_dvc_deps.py`` checks they are up to date) and
the resume fingerprint of the training stages (``pipeline.train.common.training_code``). Parsing instead
of importing keeps it fast and free of torch, and it sees imports that only run inside functions.

What counts as an import of a module ``m``:

- ``import m`` and ``from m import name`` anywhere in the file (module level, inside functions, under
  ``if``/``try``), relative ``from .x import y`` resolved against the importing module's package;
- ``from package import name`` where ``name`` is a submodule (its file exists);
- ``importlib.import_module("m")`` / ``__import__("m")`` with a string literal;
- a ``["-m", "m", ...]`` list or tuple literal (a subprocess re-running a module).

Importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``, so those are in the closure.
The torchrun relaunch (``pipeline.distributed.relaunch_under_torchrun``) re-executes the stage script
itself (``sys.argv[0]``), so it runs the same closure and adds nothing.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The directory holding the ``pipeline`` package (the repository root in a checkout)."""

FIRST_PARTY = ("pipeline",)


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of dotted module ``name`` below ``root`` (``x.py`` or ``x/__init__.py``), if any."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, root: Path = ROOT) -> str | None:
    """Dotted name of a source file below ``root`` (``None`` for a file outside it, e.g. a stage script)."""
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts and parts[0] in FIRST_PARTY else None


def _package_of(path: Path, root: Path) -> str | None:
    """The package a relative import in ``path`` is resolved against."""
    name = module_name(path, root)
    if name is None:
        return None
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve_relative(module: str | None, level: int, package: str | None) -> str | None:
    if level == 0:
        return module
    if package is None:
        return None  # a relative import outside a package fails at runtime; nothing to follow
    parts = package.split(".")
    if level - 1 > len(parts) - 1:
        return None
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{module}" if module else base


def _string_arg(call: ast.Call) -> str | None:
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return None


def imported_names(path: Path, root: Path = ROOT) -> Iterator[str]:
    """Dotted names of every module ``path`` may import (first-party or not; ``from`` targets included as
    ``package.name`` candidates, which :func:`closure` keeps only when such a file exists)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = _package_of(path, root)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(node.module, node.level, package)
            if base is None:
                continue
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            target = _string_arg(node)
            if fname in ("import_module", "__import__") and target:
                yield target
        elif isinstance(node, ast.List | ast.Tuple):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            for flag, target in zip(items, items[1:], strict=False):
                if flag == "-m" and isinstance(target, str):
                    yield target


def _with_parents(name: str) -> Iterator[str]:
    """``a``, ``a.b``, ``a.b.c`` for ``a.b.c``: importing a module runs every enclosing package."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def closure(scripts: str | Path | Iterable[str | Path], root: Path = ROOT) -> list[Path]:
    """Every file that running ``scripts`` executes from first-party code: the scripts themselves plus the
    transitive closure of the ``pipeline`` modules they import, as sorted absolute paths."""
    todo = [Path(scripts)] if isinstance(scripts, str | Path) else [Path(s) for s in scripts]
    seen: set[Path] = set()
    while todo:
        path = todo.pop().resolve()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path, root):
            if name.split(".")[0] not in FIRST_PARTY:
                continue
            for enclosing in _with_parents(name):
                found = module_file(enclosing, root)
                if found is not None and found.resolve() not in seen:
                    todo.append(found)
    return sorted(seen)


def stage_closure(script: str | Path, root: Path = ROOT) -> list[Path]:
    """The stage script first, then the rest of its :func:`closure` in path order (a stable hash order)."""
    script = Path(script).resolve()
    return [script, *(p for p in closure(script, root) if p != script)]


_STAGE = re.compile(r"^  (?P<name>[A-Za-z0-9_-]+):\s*$")
_CMD = re.compile(r"^    cmd: .*?(?P<script>stages/[A-Za-z0-9_]+\.py)")
_ITEM = re.compile(r"^    - (?P<path>\S+)\s*$")


def _is_code(path: str) -> bool:
    return path.endswith(".py") and path.split("/")[0] in ("stages", *FIRST_PARTY)


def with_code_deps(dvc_yaml: str, root: Path = ROOT) -> str:
    """``dvc_yaml``'s text with each stage's code ``deps`` replaced by :func:`stage_closure` of the script
    its ``cmd`` runs (relative paths, script first), ahead of the stage's other deps in their order.
    Everything else, comments included, is kept line for line: only the code entries are generated."""
    out: list[str] = []
    script: str | None = None
    in_deps = False
    for line in dvc_yaml.splitlines(keepends=True):
        if _STAGE.match(line):
            script, in_deps = None, False
        elif (cmd := _CMD.match(line)) is not None:
            script = cmd["script"]
        if in_deps:
            item = _ITEM.match(line)
            if item is not None:
                if not _is_code(item["path"]):
                    out.append(line)
                continue
            in_deps = False
        out.append(line)
        if line.rstrip() == "    deps:":
            if script is None:
                raise ValueError("dvc.yaml: a stage lists deps before its cmd names a stages/*.py script")
            in_deps = True
            out += [f"    - {p.relative_to(root).as_posix()}\n" for p in stage_closure(root / script, root)]
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.codedeps",
        description="Regenerate (--write) or check (--check) the code deps of every stage in dvc.yaml.")
    parser.add_argument("dvc_yaml", nargs="?", type=Path, default=ROOT / "dvc.yaml")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the file in place")
    action.add_argument("--check", action="store_true", help="exit 1 when the file is out of date")
    args = parser.parse_args(argv)
    text = args.dvc_yaml.read_text()
    generated = with_code_deps(text, args.dvc_yaml.resolve().parent)
    if args.check:
        if generated != text:
            print(f"{args.dvc_yaml}: code deps are out of date; run `make deps`", file=sys.stderr)
            return 1
        return 0
    if generated != text:
        args.dvc_yaml.write_text(generated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
