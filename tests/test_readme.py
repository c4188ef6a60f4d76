"""Every `python run.py ...` command and Python snippet the README shows runs, as a user would run it.

The commands are read from README.md (code blocks and inline code) and from each recipe's docstring in configs/,
so a documented command cannot break without a test failing. Each runs as its own `python run.py` process, in a
folder standing for the user's (run.py and configs/ linked in, the weight files its command names written there in
the format the name says, a few photos), with what the README leaves to the reader filled in (PLACEHOLDERS: a
data dir holding small copies of the datasets, a folder dataset) and a handful of steps on small models
(`shrink_flags`: fields the command does not set itself). Eval, predict and export run in the folder of the
training command of the same config. Commands that repeat an earlier one run once; the few that need a cluster
are listed in UNRUNNABLE with the reason. The multi-host command runs as two local processes. The Python snippets
run in this process, in the folder of the first training command.
"""

import ast
import contextlib
import dataclasses
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import fault_worker, test_ade20k_folder
from tests.conftest import TINY_UNET, set_fields
from tests.helpers import ROOT, import_torch_or_skip, save_state_dict, xla_flags

DEVICES = 2  # Simulated CPU devices of each run.py process (a 2-core machine's split).
BROKEN_PHOTO = 'broken.jpg'  # A photo the README's predict commands must skip, naming it, writing the rest.
FEW_STEPS = {'num_train_steps': 2, 'log_every_steps': 1, 'eval_every_steps': 2, 'checkpoint_every_steps': 2}

# What a README command leaves to the reader, by flag: filled with the test's fixtures (see `fill`).
PLACEHOLDERS = {
    ('config.dataset.data_dir', 'DIR'): 'tfds', ('config.dataset.data_dir', '/data/tfds'): 'tfds',
    ('config.dataset.path', 'DIR'): 'folder', ('config.dataset.path', 'ML_DIR'): 'multilabel_folder',
    ('config.dataset.name', 'NAME'): 'my_segmentation', ('config.dataset.num_classes', 'K'): '3',
    ('config.dataset.num_classes', 'N'): '3',
}
# Commands that need more than one machine can give (matched on the command's text), and why.
UNRUNNABLE = {
    'srun ': 'SLURM launches it (jax.distributed finds the job from SLURM variables)',
    'JAXSEG_DISTRIBUTED=1': 'a TPU pod slice or a SLURM job: jax.distributed finds its peers from the cluster',
}


@dataclasses.dataclass
class Command:
  source: str  # README.md:LINE or configs/x.py
  text: str    # As documented (continuation lines joined).
  env: dict    # VAR=value set before `python run.py`.
  args: list   # run.py's arguments.

  def flag(self, name):
    values = [a.split('=', 1)[1] for a in self.args if a.startswith(f'--{name}=')]
    return values[-1] if values else None

  @property
  def mode(self):
    return self.flag('mode') or 'train'

  @property
  def config_file(self):
    return self.flag('config')

  def key(self):
    """What makes two commands the same run: their arguments, but not where the workdir is, a GPU mask, or how the
    data dir is named (a recipe's docstring says DIR where the README relies on TFDS_DATA_DIR)."""
    args = [a for a in self.args if not a.startswith(('--workdir=', '--config.dataset.data_dir=DIR',
                                                      '--config.dataset.data_dir=/data/tfds'))]
    env = {k: v for k, v in self.env.items() if k != 'CUDA_VISIBLE_DEVICES'}
    return tuple(args), tuple(sorted(env.items()))


# ---------------------------------------------------------------------------
# Reading the commands.
# ---------------------------------------------------------------------------


def commands_in(text: str, source: str, first_line: int = 1) -> list:
  """The `python run.py` commands of `text` (shell lines, continuations joined), with their line numbers."""
  found = []
  lines = text.split('\n')
  i = 0
  while i < len(lines):
    start, line = i, lines[i]
    while line.rstrip().endswith('\\') and i + 1 < len(lines):
      i += 1
      line = line.rstrip()[:-1] + ' ' + lines[i].strip()
    i += 1
    for segment in _shell_segments(line):
      found += [Command(f'{source}:{first_line + start}', segment, env, args) for env, args in _run_py_calls(segment)]
  return found


