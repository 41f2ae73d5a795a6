r"""The paper's study: {HAM10000, KiTS23, BraTS 2024} × {NP-FL, DP-FL, ADP-FL}, same (ε, δ) per silo.

  adpfl train --config=experiments/paper/config.py:task=kits23,method=adpfl,seed=0 --workdir=W
  make paper-table            # every cell over 3 seeds → runs/paper/table.md (+ plots, overlays)
  make paper-table SMOKE=1    # minutes: tiny phantoms, few rounds, 1 seed

Each cell starts from the task's experiment (``experiments/<task>.py``: real readers, phantoms in
the real layout when ``data.dir`` is empty, ``DATA_DIR=...`` for real data) and sets the method:

* ``npfl``  — no clipping, no noise.
* ``dpfl``  — fixed clip C = 1, constant σ calibrated to the task's (ε, δ).
* ``adpfl`` — private adaptive clipping to a low quantile of the per-example norms (count noise
  folded into the same total σ), a public decaying σ schedule calibrated to the same (ε, δ).
"""

from adpfl_jax.configs import common
from adpfl_jax.configs import loading

TASKS = ('ham10000', 'kits23', 'brats2024')
METHODS = ('npfl', 'dpfl', 'adpfl')


def task_config(task: str, smoke: bool):
  return loading.load(f'{task}:smoke' if smoke else task)


def apply_method(c, method: str):
  if method not in METHODS:
    raise ValueError(f'method={method!r} is not one of {METHODS}')
  if method == 'npfl':
    c.privacy.mode = 'none'
  elif method == 'dpfl':
    c.privacy.clip_mode = 'fixed'
    c.privacy.clip_norm = 1.0
    c.privacy.noise_schedule = 'constant'
  else:
    c.privacy.clip_mode = 'quantile'
    c.privacy.quantile.target = 0.2
    c.privacy.quantile.lr = 0.5
    c.privacy.quantile.count_std_fraction = 0.5
    c.privacy.noise_schedule = 'linear'
    c.privacy.noise_schedule_params.start = 1.25
    c.privacy.noise_schedule_params.end = 0.8
  return c


def get_config(arg=None):
  args = common.parse_arg(arg, task='ham10000', method='adpfl', seed=0, smoke=False, data_dir='')
  if args.task not in TASKS:
    raise ValueError(f'task={args.task!r} is not one of {TASKS}')
  c = task_config(args.task, args.smoke)
  c.unlock()
  apply_method(c, args.method)
  c.seed = args.seed
  if args.data_dir:
    c.data.dir = args.data_dir
  c.log.progress = False
  c.lock()
  return c
