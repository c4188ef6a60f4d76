"""Faults a long training job meets, each provoked for real: SIGTERM, SIGKILL mid-save, a corrupted checkpoint, a
NaN loss, an unwritable workdir, and memory over a long run.

Workers inherit the session's persistent compilation cache (conftest), so launches after the first of a schedule
skip most compiling."""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from configs import default
from jaxseg import checkpoint as checkpoint_lib
from jaxseg import cli
from jaxseg import startup
from jaxseg import train
from jaxseg.data import pipeline
from jaxseg.errors import ConfigError
from tests import fault_worker as fw
from tests.conftest import tiny_unet_config
from tests.helpers import ROOT, jaxseg_log_records, load_checkpoint, max_abs_diff, xla_flags

STEPS = 60
# One schedule for the runs here, so the persistent compilation cache serves them (log, checkpoint and evaluation
# intervals are not part of the compiled step).
CONFIG = {'num_train_steps': STEPS, 'log_every_steps': 1, 'eval_every_steps': STEPS, 'checkpoint_every_steps': 10}
DEVICES = 2


def _run(spec, log_path, env=None):
  return fw.run(spec, devices=DEVICES, log_path=log_path, env=env)


# ---------------------------------------------------------------------------
# A job pre-empted (SIGTERM), resumed, killed (SIGKILL) while writing a checkpoint and restarted ends exactly
# where an uninterrupted run ends (AdamW's moments and the moving averages included); the restarted process
# loads its programs from the first run's compilation cache.
# ---------------------------------------------------------------------------

RESUME_CONFIG = dict(CONFIG, **{'optimizer.name': 'adamw', 'optimizer.learning_rate': 0.01, 'ema_decay': 0.3})
COMPARED = ('params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats', 'step')
COMPILE_LINE = re.compile(r'Finished XLA compilation of (\S+) in ([0-9.]+) sec')


def _sigterm_when(spec, ready, what, log_path, env=None) -> str:
  """Launches the run of `spec`, sends it SIGTERM once `ready()`, and returns its output after a clean exit."""
  proc = fw.launch(spec, devices=DEVICES, log_path=log_path, env=env)
  try:
    fw.wait_until(ready, [proc], timeout=400, what=what)
    proc.send_signal(signal.SIGTERM)
    fw.wait_all([proc], timeout=120)
  finally:
    fw.stop([proc])
  out = fw.output(proc)
  assert proc.returncode == 0, out[-3000:]
  return out


def _assert_same_final_state(straight_dir, workdir, steps, what):
  """The interrupted run's last checkpoint is at `steps` and equals the uninterrupted run's (to 1e-5)."""
  a, _ = load_checkpoint(straight_dir)
  b, step = load_checkpoint(workdir)
  assert step == steps
  for key in COMPARED:
    diff = max_abs_diff(a[key], b[key])
    print(f'{what}: {key} differs from the uninterrupted run of {steps} steps by {diff:.3g}')
    assert diff < 1e-5, (key, diff)


