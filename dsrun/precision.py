"""The precision.mode registry: what each mode means to the code that builds, trains, plans and serves under it,
and the `precision` group's settings. A new mode is conf/precision/<option>.yaml and one record here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    mode: str = "32-true"  # auto | 32-true | 16-mixed | bf16-mixed | bf16-true | fp8
    default_grad_clip: float = 1.0  # used when optim.grad_clip is null (fp16: 0.5, a tighter
    # bound while the loss scale is still settling)


@dataclass(frozen=True)
class Precision:
    fabric: str  # the precision Fabric runs a whole-model strategy with
    compute: str  # activations and matmuls, as a torch dtype name; a frozen base is stored in it too
    weights: str = "float32"  # trained weights (mixed precision keeps fp32 master weights under autocast)
    autocast: bool = False  # low-precision compute over fp32 weights (FSDP2 casts in its own policy instead)
    loss_scaling: bool = False  # fp16: a dynamic loss scale, whose unscaling keeps clipping out of fused AdamW
    fp8: bool = False  # torchao's float8 block linears (parallelize.apply_float8); fp8 weights when serving
    peak: str = "bf16_tflops"  # the GPU catalog's rate its matmuls run at (dsrun/gpus.yaml)
    needs: str | None = None  # the GPU catalog's flag a card must set to run it (bf16, fp8)
    gpu_only: str = ""  # why it cannot run on a CPU, and what to choose there; empty: it can

    @property
    def compute_bytes(self) -> int:
        return 4 if self.compute == "float32" else 2

    @property
    def casts_weights(self) -> bool:
        """16-bit copies of fp32 weights for the matmuls: autocast, or FSDP2's mixed-precision policy (fp8's float8
        linears cast their own inputs instead)."""
        return self.autocast and not self.fp8

    @property
    def weight_bytes(self) -> int:
        return 4 if self.weights == "float32" else 2


PRECISIONS: dict[str, Precision] = {
    "32-true": Precision("32-true", compute="float32", peak="fp32_tflops"),
    "16-mixed": Precision("16-mixed", compute="float16", autocast=True, loss_scaling=True,
                          gpu_only="fp16 autocast needs a GPU; use precision=bf16 or precision=fp32"),
    "bf16-mixed": Precision("bf16-mixed", compute="bfloat16", autocast=True, needs="bf16"),
    "bf16-true": Precision("bf16-true", compute="bfloat16", weights="bfloat16", needs="bf16"),
    # bf16 autocast around torchao's float8 linears
    "fp8": Precision("bf16-mixed", compute="bfloat16", autocast=True, fp8=True, peak="fp8_tflops", needs="fp8",
                     gpu_only="fp8 needs a Hopper or Ada GPU; use precision=bf16"),
}
