"""The library's layers: every import of a jem_tf module (module level or inside a function) runs down this list
or stays in its layer, never up. Read from the source with ``ast`` (nothing is imported)."""

import ast
import fnmatch
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jem_tf")

# Top to bottom; a module may import its own layer and those below. `*` matches a package's modules.
LAYERS = [
    ("commands", ["jem_tf", "jem_tf.train", "jem_tf.evaluate", "jem_tf.export", "jem_tf.tune", "jem_tf.cli"]),
    ("training", ["jem_tf.training", "jem_tf.training.*"]),
    ("evaluation and serving", ["jem_tf.evaluation", "jem_tf.evaluation.*", "jem_tf.serving", "jem_tf.serving.*"]),
    ("ood", ["jem_tf.ood", "jem_tf.ood.*"]),
    ("run files and config", ["jem_tf.run", "jem_tf.run.*", "jem_tf.recipes"]),
    ("model", ["jem_tf.model", "jem_tf.model.*"]),
    ("sampling", ["jem_tf.sampling", "jem_tf.sampling.*"]),
    ("networks and data", ["jem_tf.networks", "jem_tf.data", "jem_tf.data.*"]),
    ("leaves", ["jem_tf.errors", "jem_tf.seeds", "jem_tf.files", "jem_tf.metrics", "jem_tf.figures",
                "jem_tf.keras_workarounds", "jem_tf.choices", "jem_tf.version"]),
]


def _modules():
    """``{module name: source path}`` of every module of the package."""
    found = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path[:-3], os.path.dirname(ROOT)).replace(os.sep, ".")
                found[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
    return found


def _layer(module):
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return index
    return None


def _imports(module, path, modules):
    """The jem_tf modules ``module`` imports (``from jem_tf import x`` counts as module ``jem_tf.x`` when it is one)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "jem_tf")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "jem_tf":
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules or candidate == "jem_tf.recipes" else base)
    found.discard(module)
    return found


def test_every_module_has_a_layer():
    assert [module for module in _modules() if _layer(module) is None] == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_run_down_the_layers(module):
    modules = _modules()
    own = _layer(module)
    upward = sorted(f"{name} ({LAYERS[_layer(name)][0]})" for name in _imports(module, modules[module], modules)
                    if _layer(name) is not None and _layer(name) < own)
    assert upward == [], f"{module} ({LAYERS[own][0]}) imports up the layers: {', '.join(upward)}"
