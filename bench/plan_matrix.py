"""The planner's verdict on many configurations at once, as one JSON file: every recipe, and with `--grid` each
precision x strategy x card x fine-tune kind of the 1.5B shape plus the DPO/GRPO/inference plan modes (402 in all).
Each entry is the plan (`Plan.to_dict()`) or the refusal's message. A refactor that must not change behaviour
(issue #29) writes it before and after and compares the two files byte for byte:

    python bench/plan_matrix.py --grid --out /tmp/before.json   # ... change the code ...
    python bench/plan_matrix.py --grid --out /tmp/after.json && cmp /tmp/before.json /tmp/after.json

CPU only, in one process (~1 minute with --grid on 2 cores, a few seconds without).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cases(grid: bool) -> list[list[str]]:
    found = [[f"+recipe={p.stem}"] for p in sorted((REPO / "recipes").glob("*.yaml"))]
    if not grid:
        return found
    for precision, parallel, hardware, kind in itertools.product(
            ["fp32", "bf16", "bf16_true", "fp16", "fp8", "auto"],
            ["single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload", "tp"], ["1x3060", "4x4090", "1xh100"],
            [[], ["adapter=lora"], ["adapter=lora", "quant=nf4"]]):
        found.append([f"precision={precision}", f"parallel={parallel}", f"hardware={hardware}",
                      "model=r1_distill_qwen_1_5b", *kind])
    for mode, precision in itertools.product(["inference", "dpo", "grpo"], ["fp32", "bf16", "bf16_true", "fp16", "fp8"]):
        found.append([f"precision={precision}", "hardware=1x3060", "model=r1_distill_qwen_1_5b", f"plan.mode={mode}",
                      "adapter=lora"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", action="store_true", help="the 393 grid configurations besides the recipes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from hydra import compose, initialize_config_dir

    from dsrun.config import validate
    from dsrun.constants import CONF_DIR
    from dsrun.errors import UserError
    from dsrun.hardware import gpu_catalog
    from dsrun.plan import plan
    from dsrun.resolve import resolve
    from dsrun.schema import register_configs

    register_configs()
    verdicts: dict[str, object] = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for overrides in cases(args.grid):
            cfg = compose(config_name="config", overrides=[*overrides, "task=plan"])
            try:
                resolve(cfg)
                validate(cfg, gpu_catalog())
                verdicts[" ".join(overrides)] = plan(cfg).to_dict()
            except UserError as exc:
                verdicts[" ".join(overrides)] = f"refused: {exc}"
    args.out.write_text(json.dumps(verdicts, indent=1, sort_keys=True, default=str) + "\n")
    planned = sum(isinstance(v, dict) for v in verdicts.values())
    print(f"{len(verdicts)} configurations: {planned} planned, {len(verdicts) - planned} refused -> {args.out}")


if __name__ == "__main__":
    main()
