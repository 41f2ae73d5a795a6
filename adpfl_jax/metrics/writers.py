"""Metric writers: JSON lines and TensorBoard event files, only from the process owning the run."""

from __future__ import annotations

import math
import os

import jax


class TensorBoardWriter:
  """Scalars of every evaluation row to ``<workdir>/tensorboard`` (tensorboardX event files)."""

  def __init__(self, workdir: str, purge_step: int | None = None, names=None):
    """``purge_step``: a resumed run drops the events it logged at or after this step before it
    was interrupted (they are logged again), so curves never hold two copies of a round.
    ``names``: the silos' names, used as tags of per-silo values (``epsilon_per_client/site_0``)."""
    self._names = list(names) if names is not None else None
    self._writer = None
    if jax.process_index() != 0:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._writer = SummaryWriter(logdir=os.path.join(workdir, 'tensorboard'),
                                 purge_step=purge_step)

  def write(self, row: dict) -> None:
    if self._writer is None:
      return
    step = int(row['round'])
    for key, value in row.items():
      if key == 'round':
        continue
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value):
          self._writer.add_scalar(key, value, step)
      elif isinstance(value, dict):
        for sub, v in value.items():
          if isinstance(v, (int, float)) and math.isfinite(v):
            self._writer.add_scalar(f'{key}/{sub}', v, step)
      elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        tags = self._names if self._names and len(self._names) == len(value) else range(len(value))
        for tag, v in zip(tags, value):
          if math.isfinite(v):
            self._writer.add_scalar(f'{key}/{tag}', v, step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