def _shell_segments(line: str) -> list:
  """`line` with inline code spans of prose taken out: the parts that hold a run.py call."""
  spans = re.findall(r'`([^`]*python run\.py[^`]*)`', line)
  if spans:
    return spans
  return [line] if 'python run.py' in line else []


def _tokens(line: str) -> list:
  lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|')
  lexer.whitespace_split = True
  lexer.commenters = '#'
  return list(lexer)


def _run_py_calls(segment: str) -> list:
  """(env, args) of each `python run.py` call in a shell line; a quoted script (gcloud --command) is read too."""
  segment = segment.strip().lstrip('!')
  try:
    tokens = _tokens(segment)
  except ValueError:  # The last line of a quoted multi-line script (gcloud --command='...): its closing quote.
    tokens = _tokens(segment.strip('\'"'))
  calls = []
  for t in tokens:
    if 'python run.py' in t and t != segment:  # A script passed as one argument.
      calls += [c for line in t.split('\n') for c in _run_py_calls(line)]
  for i in range(len(tokens) - 1):
    if tokens[i].endswith('python') and tokens[i + 1] == 'run.py':
      env, j = {}, i - 1
      while j >= 0 and re.fullmatch(r'[A-Z_][A-Z0-9_]*=\S*', tokens[j]):
        key, value = tokens[j].split('=', 1)
        env[key] = value
        j -= 1
      args = []
      for t in tokens[i + 2:]:
        if t in (';', '&&', '||', '|', '&'):
          break
        args.append(t)
      calls.append((env, args))
  return calls


def readme_commands() -> list:
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    return commands_in(f.read(), 'README.md')


def recipe_commands() -> list:
  """The command in each recipe's docstring (configs/*.py)."""
  found = []
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    with open(path, encoding='utf-8') as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ''
    found += commands_in(doc, os.path.relpath(path, ROOT))
  return found


def plan() -> tuple[list, dict, dict, list]:
  """The README's commands to run, in order; {source: earlier source} of repeats; {source: reason} of the
  unrunnable; the recipes' docstring commands that the README does not show (their configs are checked, not run:
  each runs the model of a README command on a catalog dataset that a README command trains on too)."""
  runs, repeats, unrunnable, recipes_only, seen = [], {}, {}, [], {}
  for command in readme_commands() + recipe_commands():
    reason = next((why for marker, why in UNRUNNABLE.items()
                   if marker in command.text or marker.split('=')[0] in command.env), None)
    if reason:
      unrunnable[command.source] = reason
      continue
    key = command.key()
    if key in seen:
      repeats[command.source] = seen[key]
    elif command.source.startswith('README.md'):
      seen[key] = command.source
      runs.append(command)
    else:
      recipes_only.append(command)
  return runs, repeats, unrunnable, recipes_only


RUNS, REPEATS, UNRUNNABLE_FOUND, RECIPES_ONLY = plan()


def test_the_readme_documents_commands_and_each_is_run_or_said_why_not():
  """The parse finds the README's commands (a change of format must not silently drop them)."""
  sources = [c.source for c in RUNS] + list(REPEATS) + list(UNRUNNABLE_FOUND)
  readme = [s for s in sources if s.startswith('README.md')]
  assert len(readme) >= 20, sources
  modes = {c.mode for c in RUNS}
  assert modes == {'train', 'eval', 'predict', 'export'}, modes
  assert any('JAXSEG_COORDINATOR' in c.env for c in RUNS), 'the multi-host command'
  assert any(c.flag('config.model.encoder_weights') for c in RUNS), 'the fine-tuning commands'
  recipes = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))} - {'__init__.py'}
  assert {os.path.basename(c.config_file) for c in RUNS + RECIPES_ONLY} == recipes - {'default.py'}
  for source, reason in UNRUNNABLE_FOUND.items():
    print(f'not run: {source}: {reason}')
  for source, earlier in REPEATS.items():
    print(f'run once: {source} repeats {earlier}')


