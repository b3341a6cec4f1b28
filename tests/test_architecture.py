"""The package's layers, checked on its source (docs/architecture.md draws them).

Imports are read from the syntax tree of every module of ``mergehub`` (function-level ones
too, which is where import circles used to hide), so these tests hold without importing
anything and name the offending module and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import mergehub

ROOT = Path(mergehub.__file__).parent

#: a layer and the layers above it, which it must not import (``ops`` the bottom, ``hub``
#: and the top-level API the top)
FORBIDDEN = {
    "mergehub.ops": ("mergehub.kernels", "mergehub.storage", "mergehub.merge",
                     "mergehub.adapters", "mergehub.hub", "mergehub.compose",
                     "mergehub.loading"),
    "mergehub.kernels": ("mergehub.storage", "mergehub.merge", "mergehub.adapters",
                         "mergehub.hub", "mergehub.compose", "mergehub.loading"),
    "mergehub.storage": ("mergehub.merge", "mergehub.adapters", "mergehub.hub",
                         "mergehub.compose"),
    "mergehub.merge": ("mergehub.adapters", "mergehub.hub", "mergehub.compose"),
}

#: the imports that still go up a layer, each with why (docs/architecture.md, "Known
#: exceptions"); a new one fails the tests below, and one that goes away must leave this list
KNOWN_UPWARD = {
    ("mergehub.storage.store", "mergehub.loading"):
        "Store.load_model, a facade for mergehub.load that users asked for (issue 14)",
}


#: modules over LONG lines that do not (yet) say why at their top, each with why it is listed
#: (docs/architecture.md, "Known exceptions"); a new one fails the tests below, and one that
#: shrinks or gains its reason must leave this list
LONG = 500
KNOWN_LONG: dict[str, str] = {}
#: how a long module's docstring gives its reason, in its first lines
LONG_REASON = "(Over 500 lines:"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str) -> list[tuple[str, int]]:
    """(mergehub module, line) for each import in module ``name`` that runs (those under
    ``if TYPE_CHECKING:`` do not); ``from a import b`` is an import of ``a.b`` when that is a
    module, else of ``a``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[:len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                found.append((full if full in MODULES else base, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return [(m, line) for m, line in found if m in MODULES and m != name]


GRAPH = {name: imports(name) for name in MODULES}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_one_above_it(layer):
    wrong = [f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {target}"
             for m, edges in GRAPH.items() if m == layer or m.startswith(layer + ".")
             for target, line in edges
             if any(target == up or target.startswith(up + ".") for up in FORBIDDEN[layer])
             and (m, target) not in KNOWN_UPWARD]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    """No module reaches itself through imports, package ``__init__`` files aside (a package
    importing its own submodules to register them is not a circle of meaning)."""
    edges = {m: sorted({t for t, _ in e if MODULES[t].name != "__init__.py"
                        and (m, t) not in KNOWN_UPWARD})
             for m, e in GRAPH.items()}
    circles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_known_exceptions_still_exist():
    """An exception that has been fixed leaves the list (so the list is the truth)."""
    gone = [f"{m} -> {t}" for m, t in KNOWN_UPWARD if t not in {x for x, _ in GRAPH[m]}]
    assert not gone, "fixed, remove from KNOWN_UPWARD: " + ", ".join(gone)


def test_the_graph_sees_imports():
    """The checks above read real edges: function-level imports included, TYPE_CHECKING ones
    not."""
    engine = {t for t, _ in GRAPH["mergehub.merge.engine"]}
    assert {"mergehub.merge.plan", "mergehub.merge.tensors", "mergehub.merge.cluster"} <= engine
    assert "mergehub.merge.engine" in {t for t, _ in GRAPH["mergehub.merge"]}  # in a function
    assert "mergehub.ops.sparsify" not in {t for t, _ in GRAPH["mergehub.merge.cluster"]}


def test_the_worked_example_of_a_new_method_merges(models, tmp_path, monkeypatch):
    """docs/architecture.md's example method, as written there, registers and merges: with
    every scale 1 it is task arithmetic, bit for bit; with scales (2, 0) it is task
    arithmetic of the first input at weight 2 (an oracle from the method's formula)."""
    from safetensors.torch import load_file

    import mergehub
    from mergehub.merge.methods import METHODS

    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    code = text.split("# mergehub/merge/methods/scaled.py\n", 1)[1].split("```", 1)[0]
    monkeypatch.setitem(METHODS, "scaled", None)  # the registration is undone after the test
    exec(compile(code, "scaled.py", "exec"), {"__name__": "scaled"})  # noqa: S102 (our doc)
    base, a, b = models["base-bf16"], models["ft-mlp"], models["ft-attn"]

    def merged(method: str, params: tuple[str, str]) -> dict:
        recipe = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
                  f"  - model: {a}\n    parameters: {{{params[0]}}}\n"
                  f"  - model: {b}\n    parameters: {{{params[1]}}}\n")
        out = tmp_path / f"{method}-{len(list(tmp_path.iterdir()))}"
        mergehub.merge(recipe, out, progress=False)
        return load_file(out / "model.safetensors")

    ours = merged("scaled", ("weight: 1.0", "weight: 0.5"))
    ta = merged("task_arithmetic", ("weight: 1.0", "weight: 0.5"))
    assert ours.keys() == ta.keys() and all(torch.equal(ours[k], ta[k]) for k in ta)
    ours = merged("scaled", ("weight: 1.0, scale: 2.0", "weight: 0.5, scale: 0.0"))
    ta = merged("task_arithmetic", ("weight: 2.0", "weight: 0.0"))
    assert all(torch.equal(ours[k], ta[k]) for k in ta)


def test_the_worked_example_of_a_new_training_method_trains(models, tmp_path, monkeypatch):
    """docs/architecture.md's example training method, as written there, registers and
    trains through ``train`` (what ``hub train`` runs): the config parser takes its name and
    refuses a parameter it does not list, naming the one it does; only the tensors its
    pattern matches change, and after one step they hold what full fine-tuning gives them
    (AdamW's update of an entry reads only that entry's gradient, which is the same whether
    or not the other tensors train: the same batch and seed, the same forward pass)."""
    from safetensors.torch import load_file

    from mergehub.adapters.config import ConfigError, load_config
    from mergehub.adapters.methods import METHODS
    from mergehub.adapters.trainer import train

    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    code = text.split("# mergehub/adapters/methods/norms.py\n", 1)[1].split("```", 1)[0]
    monkeypatch.setitem(METHODS, "norms", None)  # the registration is undone after the test
    exec(compile(code, "norms.py", "exec"), {"__name__": "norms"})  # noqa: S102 (our doc)
    base = models["base-bf16"]

    def config(method: str, steps: int, **extra) -> dict:
        return {"base": str(base), "data": {"task": "copy"}, "method": method, "steps": steps,
                "batch_size": 4, "lr": 1e-2, "seed": 0, "run_dir": str(tmp_path / "run"),
                "output": {"dir": str(tmp_path / f"{method}-{steps}")}, **extra}

    with pytest.raises(ConfigError, match="unknown key 'patern' in method_params of norms.*"
                                          "pattern"):
        load_config(config("norms", 1, method_params={"patern": "norm"}))
    before = load_file(base / "model.safetensors")
    train(config("norms", 2), progress=False, resume=False)
    after = load_file(tmp_path / "norms-2" / "model.safetensors")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("norm" in n for n in changed), changed

    train(config("norms", 1), progress=False, resume=False)
    train(config("full", 1), progress=False, resume=False)
    norms = load_file(tmp_path / "norms-1" / "model.safetensors")
    full = load_file(tmp_path / "full-1" / "model.safetensors")
    assert all(torch.equal(norms[n], full[n] if "norm" in n else before[n]) for n in before)


def test_the_worked_example_of_a_family_member_merges(models, tmp_path, monkeypatch):
    """docs/architecture.md's family member, its one registry line as written there: TIES' trim
    then plain task arithmetic. On the spec's 6-entry example it is the oracle's trim
    (tests/merge_reference.py) followed by the oracle's task arithmetic; at density 1 it is
    task arithmetic bit for bit through ``hub merge``; the fused path (the kernels' CPU
    reference) gives the chunked path's bits at density 0.3; and recipes get exactly the
    parameters the line declares (``sign_method`` is not one)."""
    from safetensors.torch import load_file

    import mergehub
    from mergehub.merge.engine import execute
    from mergehub.merge.methods import METHODS, members
    from mergehub.merge.plan import plan_merge
    from mergehub.merge.recipe import RecipeError, load_recipe
    from tests import merge_reference as ref
    from tests.test_merge_methods import BASE, TAUS, run

    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    code = text.split("# mergehub/merge/methods/members.py\n", 1)[1].split("```", 1)[0]
    monkeypatch.setitem(METHODS, "ties_linear", None)  # the registration is undone after the test
    exec(compile(code, "members.py", "exec"), dict(vars(members)))  # noqa: S102 (our doc)

    weights, densities = [1.0, 0.5, 2.0], [0.5, 0.34, 1.0]
    out = run("ties_linear", {"lambda": 0.7},
              [{"weight": w, "density": d} for w, d in zip(weights, densities)])
    want = ref.task_arithmetic(BASE, [ref.trim(t, d) for t, d in zip(TAUS, densities)],
                               weights, 0.7)
    assert all(abs(a - b) <= 1e-6 for a, b in zip(out, want)), (out, want)

    base, a, b = models["base-bf16"], models["ft-mlp"], models["ft-attn"]

    def recipe(method: str, params: tuple[str, str], extra: str = "") -> str:
        return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
                f"  - model: {a}\n    parameters: {{{params[0]}}}\n"
                f"  - model: {b}\n    parameters: {{{params[1]}}}\n{extra}")

    def merged(text: str, fused: bool = False) -> dict:
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        execute(plan_merge(load_recipe(text)), out, progress=False, fused=fused,
                chunk_elements=1000)
        return load_file(out / "model.safetensors")

    ours = merged(recipe("ties_linear", ("weight: 1.0", "weight: 0.5")))
    ta = merged(recipe("task_arithmetic", ("weight: 1.0", "weight: 0.5")))
    assert ours.keys() == ta.keys() and all(torch.equal(ours[k], ta[k]) for k in ta)
    trimmed = recipe("ties_linear", ("weight: 1.0, density: 0.3", "weight: 0.5, density: 0.3"))
    chunked, fused = merged(trimmed), merged(trimmed, fused=True)
    assert all(torch.equal(chunked[k], fused[k]) for k in chunked)
    assert any(not torch.equal(chunked[k], ta[k]) for k in ta)
    with pytest.raises(RecipeError, match="unknown parameter 'sign_method' for merge_method "
                                          "ties_linear"):
        mergehub.merge(recipe("ties_linear", ("weight: 1.0", "weight: 0.5"),
                              "parameters: {sign_method: count}\n"), tmp_path / "x",
                       progress=False)


def _long_modules() -> dict[str, bool]:
    """Module -> whether its docstring says why it is long, for every module over LONG lines."""
    out = {}
    for name, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") > LONG:
            doc = ast.get_docstring(ast.parse(text)) or ""
            out[name] = LONG_REASON in "\n".join(doc.splitlines()[:12])
    return out


def test_no_long_module_without_a_reason():
    """A module over LONG lines says why at its top ("(Over 500 lines: ...)"), or is one of
    the known exceptions; the exceptions are still long and still say nothing (so the list is
    the truth)."""
    long = _long_modules()
    unexplained = sorted(m for m, why in long.items() if not why and m not in KNOWN_LONG)
    assert not unexplained, "over 500 lines without a reason at the top: " + ", ".join(
        str(MODULES[m].relative_to(ROOT.parent)) for m in unexplained)
    stale = sorted(m for m in KNOWN_LONG if long.get(m, True))
    assert not stale, "no longer long, or now explained: remove from KNOWN_LONG: " + ", ".join(
        stale)
