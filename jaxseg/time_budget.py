"""A schedule sized to a time budget: config.time_budget='20m' with config.num_train_steps='auto'.

A fresh run trains its first steps on the warm-up (which is the same whatever the schedule's length), measures
what a step, an evaluation and a checkpoint cost on this machine after compiling, and fixes num_train_steps to the
longest schedule whose steps, evaluations and checkpoints end within the budget (`plan`). The budget counts from the
start of the process (run.py) or of the train_and_evaluate call, so the data preparation and compilation count.

The chosen count is logged with its reason and saved in WORKDIR/config.json: a resumed run continues that schedule
(`chosen_on_resume`), on any machine, step for step as if it had never stopped. Only a run stopped before it had
chosen (in its first minute) measures again when resumed.
"""

import dataclasses
import logging
import math
import os
import time
from typing import Optional

from jaxseg.settings import AUTO, Settings

log = logging.getLogger('jaxseg')

UNTIMED_STEPS = 10  # After the compiling step: the input pipeline filled its buffers meanwhile (tf.data and device
                    # prefetch), so these steps would look faster than the steady state.
TIMED_STEPS = 20    # Then at least this many are timed,
MAX_TIMED_STEPS = 100  # and at most this many: up to the warm-up's end, or the first evaluation or checkpoint.
RESERVE = 0.05      # The part of the budget kept for noise: a step or evaluation slower than measured.