@pytest.mark.parametrize('command', RECIPES_ONLY, ids=[c.source for c in RECIPES_ONLY])
def test_a_recipe_command_the_readme_does_not_show_builds_its_model(command):
  """Its config passes jaxseg's checks and its model builds (train, eval and predict of the same model run above)."""
  from jaxseg import settings as settings_lib, state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxseg.data import datasets  # pylint: disable=g-import-not-at-top
  args = fill(command, {'tfds': '/nonexistent', 'folder': '/nonexistent'})
  settings = settings_lib.from_config(resolved_config(command, args))
  state_lib.build_model(settings, datasets.resolve_spec(settings.dataset, settings.task).num_classes)


# ---------------------------------------------------------------------------
# Fixtures: the data a user would have.
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def fixtures(shapes_data_dir, tmp_path_factory):
  """A tfds data dir with the embedded dataset, small copies of the catalog datasets and a dataset without a
  preset; a folder dataset; a few photos."""
  from tests import tfds_fixtures  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('readme')
  tfds_dir = root / 'tfds'
  tfds_dir.mkdir()
  os.symlink(os.path.join(shapes_data_dir, 'jaxseg_shapes'), tfds_dir / 'jaxseg_shapes')
  for name in tfds_fixtures.FEATURE_KEYS:
    tfds_fixtures.write_catalog_dataset(str(tfds_dir), name, 'array_record')
  tfds_fixtures.write_dataset_without_preset(str(tfds_dir), PLACEHOLDERS[('config.dataset.name', 'NAME')])
  folder = root / 'folder'
  write_folder(folder, num_classes=3)
  from tests import test_multilabel  # pylint: disable=g-import-not-at-top
  from configs import unet_multilabel  # pylint: disable=g-import-not-at-top
  test_multilabel.write_multilabel_folder(root / 'multilabel_folder', counts=(('train', 4), ('val', 2)),
                                          class_names=unet_multilabel.get_config().dataset.class_names)
  photos = root / 'photos'
  photos.mkdir()
  rng = np.random.default_rng(0)
  for name, (h, w) in {'a.jpg': (70, 90), 'b.jpg': (96, 96), 'c.png': (50, 120)}.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / name)
  (photos / BROKEN_PHOTO).write_bytes(b'\xff\xd8\xff\xe0 not a whole JPEG')  # Skipped with a warning naming it.
  # The README's ADE20K folder (`ade20k` in the user's folder), written by tools/ade20k_folder.py from a small
  # ADEChallengeData2016.
  test_ade20k_folder.write_ade(root / 'ADEChallengeData2016')
  test_ade20k_folder.ade20k_folder.convert(str(root / 'ADEChallengeData2016'), str(root / 'ade20k'))
  return {'root': root, 'tfds': str(tfds_dir), 'folder': str(folder), 'photos': str(photos),
          'multilabel_folder': str(root / 'multilabel_folder'),
          'ade20k': str(root / 'ade20k'), 'user_dirs': {}, 'trained': {}}


def write_folder(root, num_classes: int) -> None:
  """README "Your own folders": train/val images (PNG and JPEG, varied sizes) and palette masks."""
  rng = np.random.default_rng(2)
  for split, n in (('train', 4), ('val', 2)):
    os.makedirs(root / split / 'images')
    os.makedirs(root / split / 'masks')
    for i in range(n):
      h, w = rng.integers(40, 80, 2)
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
          root / split / 'images' / f'{i}.{"jpg" if i % 2 else "png"}')
      Image.fromarray(rng.integers(0, num_classes, (h, w), dtype=np.uint8)).save(root / split / 'masks' / f'{i}.png')