@pytest.mark.slow  # 51 s: CI's slow leg runs it (the default set keeps test_bench_learning's SIGTERM stop).
def test_sigterm_then_kill_9_mid_save_each_resume_exactly_and_the_cache_serves_the_restart(shapes_data_dir,
                                                                                            tmp_path):
  cache = tmp_path / 'xla'
  # The session's JAX_COMPILATION_CACHE_DIR unset, so that config.compilation_cache_dir decides; compilations
  # logged.
  env = {'JAX_COMPILATION_CACHE_DIR': None, 'JAX_LOG_COMPILES': '1'}
  spec = {'data_dir': shapes_data_dir, 'overrides': dict(RESUME_CONFIG, compilation_cache_dir=str(cache))}
  rc, first = _run(dict(spec, workdir=str(tmp_path / 'straight')), tmp_path / 'straight.log', env)
  assert rc == 0, first[-3000:]
  assert f'XLA compilation cache: {cache}' in first
  assert 'Persistent compilation cache hit' not in first
  entries = [n for n in os.listdir(cache) if not n.startswith('.')]
  assert entries, 'the first run wrote nothing to the cache'

  # 1. SIGTERM: a checkpoint at the current step, a clean exit.
  workdir = tmp_path / 'interrupted'
  spec = dict(spec, workdir=str(workdir))
  # Past the periodic checkpoint at step 10, so the pre-emption checkpoint is a step of its own.
  out = _sigterm_when(spec, lambda: len(fw.logged_steps(workdir)) >= 11, 'step 11', tmp_path / 'interrupted.log',
                      env)
  saved, stopped = load_checkpoint(workdir)
  assert max_abs_diff(saved['ema_params'], saved['params']) > 1e-4  # Mid-run, the average is not the weights.
  assert f'Pre-empted (SIGTERM): checkpoint at step {stopped} of {STEPS} saved' in out
  assert 'exiting cleanly' in out
  assert 11 <= stopped < STEPS - 10, stopped  # Room for a periodic save after the resumption.
  assert fw.logged_steps(workdir) == list(range(1, stopped + 1))

  # 2. Resumed, then SIGKILL while the first periodic checkpoint after the next one is written (its files in
  # orbax's tmp dir, not yet renamed).
  killed_at = (stopped // 10 + 2) * 10
  proc = fw.kill_while_saving(spec, killed_at, devices=DEVICES, log_path=tmp_path / 'resumed.log', env=env)
  assert proc.returncode == -signal.SIGKILL
  resumed = fw.output(proc)
  assert f'Resuming from the checkpoint at step {stopped}' in resumed
  ckpt_dir = workdir / 'checkpoints'
  assert f'{killed_at}.orbax-checkpoint-tmp' in os.listdir(ckpt_dir)
  assert os.listdir(ckpt_dir / f'{killed_at}.orbax-checkpoint-tmp')  # Half a checkpoint: files, no rename.
  assert load_checkpoint(workdir)[1] == killed_at - 10

  # 3. Restarted: from the last finished checkpoint, the unfinished save removed, to the end.
  rc, restarted = _run(spec, tmp_path / 'restarted.log', env)
  assert rc == 0, restarted[-3000:]
  assert f'Resuming from the checkpoint at step {killed_at - 10}' in restarted
  # Every program the first run cached and the restarted run needs (all but the initialiser: it restores) was
  # loaded, not compiled.
  hits = re.findall(r"Persistent compilation cache hit for '(\S+)'", restarted)
  needed = {re.sub(r'-[0-9a-f]+-cache$', '', n) for n in entries} - {'jit_initial_state'}
  assert 'jit_train_step' in needed and needed <= set(hits), (hits, entries)
  seconds = [sum(float(s) for _, s in COMPILE_LINE.findall(text)) for text in (first, restarted)]
  print(f'compile seconds: first run {seconds[0]:.1f}, restarted run (warm cache) {seconds[1]:.1f}; '
        f'{len(entries)} cache entries')
  assert seconds[1] < seconds[0]
  assert sorted(os.listdir(ckpt_dir)) == [str(STEPS - 10), str(STEPS)]  # keep_checkpoints=2.
  # Each step logged once up to the pre-emption; the killed run logged on past its last finished checkpoint, and
  # the restart logged those steps again.
  logged = fw.logged_steps(workdir)
  restart = len(logged) - (STEPS - (killed_at - 10))  # Where the restart's records begin.
  killed_run = logged[stopped:restart]
  assert logged[:stopped] == list(range(1, stopped + 1))
  assert killed_run == list(range(stopped + 1, stopped + 1 + len(killed_run))) and killed_run[-1] >= killed_at
  assert logged[restart:] == list(range(killed_at - 9, STEPS + 1))

  _assert_same_final_state(tmp_path / 'straight', workdir, STEPS,
                           f'SIGTERM at step {stopped}, SIGKILL in the save of step {killed_at}, restarted')


# ---------------------------------------------------------------------------
# A budgeted run with copy-paste: SIGTERM and SIGKILL after the schedule was chosen; the resumed runs continue
# the chosen schedule (WORKDIR/config.json) and end as a run told that length from the start ends.
# ---------------------------------------------------------------------------


def _chosen_steps(workdir):
  try:
    with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
      steps = json.load(f)['num_train_steps']
  except (OSError, ValueError, KeyError):
    return None
  return steps if isinstance(steps, int) else None


@pytest.mark.slow  # About 2 minutes: CI's slow leg runs it.
def test_a_budgeted_copy_paste_run_resumes_its_chosen_schedule_exactly(shapes_data_dir, tmp_path):
  budget = {'num_train_steps': 'auto', 'time_budget': '40s', 'optimizer.warmup_steps': 40,
            'input.copy_paste_prob': 0.5, 'input.rotate_degrees': 10.0, 'input.scale_range': (0.75, 1.25)}
  overrides = dict(RESUME_CONFIG, eval_every_steps=100, **budget)
  workdir = tmp_path / 'interrupted'
  spec = {'data_dir': shapes_data_dir, 'workdir': str(workdir), 'overrides': overrides}

  # 1. SIGTERM once the schedule is chosen, past the measuring (steps 11-40, the warm-up: time_budget.measure_steps).
  out = _sigterm_when(spec, lambda: _chosen_steps(workdir) and len(fw.logged_steps(workdir)) >= 41,
                      'the chosen schedule and step 41', tmp_path / 'interrupted.log')
  steps = _chosen_steps(workdir)
  assert re.search(rf'Time budget 40s: num_train_steps={steps}: .* s a step', out), out[-3000:]
  _, stopped = load_checkpoint(workdir)
  assert 41 <= stopped < steps - 20, (stopped, steps)  # Room for a periodic save after the resumption.

  # 2. Resumed (no new measuring: the chosen length), then SIGKILL inside the second periodic save after it.
  killed_at = (stopped // 10 + 2) * 10
  proc = fw.kill_while_saving(spec, killed_at, devices=DEVICES, log_path=tmp_path / 'resumed.log')
  assert proc.returncode == -signal.SIGKILL
  resumed = fw.output(proc)
  assert f'Resuming from the checkpoint at step {stopped}' in resumed
  assert f'continuing the schedule chosen when this run started: num_train_steps={steps}' in resumed
  assert 'Time budget 40s: num_train_steps' not in resumed

  # 3. Restarted to the end.
  rc, restarted = _run(spec, tmp_path / 'restarted.log')
  assert rc == 0, restarted[-3000:]
  assert f'Resuming from the checkpoint at step {killed_at - 10}' in restarted
  assert _chosen_steps(workdir) == steps

  # The same run told num_train_steps from the start (its measuring steps lie in the 40-step warm-up).
  straight = dict(spec, workdir=str(tmp_path / 'straight'),
                  overrides=dict(overrides, num_train_steps=steps, time_budget=''))
  rc, first = _run(straight, tmp_path / 'straight.log')
  assert rc == 0, first[-3000:]
  _assert_same_final_state(tmp_path / 'straight', workdir, steps,
                           f'budgeted run of {steps} steps, SIGTERM at {stopped}, SIGKILL in the save of {killed_at}, '
                           'restarted')


# ---------------------------------------------------------------------------
# A corrupted newest checkpoint.
# ---------------------------------------------------------------------------


def _corrupt(step_dir, how):
  data = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(step_dir, 'default')) for f in files
          if os.sep + 'd' + os.sep in os.path.join(d, f)]
  biggest = max(data, key=os.path.getsize)
  size = os.path.getsize(biggest)
  if how == 'truncated':  # A copy or a disk that stopped half-way.
    with open(biggest, 'r+b') as f:
      f.truncate(size // 2)
  elif how == 'garbage':  # Bytes overwritten in the middle of the array data.
    with open(biggest, 'r+b') as f:
      f.seek(size // 4)
      f.write(np.random.default_rng(0).bytes(size // 2))
  elif how == 'metadata':  # The tree structure file cut short.
    with open(os.path.join(step_dir, 'default', '_METADATA'), 'w', encoding='utf-8') as f:
      f.write('{"tree_metadata": {')


@pytest.mark.parametrize('how', ['truncated', 'garbage', 'metadata'])
def test_corrupted_newest_checkpoint_warns_and_falls_back(tmp_path, how):
  def state(v):  # Random values: incompressible, so the array data is the biggest file.
    rng = np.random.default_rng(v)
    return {'params': {'kernel': rng.normal(size=(64, 256)).astype(np.float32), 'bias': np.full((7,), v, np.float32)},
            'step': np.array(v, np.int32)}

  ckpts = checkpoint_lib.Checkpoints(str(tmp_path), keep=3)
  for s in (1, 2, 3):
    ckpts.save(s, state(s))
  ckpts.close()
  _corrupt(os.path.join(tmp_path, 'checkpoints', '3'), how)

  with jaxseg_log_records() as records:
    ckpts = checkpoint_lib.Checkpoints(str(tmp_path), keep=3)
    restored, step = ckpts.restore(state(0))
  messages = [r.getMessage() for r in records]
  assert step == 2
  assert max_abs_diff(restored, state(2)) == 0
  bad = os.path.join(tmp_path, 'checkpoints', '3')
  assert any(f'Checkpoint {bad} could not be restored' in m and 'trying the previous one' in m for m in messages), \
      messages
  # Set aside for inspection, out of the way of `keep` and of the next save of step 3.
  assert os.path.isdir(bad + '.unreadable')
  assert ckpts.all_steps() == [1, 2]
  ckpts.save(3, state(3))
  ckpts.wait()
  assert ckpts.restore(state(0))[1] == 3
  ckpts.close()


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
  ckpts = checkpoint_lib.Checkpoints(str(tmp_path), keep=2)
  ckpts.save(1, {'w': np.ones(3, np.float32)})
  ckpts.close()
  _corrupt(os.path.join(tmp_path, 'checkpoints', '1'), 'metadata')
  with pytest.raises(checkpoint_lib.CheckpointError, match='no checkpoint could be restored'):
    checkpoint_lib.Checkpoints(str(tmp_path)).restore({'w': np.zeros(3, np.float32)})
  assert os.path.isdir(os.path.join(tmp_path, 'checkpoints', '1'))  # Nothing renamed when nothing restored.


# ---------------------------------------------------------------------------
# A loss that turns NaN or infinite.
# ---------------------------------------------------------------------------


NAN_MARK = 7  # Pixel value of the injected batch: an image made only of it gives a NaN loss.


def _nan_at(step: int, monkeypatch) -> None:
  """The training batch of `step` (1-based) is made of NAN_MARK pixels, which normalise to NaN.

  The two replacements are undone after the test (monkeypatch).
  """
  make_train_dataset = pipeline.train_dataset

  def train_dataset(*args, start_step, **kwargs):
    ds = make_train_dataset(*args, start_step=start_step, **kwargs)

    def mark(index, batch):
      bad = tf.equal(index + start_step, step - 1)
      image = tf.where(bad, tf.fill(tf.shape(batch['image']), tf.constant(NAN_MARK, tf.uint8)), batch['image'])
      return dict(batch, image=image)

    return ds.enumerate().map(mark)

  normalize = train.normalize_images

  def normalize_images(images, dtype, *input_stats):
    poisoned = jnp.all(images == NAN_MARK)
    return jnp.where(poisoned, jnp.nan, normalize(images, dtype, *input_stats)).astype(dtype)

  monkeypatch.setattr(pipeline, 'train_dataset', train_dataset)
  monkeypatch.setattr(train, 'normalize_images', normalize_images)


def test_nonfinite_loss_stops_with_a_message_naming_the_step(shapes_data_dir, tmp_path, monkeypatch, capsys):
  """Through run.py's entry point (cli.run, in this process): 'jaxseg: error: ...' and exit status 2."""
  _nan_at(15, monkeypatch)
  workdir = tmp_path / 'wd'
  with pytest.raises(SystemExit) as exit_info:
    cli.run('train', tiny_unet_config(shapes_data_dir, **CONFIG), str(workdir))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert 'jaxseg: error: The loss or a gradient became NaN or infinite at step 15 ' in err
  assert 'parameters are from step 14' in err
  assert fw.logged_steps(workdir) == list(range(1, 15))  # Stopped at the first log step after it.
  assert load_checkpoint(workdir)[1] == 10  # No checkpoint after the bad step.


def test_exploding_learning_rate_stops_at_the_first_nonfinite_step(shapes_data_dir, tmp_path):
  """No injection: learning_rate=1e30 makes the weights huge after the first non-zero update."""
  config = tiny_unet_config(shapes_data_dir, **CONFIG, **{'optimizer.learning_rate': 1e30})
  # Warm-up: step 1 has learning rate 0, step 2 the first huge update, step 3 the first non-finite loss.
  with pytest.raises(train.NonFiniteLossError, match='^The loss or a gradient became NaN or infinite at step 3 '):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))


def test_nonfinite_loss_skip_drops_that_update_and_trains_on(shapes_data_dir, tmp_path, monkeypatch):
  _nan_at(15, monkeypatch)
  workdir = tmp_path / 'wd'
  with jaxseg_log_records() as records:
    train.train_and_evaluate(tiny_unet_config(shapes_data_dir, **CONFIG, on_nonfinite_loss='skip'), str(workdir))
  messages = [r.getMessage() for r in records]
  assert any('1 update(s) with a non-finite loss skipped so far (first at step 15)' in m for m in messages), messages
  state, step = load_checkpoint(workdir)
  assert step == STEPS
  assert int(state['skipped_updates']) == 1 and int(state['first_nonfinite_step']) == 14
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state['params']))
  losses = [json.loads(l)['loss'] for l in open(workdir / 'metrics.jsonl') if '"train"' in l]
  assert len(losses) == STEPS
  assert losses[14] is None  # Step 15's loss (NaN) is written as null ...
  assert all(np.isfinite(l) for l in losses[:14] + losses[15:])  # ... and training went on.


