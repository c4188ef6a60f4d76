"""Runs a tiny training job in a fresh process, optionally with a fault injected.

  XLA_FLAGS=--xla_force_host_platform_device_count=N python tests/fault_worker.py '<json spec>'

Spec keys:
  data_dir: a tfds data dir holding jaxseg_shapes; workdir: the run's workdir.
  overrides: config overrides ({"num_train_steps": 6, "optimizer.learning_rate": 0.1}).
  hang_in_save_at: the checkpoint of this step hangs after its files are written, before orbax
    renames its tmp dir (prints 'HANGING IN SAVE <step>' first): a parent can SIGKILL it there.

The training job runs through `jaxseg.cli.run('train', config, workdir)`, run.py's own entry point: jaxseg's user
errors (and a non-finite loss) print 'jaxseg: error: ...' to stderr and exit with status 2 there. Prints
'RESULT <json>' (mean_iou, confusion_matrix of the result cli.run returns, pid) at the end.
Used by tests/test_faults.py and test_multihost.py, which start it with `launch` or `run` below.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from tests.helpers import make_deprecations_errors, xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

make_deprecations_errors()


def hang_in_save(step: int) -> None:
  """The save of `step` writes all its files into the tmp dir, then never renames it."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self.get_final().name == str(step):
      print(f'HANGING IN SAVE {step} {self.get()}', flush=True)
      while True:
        time.sleep(1)
    return await original(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


# ---------------------------------------------------------------------------
# The parent side: starting workers, watching them, cleaning up.
# ---------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """A TCP port nobody listens on right now (the coordinator's)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(spec: dict, *, devices: int, log_path, env: dict = None) -> subprocess.Popen:
  """Starts a worker with `devices` simulated CPU devices (`env`: variables set; None unsets one); stdout and
  stderr go to `log_path`.

  The worker gets its own process group, so `stop` can end it and anything it started.
  """
  full_env = dict(os.environ)
  full_env['XLA_FLAGS'] = xla_flags(devices)
  full_env['JAX_PLATFORMS'] = 'cpu'
  full_env.update(env or {})
  full_env = {k: v for k, v in full_env.items() if v is not None}  # None unsets a variable.
  log_file = open(log_path, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(spec)], cwd=ROOT, env=full_env,
                          stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
  proc.log_path = str(log_path)
  log_file.close()  # The child holds its own copy.
  return proc


def run(spec: dict, *, devices: int, log_path, env: dict = None, timeout: float = 400) -> tuple:
  """Runs one worker to the end: (exit status, its output)."""
  proc = launch(spec, devices=devices, log_path=log_path, env=env)
  try:
    wait_all([proc], timeout=timeout)
  finally:
    stop([proc])
  return proc.returncode, output(proc)


def launch_multiprocess(spec: dict, *, processes: int, devices_per_process: int, log_dir, env: dict = None,
                        ) -> list:
  """Starts `processes` workers that form one JAX program (coordinator on a free localhost port)."""
  port = free_port()
  procs = []
  for i in range(processes):
    proc_env = {'JAXSEG_COORDINATOR': f'localhost:{port}', 'JAXSEG_NUM_PROCESSES': str(processes),
                'JAXSEG_PROCESS_ID': str(i)}
    proc_env.update(env or {})
    procs.append(launch(spec, devices=devices_per_process, log_path=os.path.join(str(log_dir), f'process_{i}.log'),
                        env=proc_env))
  return procs


def output(proc) -> str:
  with open(proc.log_path, encoding='utf-8', errors='replace') as f:
    return f.read()


def stop(procs) -> None:
  """Kills every worker of `procs` still running (its whole process group), then reaps it."""
  for proc in procs:
    if proc.poll() is None:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      pass


def wait_all(procs, timeout: float) -> list:
  """Waits for every worker to exit; kills them all and fails if that takes longer than `timeout` s."""
  deadline = time.monotonic() + timeout
  try:
    for proc in procs:
      proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
  except subprocess.TimeoutExpired:
    stop(procs)
    raise AssertionError(f'workers still running after {timeout:.0f} s; logs:\n' + '\n'.join(
        f'--- {p.log_path}\n{output(p)[-3000:]}' for p in procs)) from None
  return [proc.returncode for proc in procs]


def kill_while_saving(spec: dict, step: int, *, devices: int, log_path, env: dict = None) -> subprocess.Popen:
  """Runs a worker until the save of `step` has written its files into orbax's tmp dir, then SIGKILLs it there."""
  proc = launch(dict(spec, hang_in_save_at=step), devices=devices, log_path=log_path, env=env)
  try:
    wait_until(lambda: f'HANGING IN SAVE {step}' in output(proc), [proc], timeout=400, what=f'the save of step {step}')
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    stop([proc])
  return proc


def wait_until(predicate, procs, timeout: float, what: str) -> None:
  """Polls `predicate` until true; fails (killing the workers) on timeout or if a worker exits first."""
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
      stop(procs)
      raise AssertionError(f'gave up waiting for {what}; logs:\n' + '\n'.join(
          f'--- {p.log_path} (exit {p.returncode})\n{output(p)[-3000:]}' for p in procs))
    time.sleep(0.05)


def result_of(proc) -> dict:
  """The worker's RESULT line, parsed."""
  lines = [l for l in output(proc).splitlines() if l.startswith('RESULT ')]
  assert lines, f'no RESULT line in {proc.log_path}:\n{output(proc)[-3000:]}'
  return json.loads(lines[-1][len('RESULT '):])


def logged_steps(workdir, split: str = 'train') -> list:
  """Steps of WORKDIR/metrics.jsonl's records of `split`, in file order (partial last line ignored)."""
  path = os.path.join(str(workdir), 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  steps = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record.get('split') == split:
        steps.append(record['step'])
  return steps


# ---------------------------------------------------------------------------
# The worker side.
# ---------------------------------------------------------------------------


def main():
  spec = json.loads(sys.argv[1])
  from jaxseg import cli  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_unet_config  # pylint: disable=g-import-not-at-top
  unknown = set(spec) - {'data_dir', 'workdir', 'overrides', 'hang_in_save_at'}
  assert not unknown, f'unknown spec keys {sorted(unknown)}'
  if spec.get('hang_in_save_at') is not None:
    hang_in_save(int(spec['hang_in_save_at']))
  config = tiny_unet_config(spec['data_dir'], **spec.get('overrides', {}))
  # What run.py runs: device set-up, training, and its handling of user errors (exit status 2).
  result = cli.run('train', config, spec['workdir'])
  print('RESULT ' + json.dumps({'mean_iou': result.get('mean_iou'), 'pid': os.getpid(),
                                'confusion_matrix': result.get('confusion_matrix')}), flush=True)


if __name__ == '__main__':
  main()
