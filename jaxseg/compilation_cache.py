"""Persistent XLA compilation cache: programs compiled once are loaded by later runs, not compiled again.

Every entry point that compiles (train_and_evaluate, evaluate, predict and
jaxseg.api through load_predictor, export) calls `enable(settings.compilation_cache_dir)` first, so a
resumed run, --mode=eval or --mode=predict reuses what an earlier run with the
same model and shapes compiled. The directory is config.compilation_cache_dir
('' disables it); a JAX_COMPILATION_CACHE_DIR set in the environment (or a
jax_compilation_cache_dir set in code before) wins and is left as it is.

The cache is per process: the first directory enabled stays for the life of the
process. Multi-process runs: only process 0 writes entries (JAX's rule); every
process reads its own directory. A cache directory is trusted (JAX loads
executables from it), so keep it private, as ~/.cache is; it can be deleted at
any time.
"""

import logging
import os
import tempfile
from typing import Optional

import jax

log = logging.getLogger('jaxseg')

# Programs that compile faster than this are not written (JAX's default, 1 s, leaves out eval and
# inference programs of small models that still cost a restart seconds).
MIN_COMPILE_TIME_SECS = 0.5
ENV_DIR = 'JAX_COMPILATION_CACHE_DIR'
ENV_MIN_COMPILE_TIME = 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'

_active = {'dir': None}  # The directory enable() set or reported (calls after the first stay quiet).
_failed = set()  # Directories already warned about.


def resolve_dir(value) -> Optional[str]:
  """config.compilation_cache_dir -> an absolute path (~ and $VARS expanded), or None for ''/None (disabled)."""
  if not value:
    return None
  return os.path.abspath(os.path.expandvars(os.path.expanduser(str(value))))


def _writable(path: str) -> Optional[str]:
  """None when `path` can be created and written; the reason otherwise."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test_'):
      pass
  except OSError as e:
    return e.strerror or str(e)
  return None


def enable(cache_dir: Optional[str]) -> Optional[str]:
  """Points JAX's persistent compilation cache at `cache_dir` (config.compilation_cache_dir); returns the one in use.

  Never fails a run: a directory that cannot be created or written is logged
  as a warning and the run goes on without the cache. Calling it again (or
  from several entry points) changes nothing once a directory is in use.

  Returns:
    The cache directory JAX uses, or None when there is none.
  """
  if not jax.config.jax_enable_compilation_cache:
    return None  # Switched off for JAX as a whole (JAX_ENABLE_COMPILATION_CACHE=false).
  current = jax.config.jax_compilation_cache_dir
  if current:
    if current != _active['dir']:
      # Set by the user (JAX_COMPILATION_CACHE_DIR or jax.config.update): theirs, with their settings.
      source = ENV_DIR if os.environ.get(ENV_DIR) == current else 'jax_compilation_cache_dir'
      log.info('XLA compilation cache: %s (from %s; config.compilation_cache_dir is not used)', current, source)
      _active['dir'] = current
    return current

  path = resolve_dir(cache_dir)
  if path is None or path in _failed:
    return None
  if '$' in path:
    problem = 'it names an environment variable that is not set'
  else:
    problem = _writable(path)
  if problem:
    log.warning('No XLA compilation cache: config.compilation_cache_dir %s cannot be used (%s); compiling as '
                'usual.', path, problem)
    _failed.add(path)
    return None
  if ENV_MIN_COMPILE_TIME not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_TIME_SECS)
  jax.config.update('jax_compilation_cache_dir', path)
  _active['dir'] = path
  log.info('XLA compilation cache: %s (compiled programs are reused by later runs; '
           "config.compilation_cache_dir='' disables it)", path)
  return path
