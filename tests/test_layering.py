"""The import layering of ``src/deltatune``: no import circle between modules, and no module imports one
from a layer above its own.

Every ``import`` of a deltatune module is read with ``ast`` from the source files, at module level
(including ``if TYPE_CHECKING:`` blocks) AND inside functions: an import hidden in a function is still a
dependency. Importing ``deltatune.a.b`` also runs the package ``deltatune.a``'s ``__init__``, so that
package counts as imported too (the root package ``deltatune``, the public facade, is never counted this
way: every import runs it first).
"""

from __future__ import annotations

import ast
import fnmatch
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

import deltatune

SRC = Path(deltatune.__file__).resolve().parent

#: The layers, bottom first: ``(name, module patterns, comment)``. Module names are relative to
#: ``deltatune`` (``""`` is the root package); a pattern is an ``fnmatch`` pattern and a module belongs to
#: the first layer with a matching pattern. A module may import modules of its own layer or of a lower
#: one, never of a higher one. Some patterns name modules as other work moves them (``models/`` package,
#: ``tasks/`` modules, ``device``, ``preflight``); a pattern that matches nothing is fine.
LAYERS: list[tuple[str, tuple[str, ...], str]] = [
    ("foundation", ("errors", "_version"),
     "the exception hierarchy and the version: import nothing of deltatune"),
    ("helpers", ("_optional", "validation", "io_utils", "device"),
     "argument checks, file I/O, optional packages, the one device resolver: stand on errors alone"),
    ("leaves", ("kernels", "kernels.*", "data", "data.*", "metrics", "metrics.*", "hf_cache", "gguf_check",
                "compat"),
     "self-contained libraries: torch kernels, data readers, metrics, transformers cache helpers, GGUF "
     "checks (and the empty compat package)"),
    ("delta_layer", ("delta_layer",),
     "DeltaLayer and the other module wrappers: errors + torch only"),
    ("targets", ("inject",),
     "target-module selection and replacement (sees through DeltaLayer wrappers)"),
    ("method_base", ("methods.base",),
     "DeltaConfig, DeltaMethod, AdapterRecord: what every method implements"),
    ("methods", ("methods", "methods.*"),
     "the delta methods and their registry (methods/__init__: get_method, make_config)"),
    ("config_loading", ("config", "compat.pet_config"),
     "method configs from dicts and files, MindFormers pet_config: built by the registry"),
    ("freezing", ("freeze",),
     "which parameters train; trainable-parameter summaries"),
    ("api", ("api",),
     "apply / adapters / merge / unload on a model"),
    ("persistence", ("checkpoint", "peft_io"),
     "delta checkpoints and PEFT adapters on disk"),
    ("compat_layers", ("compat.loralib",),
     "loralib-compatible layers over the LoRA kernels and method"),
    ("models", ("models", "models.*"),
     "the bundled model registry, the GGUF -> safetensors cache and model loading"),
    ("export", ("export_gguf", "export_gguf.*", "gguf_tensors", "gguf_vocab"),
     "exporting merged models / adapters to GGUF"),
    ("train", ("train", "train.*"),
     "the Trainer (trainer, with its parts step, evaluation, trainer_checkpoints), its configs, losses, "
     "optimisers, schedules, the resume checkpoint format (resume), distributed and FSDP support"),
    ("generate", ("generate", "score_processors"),
     "decoding (greedy / beam search) for the pipelines"),
    ("compat_shells", ("compat.mindpet", "compat.*"),
     "MindPet-compatible shells over methods, freezing and the Trainer"),
    ("tasks", ("tasks", "tasks.*", "recipes", "sweep", "sweep_tables", "report", "preflight"),
     "the pipelines: run specifications, loaders, overrides, run directories, tasks, sweeps, reports"),
    ("jittor", ("jittor", "jittor.*"),
     "the Jittor port and its alignment with the torch pipeline"),
    ("facade", ("",),
     "the public package namespace: re-exports of every layer below (pipelines bound on first use)"),
    ("apps", ("cli", "__main__", "quickstart"),
     "command-line entry points and examples"),
]

#: Layers whose modules import deltatune modules at module level only: a function-level import hides a
#: dependency (cli.py keeps its own for start-up time; the layers above are moved in other work).
MODULE_LEVEL_ONLY = (
    "foundation", "helpers", "leaves", "delta_layer", "targets", "method_base", "methods", "config_loading",
    "freezing", "api", "persistence",
)


@dataclass(frozen=True)
class Edge:
    """``src`` imports ``dst`` (module names relative to ``deltatune``) at ``line`` of ``src``'s file."""

    src: str
    dst: str
    line: int
    in_function: bool


def _modules(root: Path) -> dict[str, Path]:
    """Relative module name -> file, for every ``.py`` file of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _rel(absolute: str) -> str | None:
    """``deltatune.a.b`` -> ``a.b``; ``deltatune`` -> ``""``; None for another package."""
    if absolute == "deltatune":
        return ""
    return absolute[len("deltatune."):] if absolute.startswith("deltatune.") else None


def _known(name: str, modules: dict[str, Path]) -> str:
    """The longest known module that ``name`` (a module, or a name inside one) lives in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool, modules: dict[str, Path]) -> list[str]:
    """The deltatune modules an import statement of ``module`` names (relative names)."""
    if isinstance(node, ast.Import):
        rel = [_rel(alias.name) for alias in node.names]
        return [_known(r, modules) for r in rel if r is not None]
    if node.level:
        package = module.split(".") if module else []
        if not is_pkg:
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        rel = _rel(node.module or "")
        if rel is None:
            return []
        base = rel
    out = []
    names_module = False
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        if sub in modules:
            out.append(sub)
        else:
            names_module = True
    if names_module or not out:
        out.append(_known(base, modules))
    return out


