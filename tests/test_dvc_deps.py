"""dvc.yaml's ``deps:`` against what each stage really runs and opens, both computed from the code.

A module a stage runs but does not list lets ``dvc repro`` serve results from before an edit of that
module; an input artifact it opens but does not list does the same after that artifact changes. The
code side is ``pipeline.codedeps.closure`` (the stage script plus every ``pipeline`` module it imports,
transitively). The artifact side is every ``pipeline.paths`` constant the stage's code names (with a
literal ``/ "name"`` suffix when it has one), plus the artifacts that code opens without naming a
constant (:data:`INDIRECT_READS`). Each such path must be a dep or an out of the stage (outs are its
writes). Nothing here imports torch, so the check is quick.
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path, PurePosixPath

import pytest
import yaml

from pipeline import paths
from pipeline.codedeps import ROOT, closure, with_code_deps

DVC_YAML = ROOT / "dvc.yaml"

INDIRECT_READS = {
    # Function -> artifact that a stage opens when its code calls the function, though no ``paths``
    # constant names it there. Keyed by function name, so the rule follows a moved module.
    "load_localiser": paths.CLIP,  # rebuilds the backbone from the clip_dir in the Step-1 checkpoint meta
    "read_image_rgb": paths.SYNTHETIC / "images",  # the image files the index points at (synthetic data)
}


INTERPOLATION = re.compile(r"\$\{([^}]+)\}")


def interpolate(text: str, params: dict) -> str:
    """``text`` with each ``${dotted.key}`` replaced by its value in ``params``, as DVC resolves dvc.yaml
    against params.yaml (the real inputs' deps are ``${inputs.refs}`` and the like)."""
    def value(match: re.Match) -> str:
        node = params
        for part in match[1].split("."):
            node = node[part]
        return str(node)

    return INTERPOLATION.sub(value, text)


def load_stages(path: Path = DVC_YAML, params_yaml: Path = ROOT / "params.yaml") -> dict[str, dict]:
    """The stages of ``path`` with its ``${...}`` resolved against ``params_yaml``."""
    return yaml.safe_load(interpolate(path.read_text(), yaml.safe_load(params_yaml.read_text())))["stages"]


def stage_script(stage: dict) -> Path:
    """The ``stages/*.py`` file the stage's ``cmd`` runs."""
    scripts = [w for w in stage["cmd"].split() if w.endswith(".py")]
    assert len(scripts) == 1, f"cannot tell the script of cmd {stage['cmd']!r}"
    return ROOT / scripts[0]


def entries(stage: dict, *keys: str) -> list[str]:
    """Paths of the given lists (``deps``, ``outs``, ...); an entry may be a dict ``{path: options}``."""
    found = []
    for key in keys:
        for item in stage.get(key) or []:
            found.extend(item if isinstance(item, dict) else [item])
    return found


def covers(declared: str, path: str) -> bool:
    """``declared`` is ``path`` or a folder above it."""
    return PurePosixPath(path).is_relative_to(PurePosixPath(declared))


def rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


def missing_code_deps(stages: dict[str, dict]) -> list[str]:
    """One line per module a stage runs without listing it (itself or a folder above it) in ``deps``."""
    problems = []
    for name, stage in stages.items():
        deps = entries(stage, "deps")
        for module in closure(stage_script(stage)):
            if not any(covers(d, rel(module)) for d in deps):
                problems.append(f"{name}: runs {rel(module)} but dvc.yaml does not list it in deps")
    return problems


def named_artifacts(source: Path) -> set[str]:
    """Every ``pipeline.paths`` location a file names (``paths.X``, or ``X`` imported from
    ``pipeline.paths``), extended by literal suffixes: ``paths.STEP1 / "model.pt"`` names the file."""
    constants = {k: v for k, v in vars(paths).items() if isinstance(v, Path)}
    tree = ast.parse(source.read_text())
    bare = {a.asname or a.name: constants[a.name] for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module == "pipeline.paths"
            for a in n.names if a.name in constants}

    def path_of(node: ast.AST) -> Path | None:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "paths":
            return constants.get(node.attr)
        if isinstance(node, ast.Name):
            return bare.get(node.id)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            left = path_of(node.left)
            right = node.right.value if isinstance(node.right, ast.Constant) else None
            if left is not None and isinstance(right, str):
                return left / right
        return None

    found = {node: path for node in ast.walk(tree) if (path := path_of(node)) is not None}
    inner = {id(node.left) for node in found if isinstance(node, ast.BinOp)}  # keep the longest form only
    return {path.as_posix() for node, path in found.items() if id(node) not in inner}


def definers(function: str) -> list[Path]:
    """The first-party modules that define ``function`` at module level."""
    return [f for f in sorted((ROOT / "pipeline").rglob("*.py"))
            if any(isinstance(n, ast.FunctionDef) and n.name == function
                   for n in ast.parse(f.read_text()).body)]


def calls(source: Path, function: str) -> bool:
    """Whether ``source`` calls ``function`` (by bare name or as an attribute): a module that merely
    shares a file with it, such as ``load_segmenter`` beside ``load_localiser``, opens nothing."""
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name == function:
                return True
    return False


def missing_artifact_deps(stages: dict[str, dict]) -> list[str]:
    """One line per artifact a stage's code opens that is neither among its deps nor its outs."""
    indirect = {function: (definers(function), artifact) for function, artifact in INDIRECT_READS.items()}
    problems = []
    for name, stage in stages.items():
        declared = entries(stage, "deps", "outs", "metrics", "plots")
        modules = closure(stage_script(stage))
        used = set().union(*(named_artifacts(m) for m in modules))
        used |= {artifact.as_posix() for function, (files, artifact) in indirect.items()
                 if set(files) & set(modules) and any(calls(m, function) for m in modules)}
        for path in sorted(used):
            # a folder named with a computed suffix (``paths.REPORTS / name``) is fine when something
            # below it is declared
            if not any(covers(d, path) or covers(path, d) for d in declared):
                problems.append(f"{name}: opens {path} but dvc.yaml lists it in neither deps nor outs")
    return problems


def stale_deps(stages: dict[str, dict]) -> list[str]:
    """Deps that point nowhere: code that no longer exists, or an artifact no stage writes."""
    outs = [o for stage in stages.values() for o in entries(stage, "outs", "metrics")]
    problems = []
    for name, stage in stages.items():
        for dep in entries(stage, "deps"):
            if dep.startswith(f"{paths.ARTIFACTS.as_posix()}/"):
                if not any(covers(o, dep) for o in outs):
                    problems.append(f"{name}: dep {dep} is not an output of any stage")
            elif not (ROOT / dep).exists():
                problems.append(f"{name}: dep {dep} does not exist (moved or deleted?)")
    return problems


def test_code_deps_are_generated():
    """dvc.yaml's code deps are exactly what ``make deps`` writes: nobody edits them by hand."""
    text = DVC_YAML.read_text()
    assert with_code_deps(text) == text, "dvc.yaml's code deps are out of date: run `make deps`"


def test_the_generator_restores_a_dropped_module_and_keeps_the_rest():
    text = DVC_YAML.read_text()
    broken = text.replace("    - pipeline/losses.py\n", "", 1)
    assert broken != text
    assert with_code_deps(broken) == text
    # an artifact dep and the comments are not the generator's: they stay as written
    assert "    - artifacts/index\n" in with_code_deps(text)
    assert with_code_deps(text).splitlines()[0].startswith("#")


def test_every_stage_lists_the_modules_it_runs():
    assert missing_code_deps(load_stages()) == []


def test_every_stage_lists_the_artifacts_it_opens():
    assert missing_artifact_deps(load_stages()) == []


def test_every_dep_exists():
    assert stale_deps(load_stages()) == []


def test_indirect_reads_point_at_real_functions():
    """A renamed function would silently switch its rule off."""
    for function in INDIRECT_READS:
        assert len(definers(function)) == 1, f"{function}: defined in {definers(function)}"


@pytest.fixture(scope="module")
def stages() -> dict[str, dict]:
    return load_stages()


def _without(stages: dict[str, dict], stage: str, dep: str) -> dict[str, dict]:
    broken = copy.deepcopy(stages)
    broken[stage]["deps"].remove(dep)
    return broken


def test_a_missing_module_is_named(stages, tmp_path):
    """The check fails on a dvc.yaml (written out and read back) that drops one module of one stage."""
    path = tmp_path / "dvc.yaml"
    path.write_text(yaml.safe_dump({"stages": _without(stages, "train_step1", "pipeline/losses.py")}))
    assert missing_code_deps(load_stages(path)) == [
        "train_step1: runs pipeline/losses.py but dvc.yaml does not list it in deps"
    ]


def test_a_folder_dep_covers_its_modules(stages):
    broken = _without(stages, "make_pseudo_masks", "pipeline/pseudo/crf.py")
    assert missing_code_deps(broken) == [
        "make_pseudo_masks: runs pipeline/pseudo/crf.py but dvc.yaml does not list it in deps"
    ]
    broken["make_pseudo_masks"]["deps"].append("pipeline/pseudo")
    assert missing_code_deps(broken) == []


def test_a_missing_artifact_is_named(stages):
    assert missing_artifact_deps(_without(stages, "dump_responses", "artifacts/clip")) == [
        "dump_responses: opens artifacts/clip but dvc.yaml lists it in neither deps nor outs"
    ]
    assert missing_artifact_deps(_without(stages, "dump_responses", "artifacts/step1/model.pt")) == [
        "dump_responses: opens artifacts/step1/model.pt but dvc.yaml lists it in neither deps nor outs"
    ]


def test_a_stale_dep_is_named(stages):
    broken = copy.deepcopy(stages)
    broken["index"]["deps"] += ["pipeline/moved_away.py", "artifacts/nobody_writes_this"]
    assert stale_deps(broken) == [
        "index: dep pipeline/moved_away.py does not exist (moved or deleted?)",
        "index: dep artifacts/nobody_writes_this is not an output of any stage",
    ]


def test_closure_follows_every_kind_of_import(tmp_path):
    """Function-level, relative and submodule imports, import_module literals and ``-m`` relaunches."""
    files = {
        "pipeline/__init__.py": "",
        "pipeline/a.py": "def f():\n    from .sub import b\n",
        "pipeline/sub/__init__.py": "",
        "pipeline/sub/b.py": "import importlib\nimportlib.import_module('pipeline.c')\n",
        "pipeline/c.py": "ARGV = ['python', '-m', 'pipeline.d']\n",
        "pipeline/d.py": "import numpy\n",
        "pipeline/unused.py": "",
        "stage.py": "from pipeline import a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = {p.relative_to(tmp_path).as_posix() for p in closure(tmp_path / "stage.py", root=tmp_path)}
    assert found == set(files) - {"pipeline/unused.py"}
