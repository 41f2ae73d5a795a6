"""Frontier techniques (docs/frontier.md) change the model, never the ledger or ε."""

import json
import os

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from adpfl_jax import checkpointing
from adpfl_jax import models
from adpfl_jax import train
from adpfl_jax.federated import server
from adpfl_jax.privacy import accounting


def _ledger(workdir):
  with open(os.path.join(workdir, 'ledger.json')) as f:
    return json.load(f)


def test_techniques_keep_ledger_and_epsilon(tiny_data, tmp_path, tiny_config):
  base = {'eval.surface_metrics': False, 'eval.tensorboard': False, 'checkpoint.every_rounds': 0}
  # A "public" model: parameters of another init (the real pipeline trains it on a disjoint
  # phantom federation, experiments/pretrain.py), written as an orbax checkpoint.
  cfg0 = tiny_config(**base)
  model = models.get_model(cfg0.model, tiny_data.example_shape, tiny_data.num_classes)
  public = jax.tree_util.tree_map(lambda a: a * 0.5, model.init(jax.random.key(123)))
  ckpt = checkpointing.save_params(str(tmp_path / 'public'), public)
  # The plain run's planned ledgers (what its run records, step for step, when nothing stops it).
  plain = train.Trainer(cfg0, str(tmp_path / 'plain'), data=tiny_data)
  planned = [plain.plan.silos[k].runs(plain.plan.noise_scale[k])
             for k in range(tiny_data.num_clients)]
  cfg = tiny_config(**base, **{
      'privacy.augment_multiplicity': 2, 'fed.param_averaging': 'ema',
      'fed.server_optimizer': 'fedadam', 'fed.server_lr': 0.01, 'model.init_checkpoint': ckpt})
  t = train.Trainer(cfg, str(tmp_path / 'all'), data=tiny_data)
  np.testing.assert_array_equal(ravel_pytree(t.initial_state.params)[0],
                                ravel_pytree(public)[0])  # the public init was loaded
  np.testing.assert_array_equal(t.plan.noise_scale, plain.plan.noise_scale)
  s = t.run()
  assert s['stopped_reason'] == 'completed'
  got = [accounting.Ledger.from_dict(d) for d in _ledger(t.workdir)]
  assert [g.runs for g in got] == [tuple(r) for r in planned]
  want_eps = [accounting.Ledger(cfg0.privacy.accountant).epsilon_if(r, cfg0.privacy.delta)
              for r in planned]
  np.testing.assert_allclose(s['epsilon_per_client'], want_eps, rtol=1e-9)
  assert s['epsilon'] <= cfg.privacy.target_epsilon
  # EMA on: the published model is the average, not the last global model.
  state = t.final_state
  assert not np.allclose(ravel_pytree(server.released_params(state))[0],
                         ravel_pytree(state.params)[0])