def _with_packages(target: str, importer: str) -> list[str]:
    """``target`` and the packages its import runs (not the root, not the importer's own packages)."""
    own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
    parts = target.split(".") if target else []
    chain = [".".join(parts[:i]) for i in range(1, len(parts))]
    return [p for p in chain if p not in own] + [target]


def import_edges(root: Path = SRC) -> list[Edge]:
    """Every import of a deltatune module by a deltatune module, module level and function level."""
    modules = _modules(root)
    edges = []
    for module, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

        def visit(node: ast.AST, in_function: bool, module: str = module, is_pkg: bool = is_pkg) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    targets = _targets(child, module, is_pkg, modules)
                    for dst in dict.fromkeys(d for t in targets for d in _with_packages(t, module)):
                        if dst != module:
                            edges.append(Edge(module, dst, child.lineno, in_function))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(tree, False)
    return edges


@functools.cache
def package_edges() -> tuple[Edge, ...]:
    """:func:`import_edges` of the installed package (read once per test session)."""
    return tuple(import_edges(SRC))


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of ``module``'s layer; KeyError for a module no layer names."""
    for i, (_, patterns, _) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise KeyError(module)


def find_cycle(edges: list[Edge] | tuple[Edge, ...]) -> list[Edge] | None:
    """One import circle (its edges in order), or None."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e.src, []).append(e)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[Edge] = []

    def dfs(node: str) -> list[Edge] | None:
        state[node] = 1
        for e in graph.get(node, []):
            if state.get(e.dst) == 1:
                start = next(i for i, p in enumerate(path + [e]) if p.src == e.dst)
                return (path + [e])[start:]
            if e.dst not in state:
                path.append(e)
                found = dfs(e.dst)
                if found:
                    return found
                path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def _show(e: Edge) -> str:
    where = "in a function" if e.in_function else "at module level"
    return f"{e.src or 'deltatune'} -> {e.dst or 'deltatune'} (line {e.line}, {where})"


def test_every_module_has_a_layer():
    unplaced = []
    for module in _modules(SRC):
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert unplaced == [], f"add these modules to LAYERS in {__file__}"


def test_no_import_circle():
    cycle = find_cycle(package_edges())
    assert cycle is None, "import circle: " + "; ".join(_show(e) for e in cycle)


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{_show(e)}: layer {LAYERS[layer_of(e.src)][0]!r} imports layer {LAYERS[layer_of(e.dst)][0]!r}"
        for e in package_edges()
        if layer_of(e.dst) > layer_of(e.src)
    ]
    assert upward == []


def test_lower_layers_import_at_module_level():
    low = {LAYERS.index(next(entry for entry in LAYERS if entry[0] == name)) for name in MODULE_LEVEL_ONLY}
    hidden = [_show(e) for e in package_edges() if e.in_function and layer_of(e.src) in low]
    assert hidden == []


# -- the checker itself, on small packages written here --------------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "deltatune"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_function_level_import_circle_is_found(tmp_path):
    root = _package(tmp_path, {
        "a.py": "from .b import x\n",
        "b.py": "def f():\n    from .a import y\n    return y\n",
    })
    cycle = find_cycle(import_edges(root))
    assert [_show(e) for e in cycle] == [
        "a -> b (line 1, at module level)",
        "b -> a (line 2, in a function)",
    ]


def test_package_init_counts_as_imported(tmp_path):
    """``low`` imports ``pkg.leaf``: that runs ``pkg/__init__``, which imports ``low`` again."""
    root = _package(tmp_path, {
        "low.py": "from .pkg.leaf import z\n",
        "pkg/__init__.py": "from ..low import w\n",
        "pkg/leaf.py": "z = 1\n",
    })
    edges = import_edges(root)
    assert sorted((e.src, e.dst) for e in edges) == [("low", "pkg"), ("low", "pkg.leaf"), ("pkg", "low")]
    assert [(e.src, e.dst) for e in find_cycle(edges)] == [("low", "pkg"), ("pkg", "low")]


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("import deltatune.pkg.leaf as L\n", ["pkg", "pkg.leaf"]),
        ("from deltatune.pkg import leaf\n", ["pkg", "pkg.leaf"]),
        ("from . import pkg\n", ["pkg"]),
        ("from .pkg.leaf import name\n", ["pkg", "pkg.leaf"]),
        ("from .pkg import leaf, other_name\n", ["pkg", "pkg.leaf"]),
        ("import deltatune as dt\n", [""]),
        ("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .pkg import leaf\n", ["pkg", "pkg.leaf"]),
    ],
)
def test_import_forms_resolve(tmp_path, statement, expected):
    root = _package(tmp_path, {"user.py": statement, "pkg/__init__.py": "", "pkg/leaf.py": ""})
    assert sorted(e.dst for e in import_edges(root) if e.src == "user") == expected