# ---------------------------------------------------------------------------
# A workdir that cannot be written.
# ---------------------------------------------------------------------------


def test_unwritable_workdir_is_a_clear_error_before_training(shapes_data_dir, tmp_path, capsys):
  """Through run.py's entry point (cli.run, in this process): 'jaxseg: error: ...', exit status 2, nothing started."""
  # Tests run as root, for whom permissions stop nothing: use places no one can create a directory.
  (tmp_path / 'a_file').write_text('not a directory')
  workdir = tmp_path / 'a_file' / 'wd'
  with jaxseg_log_records() as records, pytest.raises(SystemExit) as exit_info:
    cli.run('train', tiny_unet_config(shapes_data_dir), str(workdir))
  assert exit_info.value.code == 2
  assert f'jaxseg: error: the workdir {workdir} cannot be written: Not a directory' in capsys.readouterr().err
  assert not [r.getMessage() for r in records if r.getMessage().startswith(('Devices:', 'step '))]  # Not started.


def test_a_workdir_under_proc_cannot_be_written():
  """Another OS error (no directories under /proc), the same message (cli.run's handling: the test above)."""
  with pytest.raises(ConfigError, match='^the workdir /proc/jaxseg_workdir cannot be written: '):
    startup.open_run(default.get_config(), '/proc/jaxseg_workdir', mode='train')


