"""The import graph of the code, computed with ``pipeline.codedeps`` (pure ``ast``, no imports).

The library reads as the method in layers: plumbing (params, stores, devices, the stage start-up) under
data, data under the networks and losses, those under the steps that train, dump and score, and the
pseudo-mask step on top. A module imports its own layer's plumbing, its own package, and lower layers,
never a higher one, and there is no cycle. ``pipeline`` never imports the study tools (``research``),
the table scripts (``scripts``) or the benchmarks (``bench``): they are built on the library, not in it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.codedeps import ROOT, imported_names, module_file, module_name

# (layer, the modules or packages in it), lowest first. Within a layer, the flat plumbing modules of the
# first layer may import one another; elsewhere a module imports only inside its own package.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("plumbing", ("pipeline", "pipeline.atomic", "pipeline.paths", "pipeline.params", "pipeline.params_trace",
                  "pipeline.runtime", "pipeline.distributed", "pipeline.progress", "pipeline.codedeps",
                  "pipeline.stage", "pipeline.store", "pipeline.maps")),
    ("data", ("pipeline.data",)),
    ("networks", ("pipeline.models", "pipeline.losses")),
    ("steps", ("pipeline.train", "pipeline.responses", "pipeline.eval", "pipeline.predict")),
    ("pseudo-masks", ("pipeline.pseudo",)),
]


def unit_of(module: str) -> tuple[int, str]:
    """(layer number, the package or module of ``LAYERS`` that holds ``module``): the longest match."""
    best: tuple[int, str] | None = None
    for number, (_, units) in enumerate(LAYERS):
        for unit in units:
            inside = module == unit or module.startswith(unit + ".")
            if inside and (best is None or len(unit) > len(best[1])):
                best = (number, unit)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layout.py: place it")
    return best


def first_party_imports(path: Path) -> set[str]:
    """The first-party modules ``path`` imports (each resolved to the module file it runs)."""
    found = set()
    for name in imported_names(path):
        if name.split(".")[0] not in ("pipeline", "research", "scripts", "bench", "stages"):
            continue
        target = module_file(name)
        if target is None:  # ``from pipeline.x import function``: the name is the module's attribute
            target = module_file(name.rsplit(".", 1)[0])
        if target is not None:
            found.add(module_name(target) or target.relative_to(ROOT).as_posix())
    return found


def modules(folder: str) -> dict[str, set[str]]:
    """Each file below ``folder`` (by module name, or by path for a script outside a package) and the
    first-party modules it imports."""
    return {module_name(p) or p.relative_to(ROOT).as_posix(): first_party_imports(p)
            for p in sorted((ROOT / folder).rglob("*.py"))}


@pytest.fixture(scope="module")
def library() -> dict[str, set[str]]:
    return modules("pipeline")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in graph.items():
        layer, unit = unit_of(module)
        for target in sorted(targets):
            if not target.startswith("pipeline"):
                continue
            target_layer, target_unit = unit_of(target)
            same_plumbing = layer == target_layer == 0
            if target_layer > layer or (target_layer == layer and target_unit != unit and not same_plumbing):
                problems.append(f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[target_layer][0]})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, found by depth-first search (each reported once, from its smallest module)."""
    found, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                found.append(cycle)
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_library_module_has_a_layer(library):
    for module in library:
        unit_of(module)
    # the graph is real: the pseudo-mask step stands on the training loop and the scorer
    assert {"pipeline.train.loop", "pipeline.eval.scoring"} <= set().union(
        *(ts for m, ts in library.items() if m.startswith("pipeline.pseudo")))


def test_no_upward_import(library):
    assert upward_imports(library) == []


def test_no_import_cycle(library):
    assert cycles(library) == []


def test_the_library_never_imports_the_tools_built_on_it(library):
    outside = {m: sorted(t for t in ts if not t.startswith("pipeline")) for m, ts in library.items()}
    assert {m: ts for m, ts in outside.items() if ts} == {}


def test_scripts_and_benchmarks_do_not_import_the_study_tools():
    """``scripts/`` reproduces tables and ``bench/`` measures: neither depends on the study's code."""
    for package in ("scripts", "bench", "stages"):
        graph = modules(package)
        assert {m: sorted(t for t in ts if t.startswith("research")) for m, ts in graph.items()
                if any(t.startswith("research") for t in ts)} == {}


def test_the_checks_catch_what_they_look_for():
    graph = {"pipeline.data.index": {"pipeline.pseudo.prms"}, "pipeline.pseudo.prms": {"pipeline.data.index"}}
    assert upward_imports(graph) == ["pipeline.data.index (data) imports pipeline.pseudo.prms (pseudo-masks)"]
    assert cycles(graph) == [["pipeline.data.index", "pipeline.pseudo.prms", "pipeline.data.index"]]
    assert upward_imports({"pipeline.eval.scoring": {"pipeline.train.loop"}}) == [
        "pipeline.eval.scoring (steps) imports pipeline.train.loop (steps)"]