WEIGHT_FILE = re.compile(r'(resnet18|resnet34|resnet50|resnet101|vgg16_bn|vgg16)\b[^/]*\.(pth|safetensors)$')
# Hugging Face files by their repository's name: nvidia/mit-bN (SegformerForImageClassification) and
# nvidia/segformer-bN-finetuned-ade-512-512 (SegformerForSemanticSegmentation, 150 classes).
HF_SEGFORMER_FILE = re.compile(r'(mit|segformer)-b([0-5])\b[^/]*\.(bin|safetensors)$')
# DINOv2 ViTs: timm's files (timm/vit_small_patch14_dinov2.lvd142m) and transformers' (facebook/dinov2-small).
DINOV2_FILE = {re.compile(r'vit_(small|base)_patch14_dinov2\.lvd142m\b[^/]*\.safetensors$'): 'timm',
               re.compile(r'dinov2-(small|base)\b[^/]*\.safetensors$'): 'hf'}


def write_layout_file(encoder: str, layout: str, path: str) -> None:
  """A random state dict with every key and shape of the encoder's `layout` (its table, checked against the
  published key lists in the encoder's tests), written as .safetensors with numpy: no torch needed."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from jaxseg.models import encoders  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shapes = encoders.weights.expected_torch_shapes(encoder, layout)
  save_file({k: (0.02 * rng.standard_normal(shape)).astype(np.float32) for k, shape in shapes.items()}, path)


def write_weight_file(path: str) -> None:
  """The file a command names, with random weights, in the layout its publisher's files have: torchvision's
  (.pth by torch.save; timm's .safetensors names hold the same keys, VGG's classifier as timm's convolutions),
  transformers' SegFormer files (written by save_pretrained, as the Hugging Face files are), or DINOv2's (timm's or
  transformers' keys, from the encoder's table)."""
  for pattern, layout in DINOV2_FILE.items():
    match = pattern.search(os.path.basename(path))
    if match:
      write_layout_file(f'vit_{match.group(1)}_patch14_dinov2', layout, path)
      return
  import_torch_or_skip('torch')
  from tests import torch_reference as ref  # pylint: disable=g-import-not-at-top
  segformer = HF_SEGFORMER_FILE.search(os.path.basename(path))
  if segformer:
    kind, size, _ = segformer.groups()
    save_state_dict(ref.hf_segformer_state_dict(f'mit_b{size}', 150 if kind == 'segformer' else None), path)
    return
  arch, fmt = WEIGHT_FILE.search(os.path.basename(path)).groups()
  state_dict = ref.make_encoder(arch).state_dict()
  if fmt == 'safetensors' and arch.startswith('vgg'):
    state_dict = ref.to_timm_vgg(state_dict)
  save_state_dict(state_dict, path)


# ---------------------------------------------------------------------------
# Running a command.
# ---------------------------------------------------------------------------


def fill(command: Command, fixtures: dict) -> list:
  """The command's arguments with the placeholders filled and an absolute --workdir moved under the user's folder."""
  args = []
  for a in command.args:
    if a.startswith('--') and '=' in a:
      name, value = a[2:].split('=', 1)
      if (name, value) in PLACEHOLDERS:
        filled = PLACEHOLDERS[(name, value)]
        value = fixtures.get(filled, filled)
      elif name == 'workdir' and os.path.isabs(value):
        value = 'abs' + value
      elif re.fullmatch(r'[A-Z][A-Z_]*', value):
        raise AssertionError(f'{command.source}: the test cannot fill the placeholder {a!r}; add it to PLACEHOLDERS')
      a = f'--{name}={value}'
    args.append(a)
  return args


def resolved_config(command: Command, args: list):
  """The config the command's run builds (its file and its --config.* values), read in this process."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('recipe', os.path.join(ROOT, command.config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  fields = {}
  for a in args:
    if a.startswith('--config.'):
      name, value = a[len('--config.'):].split('=', 1)
      with contextlib.suppress(ValueError, SyntaxError):  # Else the string itself, as ml_collections reads it.
        value = ast.literal_eval(value)
      fields[name] = value
  config = set_fields(module.get_config(), fields)
  return config


def shrink_flags(command: Command, args: list) -> list:
  """A handful of steps on a small model: --config flags for the fields the command does not set itself."""
  config = resolved_config(command, args)
  fields = {**FEW_STEPS, 'batch_size': DEVICES, 'eval_batch_size': DEVICES}
  if config.dataset.name == 'jaxseg_shapes':
    fields['dataset.eval_split'] = 'validation[:8]'
  if config.model.name == 'unet' and not config.model.get('encoder'):
    fields.update({'model.base_width': 4, 'model.depth': 2})
  if config.model.name == 'fcn':
    fields.update({'model.width_multiplier': 0.125, 'model.fc_width': 16})
  # Small crops; an evaluation frame that holds the fixtures' images (up to 96 x 96) whole, so no second,
  # sliding-window program is compiled for them.
  for size, value in (('crop_size', '(64,64)'), ('eval_size', '(96,96)')):
    if config.input[size] != 'auto':
      fields[f'input.{size}'] = value
  given = {a.split('=', 1)[0][len('--config.'):] for a in args if a.startswith('--config.')}
  return [f'--config.{k}={v}' for k, v in fields.items() if k not in given]


# run.py flags that say what to do with a trained run rather than what run it is.
USE_FLAGS = ('--mode=', '--checkpoint=', '--input=', '--output=', '--workdir=')


def identity(args: list) -> tuple:
  """The flags that make a training run what it is: eval, predict and export of it must repeat them."""
  return tuple(a for a in args if not a.startswith(USE_FLAGS))


def as_it_is(command: Command) -> bool:
  """An eval/predict/export of a whole-model file (config.model.weights) in a workdir where nothing was trained."""
  return command.mode != 'train' and bool(command.flag('config.model.weights'))


def user_dir(fixtures: dict, command: Command, args: list) -> str:
  """The folder a user runs the command in: a fresh one per training command (and per use of a whole-model file as
  it is); eval, predict and export run in the folder of the last training command of the same run (its config and
  flags)."""
  if command.mode != 'train' and not as_it_is(command):
    assert identity(args) in fixtures['trained'], f'{command.source}: no training command of this run before it'
    return fixtures['trained'][identity(args)]
  path = fixtures['root'] / f'user_{len(fixtures["user_dirs"])}'
  path.mkdir()
  for name in ('run.py', 'configs', 'tools'):
    os.symlink(os.path.join(ROOT, name), path / name)
  os.symlink(fixtures['photos'], path / 'photos')
  os.symlink(fixtures['ade20k'], path / 'ade20k')
  fixtures['user_dirs'][command.source] = str(path)
  if command.mode == 'train':
    fixtures['trained'][identity(args)] = str(path)
  return str(path)


def run_env(fixtures: dict, devices: int = DEVICES) -> dict:
  env = dict(os.environ)
  env.update({'XLA_FLAGS': xla_flags(devices), 'JAX_PLATFORMS': 'cpu', 'TFDS_DATA_DIR': fixtures['tfds']})
  return env


def workdir_of(command: Command, args: list, cwd: str) -> str:
  flagged = [a.split('=', 1)[1] for a in args if a.startswith('--workdir=')]
  stem = os.path.splitext(os.path.basename(command.config_file))[0]
  return os.path.join(cwd, flagged[-1] if flagged else os.path.join('workdirs', stem))


def run_command(command: Command, fixtures: dict) -> tuple:
  """Runs the command (all its processes) in its user folder.

  Returns:
    (folder, its filled arguments, output); fails on a non-zero exit.
  """
  args = fill(command, fixtures)
  cwd = user_dir(fixtures, command, args)
  model = resolved_config(command, args).model
  for name in filter(None, [model.get('encoder_weights'), model.get('weights')]):
    if name == 'None':  # ml_collections' flags give `=None` to a str field as the string.
      continue
    if not os.path.exists(os.path.join(cwd, name)):
      write_weight_file(os.path.join(cwd, name))
  full = [*args, *shrink_flags(command, args)]
  env = dict(command.env)
  if 'JAXSEG_COORDINATOR' in env:
    return cwd, args, run_multiprocess(full, env, cwd, fixtures)
  proc = subprocess.run([sys.executable, 'run.py', *full], cwd=cwd, env={**run_env(fixtures), **env},
                        capture_output=True, text=True, timeout=600)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, f'{command.source}: {command.text}\nexit {proc.returncode}\n{output[-4000:]}'
  return cwd, args, output


def run_multiprocess(args: list, env: dict, cwd: str, fixtures: dict, processes: int = 2) -> str:
  """The README's multi-host command as `processes` local processes of one device each (coordinator on localhost)."""
  port = fault_worker.free_port()
  procs = []
  try:
    for i in range(processes):
      proc_env = {**run_env(fixtures, devices=1), **env, 'JAXSEG_COORDINATOR': f'localhost:{port}',
                  'JAXSEG_NUM_PROCESSES': str(processes), 'JAXSEG_PROCESS_ID': str(i)}
      log = open(os.path.join(cwd, f'process_{i}.log'), 'w', encoding='utf-8')  # pylint: disable=consider-using-with
      procs.append(subprocess.Popen([sys.executable, 'run.py', *args], cwd=cwd, env=proc_env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True))
      procs[-1].log_path = log.name
      log.close()
    codes = fault_worker.wait_all(procs, timeout=600)
  finally:
    fault_worker.stop(procs)
  outputs = [fault_worker.output(p) for p in procs]
  assert codes == [0] * processes, '\n'.join(o[-3000:] for o in outputs)
  return outputs[0]


def check_result(command: Command, cwd: str, args: list, output: str) -> None:
  """What each mode leaves behind, read from the files it wrote."""
  from jaxseg.data import datasets  # pylint: disable=g-import-not-at-top
  workdir = workdir_of(command, args, cwd)
  config = resolved_config(command, args)
  class_names = datasets.resolve_spec(config.dataset, config.task).class_names
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8')]
  if command.mode == 'train':
    assert 'step 2/2' in output and 'mean IoU' in output, output[-3000:]
    train, evals = ([r for r in records if r['split'] == split] for split in ('train', 'eval'))
    assert [r['step'] for r in train] == [1, 2] and [r['step'] for r in evals] == [2], records
    assert {'loss', 'learning_rate', 'images_per_sec'} <= set(train[0]) and np.isfinite(train[-1]['loss'])
    assert {'loss', 'mean_iou', 'pixel_accuracy', 'per_class_iou'} <= set(evals[0])
    assert len(evals[0]['per_class_iou']) == len(class_names)
    assert os.listdir(os.path.join(workdir, 'checkpoints')) and os.listdir(os.path.join(workdir, 'tensorboard'))
    assert json.load(open(os.path.join(workdir, 'config.json'), encoding='utf-8'))['num_train_steps'] == 2
  elif command.mode == 'eval' and as_it_is(command):
    weights = command.flag('config.model.weights')
    assert f'{weights}: mean IoU' in output and all(n in output for n in class_names), output[-3000:]
    assert [r['step'] for r in records if r['split'] == 'eval'] == [0], records
  elif command.mode == 'eval':
    which = command.flag('checkpoint') or 'best'
    assert f'Checkpoint step 2 ({which})' in output and all(n in output for n in class_names), output[-3000:]
    # It scores the checkpoint the training run scored at its end: the same figure, appended to metrics.jsonl.
    evals = [r for r in records if r['split'] == 'eval']
    assert evals[-1]['mean_iou'] == pytest.approx(evals[0]['mean_iou'], abs=1e-6)
  elif command.mode == 'predict':
    inputs = glob.glob(os.path.join(cwd, command.flag('input')))
    inputs = [p for i in inputs for p in (sorted(glob.glob(os.path.join(i, '*'))) if os.path.isdir(i) else [i])]
    out = os.path.join(cwd, command.flag('output') or os.path.join(workdir, 'predictions'))
    assert any(p.endswith(BROKEN_PHOTO) for p in inputs) and BROKEN_PHOTO in output, output[-3000:]
    written = [p for p in inputs if not p.endswith(BROKEN_PHOTO)]
    multilabel = config.task == 'multilabel'  # A 0/1 mask per class: out/<class>/<stem>.png.
    for path in written:
      stem = os.path.splitext(os.path.basename(path))[0]
      for mask_path in ([os.path.join(out, c, stem + '.png') for c in class_names] if multilabel
                        else [os.path.join(out, stem + '.png')]):
        with Image.open(path) as image, Image.open(mask_path) as mask:
          assert mask.size == image.size and np.asarray(mask).max() < (2 if multilabel else len(class_names))
      assert os.path.exists(os.path.join(out, stem + '_overlay.png'))
    assert f'Wrote {len(written)} mask(s)' in output, output[-3000:]
  elif command.mode == 'export':
    written = set(os.listdir(os.path.join(workdir, 'export')))
    assert {'model.jax_exported', 'model.json', 'saved_model', 'model.onnx'} <= written, written


def slow(command: Command) -> bool:
  """Pretrained encoders (their programs take a minute to compile here) and several processes: marked slow, run
  by CI (`-m slow`), left out of the README's test command."""
  model = resolved_config(command, []).model
  # The multi-label recipe: tests/test_multilabel.py runs its path (train, eval, predict, export) in the default set.
  multilabel = resolved_config(command, []).task == 'multilabel'
  return bool(command.flag('config.model.encoder_weights') or model.get('encoder_weights') or as_it_is(command)
              or model.get('weights')) or 'JAXSEG_COORDINATOR' in command.env or multilabel


@pytest.mark.parametrize('command', [pytest.param(c, marks=[pytest.mark.slow] if slow(c) else []) for c in RUNS],
                         ids=[f'{c.source} {" ".join(c.args)[:80]}' for c in RUNS])
def test_readme_command(command, fixtures):
  cwd, args, output = run_command(command, fixtures)
  check_result(command, cwd, args, output)


# ---------------------------------------------------------------------------
# The Python snippets.
# ---------------------------------------------------------------------------


def python_snippets() -> list:
  """(README line, code) of each ```python block."""
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  return [(text[:m.start()].count('\n') + 2, m.group(1)) for m in re.finditer(r'```python\n(.*?)```', text, re.S)]


SNIPPETS = python_snippets()


def with_checked_prints(code: str) -> str:
  """`print(X)  # LITERAL` lines become checks that X equals the literal the README promises."""
  out = []
  for line in code.split('\n'):
    m = re.fullmatch(r'print\((.*)\)\s+#\s*(.*)', line.strip())
    if m:
      with contextlib.suppress(ValueError, SyntaxError):
        expected = ast.literal_eval(m.group(2))
        line = f'assert {m.group(1)} == {expected!r}, ({m.group(1)}, {expected!r})'
    out.append(line)
  return '\n'.join(out)


@pytest.mark.parametrize('line,code', SNIPPETS, ids=[f'README.md:{l}' for l, _ in SNIPPETS])
def test_readme_python_snippet(line, code, fixtures, monkeypatch, tmp_path):
  """Each snippet runs as written, in the folder of the README's first training run (its workdirs/unet, its
  photos, the weight files it names); train_and_evaluate runs a handful of steps and writes under tmp_path."""
  first = next(c for c in RUNS if c.mode == 'train' and c.config_file == 'configs/unet.py')
  cwd = fixtures['user_dirs'].get(first.source) or run_command(first, fixtures)[0]
  for name in re.findall(r"['\"]([^'\"/]+\.(?:pth|safetensors))['\"]", code):
    if not os.path.exists(os.path.join(cwd, name)):
      write_weight_file(os.path.join(cwd, name))
  from jaxseg import train  # pylint: disable=g-import-not-at-top
  real_train = train.train_and_evaluate

  def few_steps(config, workdir):
    del workdir
    small = {k: TINY_UNET[k] for k in ('model.base_width', 'model.depth', 'batch_size', 'eval_batch_size')}
    set_fields(config, {**small, **FEW_STEPS, 'dataset.data_dir': fixtures['tfds']})
    return real_train(config, str(tmp_path / 'wd'))

  monkeypatch.setattr(train, 'train_and_evaluate', few_steps)
  monkeypatch.chdir(cwd)
  exec(compile(with_checked_prints(code), f'README.md:{line}', 'exec'), {'__name__': '__readme__'})  # pylint: disable=exec-used
