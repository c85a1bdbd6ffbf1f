"""The import rules of the moe package hold: read from the source with `ast`, nothing is imported.

Every `import` statement counts, at module level or inside a function. The rules:
  (a) the MoE layer package `moe.layer` imports from `moe` only `moe.layer` and the shared
      modules `LAYER_SHARED` (moe.errors, moe.sharding, moe.trees);
  (b) no import cycle among moe modules;
  (c) the shared modules `SHARED` import only the standard library, third-party packages and
      each other (never a concern package such as moe.layer or moe.train).
Module graph: `import moe.a.b` is an edge to moe.a.b; `from moe.a import b` to moe.a.b when that
is a module, else to moe.a (a package's node is its `__init__`). The implicit run of a parent
package's `__init__` on a submodule import is not an edge: those `__init__`s are already in
sys.modules when the submodule runs, so such a loop is no import cycle.
"""

from __future__ import annotations

import ast
import os

from conftest import REPO

PACKAGE = "moe"
LAYER = "moe.layer"
LAYER_SHARED = ("moe.errors", "moe.sharding", "moe.trees")
SHARED = ("moe.errors", "moe.sharding", "moe.trees", "moe.rundir", "moe.distributed",
          "moe.allocator")


def find_modules(root: str, package: str = PACKAGE) -> dict[str, str]:
  """{dotted module name: file path} for every .py file of the package under `root`."""
  modules = {}
  for folder, _, files in os.walk(os.path.join(root, package)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        parts = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
  return modules


def _within(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def _from_base(node: ast.ImportFrom, name: str, path: str) -> str:
  """The module a `from X import ...` reads X as, relative imports resolved."""
  if not node.level:
    return node.module
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
  return f"{base}.{node.module}" if node.module else base


def _written(node) -> str:
  """The import statement on one line, as written."""
  names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
  if isinstance(node, ast.Import):
    return f"import {names}"
  return f"from {'.' * node.level}{node.module or ''} import {names}"


def module_imports(name: str, path: str, modules) -> list[tuple[str, int, str]]:
  """(imported module, line, the statement as written) for every module each import statement
  of the file imports, at any depth. `from X import y` imports X.y when that is a module, else X."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {(a.name, node.lineno, _written(node)) for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = _from_base(node, name, path)
      out |= {(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, node.lineno,
               _written(node)) for a in node.names}
  return sorted(out, key=lambda t: (t[1], t[0]))


def all_imports(modules) -> dict[str, list[tuple[str, int, str]]]:
  """{module: its imports of modules inside the package} (see `module_imports`)."""
  return {m: [i for i in module_imports(m, p, modules) if _within(i[0], PACKAGE)]
          for m, p in modules.items()}


def layer_violations(imports) -> list[str]:
  """Rule (a): one line per import of `moe` outside moe.layer and LAYER_SHARED by moe.layer."""
  return [f"{m} line {line}: `{text}` imports {target}; {LAYER} may import from {PACKAGE} "
          f"only {LAYER} and {', '.join(LAYER_SHARED)}"
          for m, found in sorted(imports.items()) if _within(m, LAYER)
          for target, line, text in found
          if not _within(target, LAYER) and not any(_within(target, s) for s in LAYER_SHARED)]


def shared_violations(imports) -> list[str]:
  """Rule (c): one line per import of a concern package by a shared module."""
  return [f"{m} line {line}: `{text}` imports {target}; the shared modules {', '.join(SHARED)} "
          f"may import from {PACKAGE} only each other"
          for m, found in sorted(imports.items()) if m in SHARED
          for target, line, text in found if not any(_within(target, s) for s in SHARED)]


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  """The nodes reachable from `start` by one edge or more."""
  seen, todo = set(), list(graph[start])
  while todo:
    n = todo.pop()
    if n not in seen:
      seen.add(n)
      todo += graph.get(n, ())
  return seen


def import_cycles(imports) -> list[str]:
  """Rule (b): one line per strongly connected group of modules (an import cycle): its members
  and the imports among them."""
  graph = {m: {t for t, _, _ in found if t in imports} for m, found in imports.items()}
  reach = {m: _reachable(graph, m) for m in graph}
  groups = []
  for m in sorted(graph):
    if m in reach[m] and not any(m in g for g in groups):
      groups.append(sorted(n for n in reach[m] if m in reach[n]))
  return [f"import cycle among {', '.join(g)}: " + "; ".join(
      f"{m} line {line} `{text}`" for m in g for t, line, text in imports[m] if t in g)
          for g in groups]


def _real_tree():
  return all_imports(find_modules(REPO))


def test_layer_imports_only_layer_and_shared_modules():
  problems = layer_violations(_real_tree())
  assert not problems, "\n".join(problems)


def test_shared_modules_import_no_concern_package():
  problems = shared_violations(_real_tree())
  assert not problems, "\n".join(problems)


def test_no_import_cycles():
  problems = import_cycles(_real_tree())
  assert not problems, "\n".join(problems)


def test_function_level_imports_are_read():
  """moe.sharding imports flax inside functions: read, and allowed (a third-party package)."""
  modules = find_modules(REPO)
  found = [t for t, _, _ in module_imports("moe.sharding", modules["moe.sharding"], modules)]
  assert "flax.linen" in found and "moe.errors" in found, found
  assert not [p for p in shared_violations(all_imports(modules)) if p.startswith("moe.sharding ")]


def _write(root, files: dict[str, str]):
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_reports_each_broken_rule(tmp_path):
  _write(tmp_path, {
      "moe/__init__.py": "",
      "moe/errors.py": "import dataclasses\n",
      "moe/sharding.py": ("import jax\nfrom moe.errors import ConfigError\n\n\ndef f():\n"
                          "  import flax.linen as nn\n"),
      "moe/rundir.py": "def f():\n  from moe.train import trainer\n",
      "moe/layer/__init__.py": "",
      "moe/layer/dispatch.py": "from moe import sharding\nfrom . import rows\n",
      "moe/layer/rows.py": "import numpy as np\nfrom moe.errors import ConfigError\n",
      "moe/layer/modules.py": ("from moe.layer import dispatch\nfrom moe.trees import flatten\n\n\n"
                               "def f():\n  from moe.train import trainer\n"),
      "moe/train/__init__.py": "",
      "moe/train/trainer.py": "import moe.layer.modules\n",
      "moe/sweep/__init__.py": "",
      "moe/sweep/report.py": "from moe.sweep.runner import SUMMARY_FILE\n",
      "moe/sweep/runner.py": "def f():\n  from moe.sweep import report\n",
  })
  imports = all_imports(find_modules(str(tmp_path)))
  assert imports["moe.layer.dispatch"] == [
      ("moe.sharding", 1, "from moe import sharding"),
      ("moe.layer.rows", 2, "from . import rows")]
  layer = layer_violations(imports)
  assert len(layer) == 1 and layer[0].startswith(
      "moe.layer.modules line 6: `from moe.train import trainer` imports moe.train.trainer;"), layer
  shared = shared_violations(imports)
  assert len(shared) == 1 and shared[0].startswith(
      "moe.rundir line 2: `from moe.train import trainer` imports moe.train.trainer;"), shared
  cycles = import_cycles(imports)
  assert cycles == [
      "import cycle among moe.layer.modules, moe.train.trainer: moe.layer.modules line 6 "
      "`from moe.train import trainer`; moe.train.trainer line 1 `import moe.layer.modules`",
      "import cycle among moe.sweep.report, moe.sweep.runner: moe.sweep.report line 1 "
      "`from moe.sweep.runner import SUMMARY_FILE`; moe.sweep.runner line 2 "
      "`from moe.sweep import report`"], cycles
