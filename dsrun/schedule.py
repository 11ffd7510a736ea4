"""The learning-rate schedule: a pure function of the optimizer step and a fixed horizon, so a resume needs no
scheduler state and a longer `train.max_steps` on resume keeps the learning rate continuous.

The rule (docs/configuration.md, "Learning-rate schedule"): the horizon is the run's length when it started, saved
with every checkpoint. Warmup is linear over `optim.warmup_steps`; then
- cosine / linear decay from lr to lr x min_lr_ratio at the horizon, and hold lr x min_lr_ratio past it;
- constant holds lr;
- wsd (warmup-stable-decay) holds lr, then decays linearly over the last `optim.decay_fraction` of the horizon.
On resume the horizon stays, except under wsd while the run is still in its stable phase: the decay tail then moves
to the new end (the stable phase is flat, so nothing jumps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from dsrun.optim import OptimConfig


@dataclass(frozen=True)
class Schedule:
    decay: Callable[[float], float] | None  # the share of (lr - the floor) left at a fraction of the decay; None: flat
    stable_phase: bool = False  # the decay is only the last optim.decay_fraction of the horizon


def _cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


def _linear(progress: float) -> float:
    return 1 - progress


# The optim.schedule registry: adding a schedule is one entry here (and its name in docs/configuration.md).
SCHEDULES: dict[str, Schedule] = {"cosine": Schedule(_cosine), "linear": Schedule(_linear),
                                  "constant": Schedule(None), "wsd": Schedule(_linear, stable_phase=True)}
DECAYING = tuple(name for name, s in SCHEDULES.items() if s.decay is not None)  # read optim.min_lr_ratio
STABLE_PHASE = tuple(name for name, s in SCHEDULES.items() if s.stable_phase)  # read optim.decay_fraction
DEFAULT_WARMUP_CAP = 10  # optim.warmup_steps=null: 10 steps, or a tenth of a shorter run


def warmup_steps(optim_cfg: OptimConfig, horizon: int) -> int:
    chosen = optim_cfg.warmup_steps
    return min(DEFAULT_WARMUP_CAP, horizon // 10) if chosen is None else chosen


def decay_start(optim_cfg: OptimConfig, horizon: int) -> int:
    """wsd: the first step of the decay tail."""
    return horizon - max(1, round(optim_cfg.decay_fraction * horizon))


def horizon_on_resume(optim_cfg: OptimConfig, saved: int | None, max_steps: int, step: int) -> int:
    """The horizon a resumed run keeps (see the module's rule). `saved` is None for checkpoints written before the
    horizon was saved: their run's length was max_steps at the time, which is the best guess left."""
    if saved is None:
        return max_steps
    if SCHEDULES[optim_cfg.schedule].stable_phase and step < decay_start(optim_cfg, saved):
        return max_steps
    return saved


def lr_factor(optim_cfg: OptimConfig, horizon: int) -> Callable[[int], float]:
    """The lr multiplier of optimizer step `step` (from 0)."""
    shape, floor = SCHEDULES[optim_cfg.schedule], optim_cfg.min_lr_ratio
    warmup = warmup_steps(optim_cfg, horizon)
    tail = decay_start(optim_cfg, horizon) if shape.stable_phase else warmup

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if shape.decay is None or step < tail:
            return 1.0
        span = horizon - 1 - tail  # the run's last step (horizon - 1, from 0) trains at the floor
        progress = 1.0 if span <= 0 else min(1.0, (step - tail) / span)
        return floor + (1 - floor) * shape.decay(progress)

    return factor


def schedule_problems(optim_cfg: OptimConfig, max_steps: int | None) -> list[str]:
    """Checked by config.validate() (max_steps known) and by train.fit (a length in epochs is known only there)."""
    p = []
    if optim_cfg.schedule not in SCHEDULES:
        p.append(f"optim.schedule={optim_cfg.schedule}: unknown; choose one of {', '.join(SCHEDULES)}")
    if not 0 < optim_cfg.decay_fraction <= 1:
        p.append(f"optim.decay_fraction={optim_cfg.decay_fraction}: the share of the run wsd decays over must be in "
                 "(0, 1], e.g. 0.2")
    warmup = optim_cfg.warmup_steps
    if warmup is not None and warmup < 0:
        p.append(f"optim.warmup_steps={warmup}: must be >= 0 (null: 10, or a tenth of a shorter run)")
    elif warmup is not None and max_steps is not None and warmup >= max_steps:
        p.append(f"optim.warmup_steps={warmup}: the run is {max_steps} steps long, so the learning rate would never "
                 f"reach train.lr; set optim.warmup_steps below {max_steps} (or null: a tenth of the run)")
    return p
