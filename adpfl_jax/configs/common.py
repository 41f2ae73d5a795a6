"""Config helpers: ``parse_arg`` for ``--config=file.py:key=value,flag`` style arguments."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults):
  """Parses ``'a=1,b=x,smoke'`` into a ConfigDict over ``defaults``; unknown keys raise.

  A bare word sets a boolean default to True (``smoke``); values are converted to the type of the
  default.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(','):
    item = item.strip()
    if not item:
      continue
    key, eq, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'config argument {key!r} is not one of {sorted(defaults)} '
                       f'(in {arg!r})')
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f'config argument {key!r} needs a value ({key}=...)')
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ('1', 'true', 'yes', 'y')
    else:
      out[key] = type(default)(value)
  return out


def set_path(config, key: str, value) -> None:
  """Sets a dotted key (``'privacy.quantile.target'``) of a ConfigDict; a missing key raises."""
  node = config
  *parents, leaf = key.split('.')
  for part in parents:
    node = node[part]
  node[leaf] = value