# ---------------------------------------------------------------------------
# Memory over a long run.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_memory_does_not_grow_after_warmup(shapes_data_dir, tmp_path):
  """benchmarks/bench_memory.py, shortened: after warm-up the RSS slope stays far below a leak's.

  Warm-up covers the first epoch (2000 examples / batch 8 = 250 steps: tf.data's cache fills). The
  only evaluation is the final one, after the last sample: an evaluation allocates tens of MiB in a
  burst (the allocator keeps some), which would swamp a 400-step slope; the benchmark's long runs
  cover evaluations.
  """
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, 'benchmarks/bench_memory.py', '--steps=700', '--sample_every=10',
                         '--warmup=300', '--eval_every=100000', '--checkpoint_every=50',
                         f'--data_dir={shapes_data_dir}', f'--workdir={tmp_path / "wd"}'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('MEMORY ')][-1]
  result = json.loads(line[len('MEMORY '):])
  print({k: v for k, v in result.items() if k != 'samples'})
  assert result['steady_samples'] >= 35
  # Generous (seen: about 15 on a busy 2-core machine): it catches leaks above ~50 KiB per step, such
  # as keeping every step's train state (60 KiB here); smaller ones need the benchmark's long run.
  assert result['slope_mib_per_1000_steps'] < 50, result['samples']
