"""The persistent XLA compilation cache (config.compilation_cache_dir): its set-up rules. (A resumed process loading
its programs from the cache: tests/test_faults.py, the SIGTERM and kill -9 chain.)"""

import logging
import os

import jax
import ml_collections
import pytest

from configs import default
from jaxseg import compilation_cache
from jaxseg import settings
from jaxseg.errors import ConfigError
from tests.helpers import jaxseg_log_records


@pytest.fixture
def pristine(monkeypatch):
  """No cache directory set (as in a fresh process without JAX_COMPILATION_CACHE_DIR); restored afterwards.

  Yields the jaxseg log records. Nothing compiles in these tests, so JAX's own cache object is untouched.
  """
  saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  monkeypatch.delenv(compilation_cache.ENV_DIR, raising=False)
  monkeypatch.delenv(compilation_cache.ENV_MIN_COMPILE_TIME, raising=False)
  monkeypatch.setattr(compilation_cache, '_active', {'dir': None})
  monkeypatch.setattr(compilation_cache, '_failed', set())
  jax.config.update('jax_compilation_cache_dir', None)
  try:
    with jaxseg_log_records() as records:
      yield records
  finally:
    jax.config.update('jax_compilation_cache_dir', saved[0])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', saved[1])


def test_default_is_under_the_home_cache_and_empty_disables(pristine, tmp_path, monkeypatch):
  config = default.get_config()
  assert config.compilation_cache_dir == '~/.cache/jaxseg/xla'
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert compilation_cache.resolve_dir(config.compilation_cache_dir) == str(tmp_path / 'home' / '.cache/jaxseg/xla')
  assert compilation_cache.enable('') is None
  assert jax.config.jax_compilation_cache_dir is None
  assert not pristine


def test_enable_expands_the_path_and_is_idempotent(pristine, tmp_path, monkeypatch):
  monkeypatch.setenv('JAXSEG_TEST_CACHE_ROOT', str(tmp_path))
  path = compilation_cache.enable('$JAXSEG_TEST_CACHE_ROOT/xla')
  assert path == str(tmp_path / 'xla') and os.path.isdir(path)
  assert jax.config.jax_compilation_cache_dir == path
  assert jax.config.jax_persistent_cache_min_compile_time_secs == compilation_cache.MIN_COMPILE_TIME_SECS
  # Every entry point calls it: the second call changes nothing.
  assert compilation_cache.enable('$JAXSEG_TEST_CACHE_ROOT/xla') == path
  assert [r.getMessage() for r in pristine] == [
      f"XLA compilation cache: {path} (compiled programs are reused by later runs; "
      "config.compilation_cache_dir='' disables it)"]
  assert not os.listdir(path)  # The write probe is gone.


def test_a_directory_the_user_set_is_kept(pristine, tmp_path):
  jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'theirs'))  # What JAX_COMPILATION_CACHE_DIR does.
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  assert compilation_cache.enable(str(tmp_path / 'ours')) == str(tmp_path / 'theirs')
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'theirs')
  assert jax.config.jax_persistent_cache_min_compile_time_secs == before
  assert not (tmp_path / 'ours').exists()
  assert len(pristine) == 1 and 'not used' in pristine[0].getMessage()


@pytest.mark.parametrize('sub', ['a_file/xla', '$JAXSEG_TEST_UNSET_VARIABLE/xla'])
def test_an_unusable_directory_is_a_warning_not_a_failure(pristine, tmp_path, sub, monkeypatch):
  monkeypatch.delenv('JAXSEG_TEST_UNSET_VARIABLE', raising=False)
  (tmp_path / 'a_file').write_text('not a directory')
  assert compilation_cache.enable(str(tmp_path / sub)) is None
  assert compilation_cache.enable(str(tmp_path / sub)) is None
  assert jax.config.jax_compilation_cache_dir is None
  assert [r.levelno for r in pristine] == [logging.WARNING]  # Once, naming the directory.
  assert str(tmp_path / sub) in pristine[0].getMessage()


def test_a_value_that_is_not_a_path_is_a_config_error():
  for value in ('', '/tmp/x'):
    config = default.get_config()
    config.compilation_cache_dir = value
    assert settings.from_config(config).compilation_cache_dir == value  # What the entry points pass to enable.
  values = default.get_config().to_dict()
  values['compilation_cache_dir'] = 5  # E.g. from a hand-edited config.json (command-line overrides are type-checked).
  with pytest.raises(ConfigError, match=r'config\.compilation_cache_dir must be a directory path .* got 5'):
    settings.from_config(ml_collections.ConfigDict(values))
