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
  lines = [r.getMessage() for r in records if r.getMessage().startswith('Time budget 30s')]
  assert len(lines) == 1 and f'num_train_steps={steps}:' in lines[0] and 's a step' in lines[0], lines
  _, last = load_checkpoint(tmp_path)
  assert last == steps
  assert sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())[-1] == steps
