"""Training objectives behind one interface (see `base.Objective`), chosen once from the config.

  objective = objectives.make_objective(config, apply, schedule)
  loss, metrics = objective.loss(params, batch, frozen)

The update step and the train loop know nothing of which objective runs. To add one: a
module here with `make_objective(config, apply, schedule) -> Objective`, an entry in
OBJECTIVES, and its rule in `objective_name`. REPA (config.model.repa_block > 0) is a term on
top of the diffusion or flow objective (objectives/repa.py); its `apply` also returns the
model's intermediates.
"""

from __future__ import annotations

import ml_collections

from dit.diffusion import schedules
from dit.objectives import diffusion, distillation, flow, repa
from dit.objectives.base import Apply, Objective, batch_cond, per_example

OBJECTIVES = {
  "diffusion": diffusion.make_objective,
  "consistency_distillation": distillation.make_objective,
  "flow_matching": lambda config, apply, schedule: flow.make_objective(config, apply),
}

__all__ = [
  "OBJECTIVES",
  "Objective",
  "batch_cond",
  "make_objective",
  "objective_name",
  "per_example",
]


def objective_name(config: ml_collections.ConfigDict) -> str:
  """A `distill` section distils (LCM), a `flow` section trains flow matching, and any other
  config trains the diffusion loss."""
  if "distill" in config:
    return "consistency_distillation"
  return "flow_matching" if "flow" in config else "diffusion"


def make_objective(
  config: ml_collections.ConfigDict, apply: Apply, schedule: schedules.Schedule | None
) -> Objective:
  """The objective of `config` for the model `apply(params, x_t, t, cond)`; `schedule` is the
  discrete schedule (None for flow matching). With REPA, `apply` returns (output,
  intermediates) (dit.train.make_apply(..., intermediates=True))."""
  base = OBJECTIVES[objective_name(config)]
  if repa.enabled(config):
    return repa.make_objective(config, apply, schedule, base)
  return base(config, apply, schedule)