def measure_steps(start_step: int, *, warmup_steps: int, eval_every: int, checkpoint_every: int) -> tuple[int, int]:
  """(the step the timing starts from, the step at which a fresh run has measured enough to choose).

  The timing runs from UNTIMED_STEPS after the compiling step to the end of the warm-up (config.optimizer.
  warmup_steps; the recipes have 100), at least TIMED_STEPS and at most MAX_TIMED_STEPS steps, and stops before
  the first evaluation or checkpoint. A longer window averages out more of a shared machine's noise: a 2-core VM's
  50-step rates vary by +-15%, so 20 steps alone can miss the steady rate by more than the RESERVE. Within the
  warm-up (which does not depend on the length) these steps follow the learning rates of the final schedule exactly,
  so a budgeted run trains as a run given its chosen num_train_steps would.
  """
  timed_from = start_step + 1 + UNTIMED_STEPS
  next_event = min((start_step // every + 1) * every for every in (eval_every, checkpoint_every))
  end = min(warmup_steps, next_event, timed_from + MAX_TIMED_STEPS)
  return timed_from, max(end, timed_from + TIMED_STEPS)


@dataclasses.dataclass(frozen=True)
class Measurement:
  """What this machine showed in the first steps of the run (seconds)."""
  elapsed_s: float     # Since the budget's start, at the step the plan is made (start-up, compiles, the timings).
  step_s: float        # One training step, data included, after compiling.
  compile_s: float     # The first step's extra time: what re-compiling the step for the chosen schedule costs.
  eval_s: float        # One evaluation after compiling.
  checkpoint_s: float  # One checkpoint save, waited for.


@dataclasses.dataclass(frozen=True)
class Plan:
  num_train_steps: int
  reason: str


def _events(start: int, end: int, every: int) -> int:
  """How many of the steps start+1 .. end are multiples of `every`."""
  return end // every - start // every


def cost_s(num_train_steps: int, at_step: int, m: Measurement, *, eval_every: int, checkpoint_every: int) -> float:
  """Seconds from `at_step` to the end of a `num_train_steps` schedule: its steps, evaluations (every eval_every
  steps and at the end) and checkpoints (every checkpoint_every steps, at every evaluation and at the end)."""
  n = num_train_steps
  evals = _events(at_step, n, eval_every) + (n % eval_every != 0)
  both = _events(at_step, n, math.lcm(eval_every, checkpoint_every))
  saves = evals + _events(at_step, n, checkpoint_every) - both
  return (n - at_step) * m.step_s + evals * m.eval_s + saves * m.checkpoint_s


def plan(budget_s: float, at_step: int, m: Measurement, *, eval_every: int, checkpoint_every: int,
         warmup_steps: int) -> Plan:
  """The longest schedule that ends within `budget_s`: (budget x (1 - RESERVE)) - elapsed - one re-compile for
  the remaining steps, evaluations and checkpoints. At least `at_step` (the run ends now when nothing more fits)."""
  available = budget_s * (1 - RESERVE) - m.elapsed_s - m.compile_s
  fits = lambda n: cost_s(n, at_step, m, eval_every=eval_every, checkpoint_every=checkpoint_every) <= available
  low, high = at_step, at_step + max(int(available / m.step_s), 0) + 1  # fits(high) is False: steps alone overrun.
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if fits(mid) else (low, mid)
  n = low
  measured = (f'{m.step_s:.3g} s a step, {m.eval_s:.3g} s an evaluation, {m.checkpoint_s:.3g} s a checkpoint, '
              f'{m.compile_s:.3g} s to compile, {m.elapsed_s:.0f} s spent by step {at_step}')
  evals = n // eval_every + (n % eval_every != 0)
  reason = (f'{measured}: {n} steps with {evals} evaluation{"s" if evals != 1 else ""} end at about '
            f'{m.elapsed_s + m.compile_s + cost_s(n, at_step, m, eval_every=eval_every, checkpoint_every=checkpoint_every):.0f} s '
            f'of the {budget_s:.0f} s budget ({100 * RESERVE:g}% kept in reserve)')
  if n <= at_step:
    reason += '; the budget is spent: training ends here (give a longer config.time_budget)'
  elif n <= warmup_steps:
    reason += (f'; the schedule ends within its {warmup_steps}-step warm-up (give a longer config.time_budget or '
               'fewer config.optimizer.warmup_steps)')
  return Plan(n, reason)


def out_of_time(elapsed_s: float, budget_s: float, step: int, total: int, m: Measurement, *, recent_step_s: float,
                check_every: int, eval_every: int, checkpoint_every: int) -> bool:
  """Whether a budgeted run must end at `step`, before its schedule's `total`, to end within its budget: true when
  the steps to the next check (`check_every` on, at most `total`) at the recent step time, their evaluations and
  checkpoints, and a final evaluation and checkpoint would end past `budget_s` less half the RESERVE.

  A plan is only as good as the first steps' timing: a shared machine that slows down later (by a quarter, seen on
  2-core VMs) would overrun the budget. Stopping early ends the run on time, near the end of the cosine decay where
  the learning rate is small, with the final checkpoint from which the same command finishes the schedule.
  """
  ahead = min(step + check_every, total)
  recent = dataclasses.replace(m, step_s=max(recent_step_s, 0.0))
  # cost_s ends with an evaluation and a checkpoint at `ahead` (periodic or final): stopping there costs no more.
  # Half the reserve stays for what follows the final checkpoint (writing it out, the process's exit).
  ends_at = elapsed_s + cost_s(ahead, step, recent, eval_every=eval_every, checkpoint_every=checkpoint_every)
  return ends_at > budget_s * (1 - RESERVE / 2)


def chosen_on_resume(settings: Settings, previous: Optional[Settings], has_checkpoint: bool) -> Settings:
  """A resumed budgeted run continues the schedule chosen at its first start (WORKDIR/config.json), if one was."""
  if settings.num_train_steps != AUTO or not has_checkpoint or previous is None or previous.num_train_steps == AUTO:
    return settings
  log.info('Time budget: continuing the schedule chosen when this run started: num_train_steps=%d (%s).',
           previous.num_train_steps, 'WORKDIR/config.json')
  return dataclasses.replace(settings, num_train_steps=previous.num_train_steps)


def process_start_time() -> float:
  """When this process started (time.time() clock): Linux's /proc, else now."""
  try:
    with open('/proc/self/stat', encoding='ascii') as f:
      started_ticks = int(f.read().rsplit(')', 1)[1].split()[19])  # Field 22: start time, clock ticks after boot.
    with open('/proc/uptime', encoding='ascii') as f:
      uptime = float(f.read().split()[0])
    return time.time() - uptime + started_ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    return time.time()
