"""The inputs a config names rather than gives (`model.weights="torchvision"`, a registered
`data.name` with an empty `data.root`), fetched before a run starts.

`ensure(config)` fetches (or finds in the user cache) the backbone weights and the dataset,
and raises one `UserError` (exit 2) listing everything that could not be got, each with what
was tried, from where, and where to put the file by hand: a machine without network learns
all it needs in one message.
"""

from __future__ import annotations

from cras_jax.backbones import sources, weights_fetch
from cras_jax.base import errors, registry, user_cache
from cras_jax.data import fetch
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
  d = config.data
  if d.name != "synthetic" and not d.root and registry.fetchable(d.name):
    try:
      fetch.ensure(specs.fetch_spec(config))
    except errors.UserError as e:
      problems.append(str(e))
  if len(problems) == 1:
    raise NamedInputsError(problems[0])
  if problems:
    raise NamedInputsError(
        f"{len(problems)} inputs could not be got:\n" + "\n".join(f"  - {p}" for p in problems)
    )
