"""Loading configs: ``FILE.py[:ARG]`` or a packaged name, plus ``key=value`` overrides.

Every entry point (``adpfl train``, ``adpfl data prepare --config``, the study runners, the
benchmarks, the Python API) loads configs here:

* ``load('experiments/kits23.py:smoke')`` runs the file's ``get_config('smoke')``;
* ``load('quickstart')`` (a name in ``PACKAGED``) loads ``adpfl_jax/configs/quickstart.py``, so an
  installed package (not only a clone) has its configs;
* ``overrides`` are ``'dotted.key=value'`` strings (or ``(key, value)`` pairs), each converted to
  the type of the key's current value. An unknown key is an error naming the full dotted key and
  the closest existing keys.

``describe`` prints a config with the meaning of each key, taken from the comments next to the keys
in ``configs/default.py``, ``configs/common.py`` and the config file itself.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import os
import re
from typing import Any, Iterable

import ml_collections

from adpfl_jax.configs import common
from adpfl_jax.configs import default

# Configs that ship with the package: ``--config=quickstart`` works without a clone.
PACKAGED = ('quickstart', 'ham10000', 'kits23', 'brats2024')


class ConfigLoadError(ValueError):
  """A config file, argument or override is invalid; the message names it."""


def module(path: str):
  """The config module of a file path or packaged name (it defines ``get_config(arg)``)."""
  name = os.path.splitext(os.path.basename(path))[0]
  if not os.path.exists(path) and name == path and path in PACKAGED:
    return importlib.import_module(f'adpfl_jax.configs.{path}')
  if not os.path.isfile(path):
    raise ConfigLoadError(f'--config={path}: no such file (or one of the packaged configs '
                          f'{", ".join(PACKAGED)})')
  spec = importlib.util.spec_from_file_location(f'adpfl_config_{name}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, 'get_config'):
    raise ConfigLoadError(f'--config={path}: the file defines no get_config(arg)')
  return mod


def load(spec: str, overrides: Iterable = ()) -> ml_collections.ConfigDict:
  """The config of ``FILE.py[:ARG]`` or ``NAME[:ARG]``, with ``overrides`` applied, locked."""
  path, _, arg = spec.partition(':')
  config = module(path).get_config(arg or None)
  return apply_overrides(config, overrides)


def keys(config) -> list[str]:
  """Every dotted leaf key of a config."""
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += [f'{key}.{sub}' for sub in keys(value)]
    else:
      out.append(key)
  return out


def _parse(key: str, text: Any, old: Any) -> Any:
  if not isinstance(text, str):
    return text
  try:
    if isinstance(old, bool):
      if text.lower() not in ('true', 'false', '1', '0', 'yes', 'no'):
        raise ValueError('expected True or False')
      return text.lower() in ('true', '1', 'yes')
    if isinstance(old, int):
      return int(text)
    if isinstance(old, float):
      return float(text)
    if isinstance(old, (tuple, list)):
      parsed = ast.literal_eval(text) if text.strip()[:1] in '([' else [
          ast.literal_eval(v) for v in text.split(',') if v.strip()]
      return type(old)(parsed if isinstance(parsed, (tuple, list)) else (parsed,))
    return text
  except (ValueError, SyntaxError) as err:
    raise ConfigLoadError(f'--config.{key}={text}: not a valid {type(old).__name__} '
                          f'({err})') from None


def _suggest(key: str, known: list[str]) -> str:
  """'; did you mean …?' with the closest keys (a typo in the leaf, or the wrong section)."""
  section, _, leaf = key.rpartition('.')

  def score(candidate: str) -> float:
    c_section, _, c_leaf = candidate.rpartition('.')
    whole = difflib.SequenceMatcher(None, leaf, c_leaf).ratio()
    prefix = difflib.SequenceMatcher(None, leaf, c_leaf[:len(leaf)]).ratio()
    return max(whole, prefix) + (0.2 if c_section == section else 0.0)

  ranked = sorted(known, key=score, reverse=True)[:3]
  ranked = [k for k in ranked if score(k) >= 0.6]
  return f'; did you mean {" or ".join(ranked)}?' if ranked else ''


def apply_overrides(config, overrides: Iterable) -> ml_collections.ConfigDict:
  """Sets ``'key=value'`` strings or ``(key, value)`` pairs, typed like the current values."""
  config.unlock()
  known = keys(config)
  for item in overrides:
    if isinstance(item, tuple):
      key, value = item
    elif '=' in item:
      key, value = item.split('=', 1)
    else:
      raise ConfigLoadError(f'override {item!r}: expected key=value')
    if key not in known:
      raise ConfigLoadError(f'config.{key}: no such key{_suggest(key, known)}')
    node = config
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    common.set_path(config, key, _parse(key, value, node[leaf]))
  config.lock()
  return config


_COMMENTED = re.compile(r'^\s*c\.([\w.]+)\s*=.*?#\s*(.+)$')
_ASSIGNED = re.compile(r'^\s*c\.([\w.]+)\s*=')


def meanings(*modules) -> dict[str, str]:
  """Key → meaning, from the comments next to (or right above) ``c.key = …`` lines."""
  out: dict[str, str] = {}
  for mod in modules:
    try:
      lines = inspect.getsource(mod).splitlines()
    except (OSError, TypeError):
      continue
    above: list[str] = []
    for line in lines:
      stripped = line.strip()
      if stripped.startswith('#'):
        above.append(stripped.lstrip('# ').strip())
        continue
      m = _COMMENTED.match(line)
      if m:
        out.setdefault(m.group(1), m.group(2).strip())
      elif (a := _ASSIGNED.match(line)) and above:
        out.setdefault(a.group(1), ' '.join(above))
      above = []
  return out


def describe(config, spec: str = '') -> str:
  """Every key of ``config`` with its value and meaning, one per line."""
  path = spec.partition(':')[0]
  modules = [default, common]
  if path:
    try:
      modules.insert(0, module(path))
    except ConfigLoadError:
      pass
  help_ = meanings(*modules)
  rows = []
  for key in keys(config):
    node = config
    for part in key.split('.'):
      node = node[part]
    text = f'{key} = {node!r}'
    rows.append(f'{text:<48s}  # {help_[key]}' if key in help_ else text)
  return '\n'.join(rows)
