"""The layers of the package, checked on the source: which folders may import which.

Why a test: the folder names say when code runs (compile time: ``passes/``; run time: ``ops/``,
``kernels/``; workflows: ``router/``), and that only holds while no import crosses a layer the
wrong way. Every import counts, also those inside functions (they are how cycles were dodged).
The known crossings still to be removed are listed with the reason each exists; the test fails
on a new crossing, and also when a listed one is gone (so the list only shrinks).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# what each layer may import from grouter_pass: modules, or every module of a package with ".*"
# (the layer itself is always allowed)
ALLOWED = {
    # graph logic: the contract, the configuration, tolerances, the op handles and their reference
    # semantics (the probes run it), the environment switches
    "grouter_pass.passes": ("grouter_pass.spec", "grouter_pass.config", "grouter_pass.numerics", "grouter_pass.env",
                            "grouter_pass.ops", "grouter_pass.ops.reference"),
    # numerics: kernels, switches and the per-call state the opaque ops read
    "grouter_pass.ops": ("grouter_pass.kernels.*", "grouter_pass.env", "grouter_pass.spec", "grouter_pass.runtime.*"),
    # per-call state: nothing of the package but itself
    "grouter_pass.runtime": (),
    # kernels: the switches, and the contract's pure data (the implementations take ExpertMLP)
    "grouter_pass.kernels": ("grouter_pass.env", "grouter_pass.spec"),
    "grouter_pass.spec": (),
}

# known crossings, each (importer, imported): to be removed by moving per-call state and the
# expert-parallel rewrite's runtime half out of the compile-time layers
KNOWN = {
    ("grouter_pass.passes.expert_parallel", "grouter_pass.distributed.group"):
        "the EP layout resolves the process group while the graph is rewritten",
    ("grouter_pass.passes.expert_parallel", "grouter_pass.distributed.experts"):
        "the rewrite emits distributed.experts.ep_experts_in_graph as a plain FX target",
    ("grouter_pass.passes.select_kernels", "grouter_pass.ops.kernel_select"):
        "the kernel choice is shared with the ops, which make it at run time",
    ("grouter_pass.passes.select_kernels", "grouter_pass.ops.triton_ops"):
        "the Triton twins of the ops are registered on first use by the pass",
}

# product code never imports the test helpers; known exceptions, with why
TESTING = "grouter_pass.testing"
KNOWN_TESTING = {
    "grouter_pass.demo": "the demo builds its model with the test model factory",
    "grouter_pass.inspect.cli": "`grouter diff --model NAME` builds the named test model",
    "grouter_pass.inspect.explain": "explain() of a named test model",
}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "passes":
        parts = ["grouter_pass", "passes", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every grouter_pass module the source files import (``from grouter_pass import x`` counts
    as ``grouter_pass.x``)."""
    found: dict[str, set[str]] = {}
    for path in [*ROOT.glob("grouter_pass/**/*.py"), *ROOT.glob("passes/**/*.py")]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grouter_pass"):
                if node.module == "grouter_pass":
                    names.update(f"grouter_pass.{a.name}" for a in node.names)
                else:
                    names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("grouter_pass"))
        found[_module_name(path)] = names
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _allows(entry: str, name: str) -> bool:
    return _within(name, entry[:-2]) if entry.endswith(".*") else name == entry


def _is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of the source tree (not a name inside one)."""
    in_passes = _within(name, "grouter_pass.passes")
    path = ROOT.joinpath("passes" if in_passes else "grouter_pass", *name.split(".")[2 if in_passes else 1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _crossings() -> set[tuple[str, str]]:
    out = set()
    for importer, names in _imports().items():
        layer = next((lay for lay in ALLOWED if _within(importer, lay)), None)
        if layer is None:
            continue
        for name in names:
            if not _is_module(name):   # `from grouter_pass.ops import reference` -> the module
                name = name.rsplit(".", 1)[0]
            if _within(name, layer) or any(_allows(a, name) for a in ALLOWED[layer]):
                continue
            out.add((importer, name))
    return out


def test_no_import_crosses_a_layer_beyond_the_known_ones():
    crossings = _crossings()
    new = sorted(crossings - set(KNOWN))
    assert not new, f"imports that cross a layer: {new}; see the layers in docs/design.md"
    gone = sorted(set(KNOWN) - crossings)
    assert not gone, f"these crossings are gone: remove them from KNOWN: {gone}"


def test_product_code_does_not_import_the_test_helpers():
    users = {m for m, names in _imports().items()
             if not _within(m, TESTING) and any(_within(n, TESTING) for n in names)}
    assert users <= set(KNOWN_TESTING), f"product modules importing {TESTING}: {sorted(users - set(KNOWN_TESTING))}"
    assert set(KNOWN_TESTING) <= users, f"no longer import {TESTING}: remove {sorted(set(KNOWN_TESTING) - users)}"


def test_the_scan_sees_imports_inside_functions():
    """The scan is what the test stands on: a function-level import of another layer is found."""
    assert ("grouter_pass.passes.expert_parallel", "grouter_pass.distributed.group") in _crossings()
