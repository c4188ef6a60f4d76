"""config.time_budget with num_train_steps='auto': the duration format, the plan's arithmetic (against sums done by
hand and by brute force), and a budgeted run end to end."""

import json
import os
import time

import pytest

from configs import default
from jaxseg import settings as settings_lib
from jaxseg import time_budget
from jaxseg import train
from jaxseg.errors import ConfigError
from tests.conftest import tiny_unet_config
from tests.helpers import jaxseg_log_records, load_checkpoint


@pytest.mark.parametrize('value, seconds', [('20m', 1200), ('1h30m', 5400), ('90s', 90), ('1.5h', 5400),
                                            ('600', 600), (600, 600), (' 2m 30s', 150), ('', None), (None, None)])
def test_durations(value, seconds):
  assert settings_lib.parse_duration(value) == seconds


@pytest.mark.parametrize('value', ['abc', '0m', '-5m', 'm', '20x', True, '1m1h', '20 min'])
def test_bad_durations_name_the_field(value):
  with pytest.raises(ConfigError, match=r'config\.time_budget must be a duration'):
    settings_lib.parse_duration(value)


def _config(**fields):
  config = default.get_config()
  with config.ignore_type():
    for key, value in fields.items():
      config[key] = value
  return config


def test_auto_needs_a_budget_and_a_number_on_the_command_line_reads_as_one():
  with pytest.raises(ConfigError, match=r"num_train_steps='auto' sizes the schedule to config.time_budget"):
    settings_lib.from_config(_config(num_train_steps='auto'))
  with pytest.raises(ConfigError, match=r"num_train_steps must be a positive integer or 'auto'"):
    settings_lib.from_config(_config(num_train_steps='many', time_budget='5m'))
  settings = settings_lib.from_config(_config(num_train_steps='auto', time_budget='5m'))
  assert (settings.num_train_steps, settings.time_budget_s) == ('auto', 300.0)
  # A config that set 'auto' (a str field) overridden with --config.num_train_steps=5000.
  assert settings_lib.from_config(_config(num_train_steps='5000', time_budget='5m')).num_train_steps == 5000


@pytest.mark.parametrize('start, warmup, eval_every, checkpoint_every, expected', [
    (0, 100, 500, 500, (11, 100)),     # The recipes: steps 11..100 timed, the whole warm-up after the compile's.
    (0, 40, 200, 200, (11, 40)),       # A shorter warm-up ends the window,
    (0, 100, 50, 500, (11, 50)),       # as does the first evaluation (its time would count as a step's),
    (0, 100, 500, 60, (11, 60)),       # or checkpoint.
    (0, 0, 500, 500, (11, 31)),        # No warm-up: 20 steps, the minimum.
    (0, 1000, 5000, 5000, (11, 111)),  # A long warm-up: at most 100 timed.
    (240, 100, 500, 500, (251, 271)),  # Resumed before the choice, past the warm-up: the minimum again.
])
def test_measuring_window_by_hand(start, warmup, eval_every, checkpoint_every, expected):
  assert time_budget.measure_steps(start, warmup_steps=warmup, eval_every=eval_every,
                                   checkpoint_every=checkpoint_every) == expected


M = time_budget.Measurement(elapsed_s=100.0, step_s=0.5, compile_s=5.0, eval_s=10.0, checkpoint_s=2.0)


def test_cost_counts_evaluations_and_checkpoints_by_hand():
  # From step 31 to 1000, evaluations every 200 (200, 400, 600, 800, 1000), checkpoints every 500 (500, 1000) and at
  # every evaluation: saves at 200, 400, 500, 600, 800, 1000.
  cost = time_budget.cost_s(1000, 31, M, eval_every=200, checkpoint_every=500)
  assert cost == pytest.approx(969 * 0.5 + 5 * 10.0 + 6 * 2.0)
  # A last step off the interval adds its own evaluation and save: 1010 -> also at 1010.
  cost = time_budget.cost_s(1010, 31, M, eval_every=200, checkpoint_every=500)
  assert cost == pytest.approx(979 * 0.5 + 6 * 10.0 + 7 * 2.0)


def test_plan_is_the_longest_schedule_that_fits():
  # Available: 1000 * 0.95 - 100 elapsed - 5 re-compile = 845 s. 1625 steps: 1594 * 0.5 = 797 s, evaluations at
  # 500, 1000, 1500, 1625 (40 s) and as many saves (8 s): 845 s, fits; 1626 steps: 845.5 s, does not.
  plan = time_budget.plan(1000.0, 31, M, eval_every=500, checkpoint_every=500, warmup_steps=100)
  assert plan.num_train_steps == 1625
  brute = max(n for n in range(31, 3000)
              if time_budget.cost_s(n, 31, M, eval_every=500, checkpoint_every=500) <= 1000 * 0.95 - 105)
  assert brute == 1625
  assert '0.5 s a step' in plan.reason and '1625 steps with 4 evaluations' in plan.reason


