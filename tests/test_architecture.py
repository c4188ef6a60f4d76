"""ARCHITECTURE.md's rules on the direction of imports, read from the source (every import, function-level ones too)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'jaxseg'

# ARCHITECTURE.md, "Direction of imports": a module imports only modules of its own layer or below.
LAYERS = [
    # 0: leaves: no jaxseg import beyond errors, image_io and viz (reporting draws the evaluation pictures).
    {'jaxseg', 'jaxseg.errors', 'jaxseg.losses', 'jaxseg.metrics', 'jaxseg.compilation_cache', 'jaxseg.reporting',
     'jaxseg.image_io', 'jaxseg.viz', 'jaxseg.distributed', 'jaxseg.models.layers', 'jaxseg.models.preprocessing',
     'jaxseg.onnx_export'},
    # 1: models, data, the optimiser, the mesh, the settings (the config read once).
    {'jaxseg.models*', 'jaxseg.data*', 'jaxseg.optim', 'jaxseg.sharding', 'jaxseg.settings'},
    # 2: the train state, its checkpoints, the auto recipe (settings from data statistics), the start-up path.
    {'jaxseg.state', 'jaxseg.checkpoint', 'jaxseg.recipe', 'jaxseg.time_budget', 'jaxseg.startup'},
    # 3: what runs a model: training, evaluation, prediction of arrays, export.
    {'jaxseg.train', 'jaxseg.evaluate', 'jaxseg.inference', 'jaxseg.export'},
    # 4: the entry points.
    {'jaxseg.predict', 'jaxseg.cli', 'jaxseg.api'},
]


def layer_of(module: str) -> int:
  """The layer of `module`: an exact name wins over a package pattern ('jaxseg.models*')."""
  for exact in (True, False):
    for i, names in enumerate(LAYERS):
      for name in names:
        if (name == module) if exact else (name.endswith('*') and module.startswith(name[:-1])):
          return i
  raise AssertionError(f'{module} is in no layer of LAYERS: add it (and to ARCHITECTURE.md)')


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def jaxseg_imports(path: pathlib.Path) -> set:
  """The jaxseg modules `path` imports anywhere in it ('from jaxseg import x' -> jaxseg.x when x is a module)."""
  modules = {module_name(p) for p in PACKAGE.rglob('*.py')}
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.split('.')[0] == 'jaxseg'}
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f'{path}: relative import; jaxseg uses absolute imports'
      if node.module and node.module.split('.')[0] == 'jaxseg':
        for alias in node.names:
          sub = f'{node.module}.{alias.name}'
          found.add(sub if sub in modules else node.module)
  return found


GRAPH = {module_name(p): jaxseg_imports(p) for p in sorted(PACKAGE.rglob('*.py'))}


def test_the_import_graph_is_read():
  """The reader sees what is there (a check of the checker): train imports evaluate, predict imports inference."""
  assert 'jaxseg.evaluate' in GRAPH['jaxseg.train'] and 'jaxseg.state' in GRAPH['jaxseg.train']
  assert 'jaxseg.inference' in GRAPH['jaxseg.predict']
  assert 'jaxseg.models.encoders.registry' in GRAPH['jaxseg.models.segmentation_model']


@pytest.mark.parametrize('module', sorted(GRAPH))
def test_no_module_imports_one_above_it(module):
  above = sorted(d for d in GRAPH[module] if layer_of(d) > layer_of(module))
  assert not above, f'{module} (layer {layer_of(module)}) imports {above} from a layer above it'


def test_training_never_imports_predict_mode_export_or_the_entry_points():
  """Everything jaxseg.train reaches, transitively: no file-writing prediction, export, API or CLI code."""
  seen, todo = set(), ['jaxseg.train']
  while todo:
    module = todo.pop()
    if module not in seen:
      seen.add(module)
      todo += GRAPH.get(module, ())
  assert 'jaxseg.inference' in seen  # The full-size scoring of large evaluation images uses the Predictor.
  assert not seen & {'jaxseg.predict', 'jaxseg.export', 'jaxseg.api', 'jaxseg.cli'}, sorted(seen)


# The encoder families: each its own module, registered by one line `**<module>.ENCODERS,` in encoders/registry.py.
REGISTRY = PACKAGE / 'models' / 'encoders' / 'registry.py'
FAMILIES = [line.split('#')[0].strip()[2:-len('.ENCODERS,')] for line in REGISTRY.read_text(encoding='utf-8').splitlines()
            if line.strip().startswith('**') and line.split('#')[0].strip().endswith('.ENCODERS,')]


def test_only_a_family_module_names_its_family():
  """No `family ==` switch: outside the family modules and the architectures' defaults (models/__init__.py), no
  string names an encoder family or encoder (messages and docstrings aside: only identifier-like strings)."""
  assert {'resnet', 'vgg'} <= set(FAMILIES)  # The registry is read.
  allowed = {f'jaxseg.models.encoders.{family}' for family in FAMILIES} | {'jaxseg.models'}
  found = []
  for path in sorted(PACKAGE.rglob('*.py')):
    if module_name(path) in allowed:
      continue
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
      if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier()
          and node.value.lower().startswith(tuple(FAMILIES))):
        found.append(f'{module_name(path)}:{node.lineno}: {node.value!r}')
  assert not found, found
