"""The import graph of `adpfl_jax` has no cycle, and the data readers are leaves.

The graph is read from the source with `ast` (nothing is imported): one node per module of the
package, one edge per `import` / `from ... import` of another `adpfl_jax` module anywhere in the
file (function-level imports count). `from pkg import name` is an edge to `pkg.name` when that is a
module, else to `pkg`. A submodule's implicit dependency on its parent package is not an edge.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / 'adpfl_jax'


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


def _resolve(name: str, modules) -> str | None:
  """`name` or its longest prefix that is a module of the package."""
  parts = name.split('.')
  for n in range(len(parts), 0, -1):
    if '.'.join(parts[:n]) in modules:
      return '.'.join(parts[:n])
  return None


def _edges(module: str, path: pathlib.Path, modules) -> set[str]:
  package = module if path.name == '__init__.py' else module.rpartition('.')[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'), str(path))):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      names = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base
               for alias in node.names]
    else:
      continue
    out |= {m for m in (_resolve(n, modules) for n in names) if m and m != module}
  return out


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _edges(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_graph_covers_the_package():
  graph = _graph()
  assert {'adpfl_jax.train', 'adpfl_jax.data.federated', 'adpfl_jax.data.sources'} <= set(graph)
  assert 'adpfl_jax.data.padded' in graph['adpfl_jax.data.federated']
  assert 'adpfl_jax.data.federated' in graph['adpfl_jax.train']


def test_no_import_cycle_goes_through_the_data_package():
  cycles = [c for c in _cycles(_graph()) if any(m.startswith('adpfl_jax.data') for m in c)]
  assert not cycles, f'import cycles through adpfl_jax.data: {cycles}'


def test_the_package_has_no_import_cycle():
  cycles = _cycles(_graph())
  assert not cycles, f'import cycles in adpfl_jax: {cycles}'


def test_cycle_finder_finds_a_planted_cycle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
  assert _cycles(graph) == [['a', 'b', 'c']]


@pytest.mark.parametrize('module,allowed', [
    ('padded', set()),
    ('partition', set()),
    ('nifti', set()),
    ('ham10000', set()),
    ('kits23', {'nifti'}),
    ('brats', {'nifti'}),
    ('preprocess3d', set()),
    ('phantom_skin', set()),
])
def test_leaves_import_no_pipeline_module(module, allowed):
  """FederatedData, partitions, readers and preprocessing know nothing of the pipeline."""
  edges = _graph()[f'adpfl_jax.data.{module}']
  assert {e.rpartition('.')[2] for e in edges} <= allowed