def test_a_spent_budget_ends_the_run_and_a_short_one_says_so():
  plan = time_budget.plan(100.0, 31, M, eval_every=500, checkpoint_every=500, warmup_steps=100)
  assert plan.num_train_steps == 31 and 'the budget is spent' in plan.reason
  # 150 * 0.95 - 105 = 37.5 s: the final evaluation and save (12 s) and 51 steps (25.5 s): step 82, in the warm-up.
  plan = time_budget.plan(150.0, 31, M, eval_every=500, checkpoint_every=500, warmup_steps=100)
  assert plan.num_train_steps == 82 and 'warm-up' in plan.reason


def test_process_start_is_before_this_test_and_after_the_interpreter_started():
  started = time_budget.process_start_time()
  assert started <= time.time()
  # The interpreter's own modules were imported after it started: the oldest .pyc read is no older than that.
  assert time.time() - started < 24 * 3600


def test_a_budgeted_run_chooses_logs_saves_and_trains_its_length(shapes_data_dir, tmp_path):
  """config.json holds the chosen length, the log its reason, and the run trains exactly that many steps. (That the
  weights equal those of a run told the length from the start, and that a resumed run continues it, is
  tests/test_faults.py's budgeted test, in the slow set.)"""
  fields = {'num_train_steps': 'auto', 'time_budget': '30s', 'optimizer.warmup_steps': 40, 'eval_every_steps': 200,
            'checkpoint_every_steps': 200, 'log_every_steps': 10}
  with jaxseg_log_records() as records:
    train.train_and_evaluate(tiny_unet_config(shapes_data_dir, **fields), str(tmp_path))
  chosen = json.load(open(tmp_path / 'config.json', encoding='utf-8'))
  steps = chosen['num_train_steps']
  assert isinstance(steps, int) and steps > 31 and chosen['time_budget'] == '30s'
  lines = [r.getMessage() for r in records if r.getMessage().startswith('Time budget 30s: num_train_steps')]
  assert len(lines) == 1 and f'num_train_steps={steps}:' in lines[0] and 's a step' in lines[0], lines
  _, last = load_checkpoint(tmp_path)
  assert sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())[-1] == last
  # The whole schedule, unless this (shared, loaded) machine slowed down after measuring and the run said it stopped.
  stops = [r.getMessage() for r in records if 'stopping at step' in r.getMessage()]
  assert last == steps and not stops or stops and f'stopping at step {last} of {steps}' in stops[0], (last, stops)


def test_out_of_time_by_hand():
  m = time_budget.Measurement(elapsed_s=0.0, step_s=0.5, compile_s=5.0, eval_s=10.0, checkpoint_s=2.0)
  kwargs = dict(check_every=50, eval_every=200, checkpoint_every=200)
  # The limit: 600 s less half the 5% reserve, 585 s. At step 100 of 1000, 1 s a step lately: the next check is
  # step 150, reached in 50 s, plus a final evaluation and checkpoint there (12 s): 62 s from now.
  assert not time_budget.out_of_time(522.9, 600.0, 100, 1000, m, recent_step_s=1.0, **kwargs)
  assert time_budget.out_of_time(523.1, 600.0, 100, 1000, m, recent_step_s=1.0, **kwargs)
  # At step 150: step 200's evaluation and checkpoint are periodic, and end the run there just the same: 50 + 12.
  assert not time_budget.out_of_time(522.9, 600.0, 150, 1000, m, recent_step_s=1.0, **kwargs)
  assert time_budget.out_of_time(523.1, 600.0, 150, 1000, m, recent_step_s=1.0, **kwargs)
  # 20 steps before the end: only those remain (20 s + 12 s).
  assert not time_budget.out_of_time(552.9, 600.0, 980, 1000, m, recent_step_s=1.0, **kwargs)
  assert time_budget.out_of_time(553.1, 600.0, 980, 1000, m, recent_step_s=1.0, **kwargs)


def test_a_run_that_slows_down_after_its_plan_still_ends_within_its_budget(shapes_data_dir, tmp_path, monkeypatch):
  """A plan far too long (as if the machine slowed down 1000-fold after measuring): the run stops within its
  budget, at a logging step, with its final evaluation and checkpoint, and keeps the planned length for a rerun."""
  real_plan = time_budget.plan
  monkeypatch.setattr(time_budget, 'plan', lambda *a, **k: time_budget.Plan(10**6, real_plan(*a, **k).reason))
  fields = {'num_train_steps': 'auto', 'time_budget': '25s', 'optimizer.warmup_steps': 40, 'eval_every_steps': 200,
            'checkpoint_every_steps': 200, 'log_every_steps': 10}
  started = time.time()
  with jaxseg_log_records() as records:
    result = train.train_and_evaluate(tiny_unet_config(shapes_data_dir, **fields), str(tmp_path), start_time=started)
  elapsed = time.time() - started
  assert elapsed < 25 + 5, elapsed  # The final evaluation and checkpoint may take a little longer than measured.
  stops = [r.getMessage() for r in records if 'stopping at step' in r.getMessage()]
  _, last = load_checkpoint(tmp_path)
  assert len(stops) == 1 and f'Time budget 25s: stopping at step {last} of 1000000' in stops[0], stops
  assert last % 10 == 0 and last > 40
  assert 'mean_iou' in result  # The final evaluation ran.
  assert json.load(open(tmp_path / 'config.json', encoding='utf-8'))['num_train_steps'] == 10**6
