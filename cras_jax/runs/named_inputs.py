"""The inputs a config names rather than gives (`model.weights="torchvision"`, a registered
`data.name` with an empty `data.root`), fetched before a run starts.

`ensure(config)` fetches (or finds in the user cache) the backbone weights and the dataset,
and raises one `UserError` (exit 2) listing everything that could not be got, each with what
was tried, from where, and where to put the file by hand: a machine without network learns
all it needs in one message.
"""

from __future__ import annotations

import dataclasses

from cras_jax.backbones import sources, weights_fetch
from cras_jax.base import errors, registry, user_cache
from cras_jax.data import combined, fetch
from cras_jax.runs import specs


class NamedInputsError(errors.UserError):
  """Named weights or a named dataset could not be fetched."""


def ensure(config) -> None:
  problems = []
  m, cache = config.model, user_cache.root(config)
  source = sources.weights_source(m.backbone, m.weights, m.weights_url, cache)
  if source.kind == sources.TORCHVISION:
    try:
      weights_fetch.fetch(m.backbone, cache, m.weights_url)
    except errors.UserError as e:
      problems.append(str(e))
  for spec in _datasets(config):
    try:
      fetch.ensure(spec)
    except errors.UserError as e:
      problems.append(str(e))
  if len(problems) == 1:
    raise NamedInputsError(problems[0])
  if problems:
    raise NamedInputsError(
        f"{len(problems)} inputs could not be got:\n" + "\n".join(f"  - {p}" for p in problems)
    )


def _datasets(config) -> list[fetch.FetchSpec]:
  """The datasets the config names without a root and that are fetched by name: `data.name`,
  or with `data.name=combined` each such entry of `data.sources` (fetched as the loader's
  `combined.source_spec` asks for it: every class)."""
  d = config.data
  if d.name == combined.NAME:
    return [
        dataclasses.replace(specs.fetch_spec(config), name=name, classes=())
        for name, root in combined.parse(d.sources)
        if not root and name != "synthetic" and registry.fetchable(name)
    ]
  if d.name != "synthetic" and not d.root and registry.fetchable(d.name):
    return [specs.fetch_spec(config)]
  return []
