"""Values several layers share, kept at the bottom so no module imports its caller to reach one."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent / "conf"  # the Hydra config groups (conf/<group>/<option>.yaml), in the wheel
AUTO = "auto"  # a value resolve() or the pre-launch probe fills in (train.micro_batch=auto, hardware=auto, ...)
# the overrides a verb (`dsrun resume`, `replay`) put in front of the user's: the console shows only the user's own
VERB_OVERRIDES = "DSRUN_VERB_OVERRIDES"
