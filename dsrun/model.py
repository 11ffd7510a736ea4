"""Model: build from architecture fields (random init) or load real weights, add adapters, count FLOPs."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, cast

import torch

from dsrun.run.checkpoint import last_checkpoint_note
from dsrun.errors import Interrupted, UserError
from dsrun.lm import CausalLM
from dsrun.lora_folder import absolute_base, is_adapter_folder, run_snapshot
from dsrun.parallelize import decoder_blocks
from dsrun.precision import PRECISIONS
from dsrun.quantize import bnb_config, quantize_linears
from dsrun.safe_read import check_safetensors, read_json_object

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from dsrun.adapters import AdapterConfig
    from dsrun.families import ModelConfig
    from dsrun.precision import PrecisionConfig
    from dsrun.quantize import QuantConfig


# transformers >= 5.2x swaps layers for Hugging Face Hub kernels when loading weights unless told not to: fetched
# from the Hub on first use (dsrun runs offline), and a ValueError where the `kernels` package is missing
NO_HUB_KERNELS = {"use_kernels": False}


def architecture(model_cfg: ModelConfig) -> Any:
    """The transformers config of a model option, offline: from its fields, or the config.json of its weights."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    if model_cfg.init == "pretrained" and is_adapter_folder(model_cfg.path):  # a LoRA run's model/
        config = base_architecture(Path(model_cfg.path).expanduser())
    elif model_cfg.init == "pretrained":
        source = _weights_source(model_cfg)
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            if "trust_remote_code" in str(exc):
                raise UserError(f"model.path={source}: this model runs code shipped with its weights; read that code, "
                                "then set model.trust_remote_code=true to allow it") from None
            raise UserError(f"model.path={source}: cannot read its config.json: {str(exc).splitlines()[0]}") from None
    else:
        fields = OmegaConf.to_container(model_cfg.fields, resolve=True) if not isinstance(model_cfg.fields, dict) \
            else dict(model_cfg.fields)
        try:
            config = AutoConfig.for_model(model_cfg.arch, **fields)
        except Interrupted:  # Ctrl-C during start-up (dsrun.signals) is not a fault in the fields
            raise
        except Exception as exc:  # noqa: BLE001 - every failure here comes from the user's fields
            detail = str(exc.__cause__ or exc).strip().splitlines()[-1].strip()
            raise UserError(f"model.fields of model={model_cfg.name}: {detail}") from None
    if model_cfg.experts_implementation and hasattr(config, "n_routed_experts"):
        config.experts_implementation = model_cfg.experts_implementation
    config.use_cache = False
    return config


def _weights_source(model_cfg: ModelConfig) -> str:
    """A local folder when model.path is set (checked), else the hub id (needs the HF cache or network)."""
    if model_cfg.path:
        folder = Path(model_cfg.path).expanduser()
        if not folder.is_dir():
            raise UserError(f"model.path={folder}: no such folder; point it at a folder with config.json and "
                            "*.safetensors")
        if not (folder / "config.json").is_file():
            raise UserError(f"model.path={folder}: no config.json in it; is this a Hugging Face model folder?")
        fix = "restore it from the model's source (it describes the architecture)"
        if "model_type" not in read_json_object(folder / "config.json", fix):
            raise UserError(f"{folder / 'config.json'}: no model_type in it; {fix}")
        return str(folder)
    assert model_cfg.hub_id is not None  # validate() asks a pretrained model for a path or a hub id
    return model_cfg.hub_id


def build_model(model_cfg: ModelConfig, config: Any, seed: int, dtype: torch.dtype = torch.float32,
                quant_cfg: QuantConfig | None = None, compute_dtype: torch.dtype = torch.float32,
                device: Any = None) -> PreTrainedModel:
    """The causal LM of `config` (from architecture()): random weights (seeded, identical on every rank) or the
    real ones from safetensors, created in `dtype`, the dtype its weights train in (weight_dtype()).

    With a quantized base (quant.method nf4/int8) the full-precision model never exists on `device`: real weights
    are quantized one by one as transformers loads them, random ones block by block as they are created."""
    from transformers import AutoModelForCausalLM

    quant = quant_cfg if quant_cfg is not None and quant_cfg.method != "none" else None  # None: 16/32-bit weights
    if model_cfg.init == "pretrained" and is_adapter_folder(model_cfg.path):  # a LoRA run's model/: base + adapter
        return merged(Path(model_cfg.path).expanduser(), dtype, quant_cfg)
    if model_cfg.init == "pretrained":
        source = _weights_source(model_cfg)
        if model_cfg.path and not any(Path(source).glob("*.safetensors")):
            raise UserError(f"model.path={source}: no *.safetensors weights in it (dsrun does not unpickle .bin files)")
        if model_cfg.path:
            check_safetensors(Path(source))
        extra = {"quantization_config": bnb_config(quant, compute_dtype), "device_map": {"": device}} \
            if quant is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, trust_remote_code=model_cfg.trust_remote_code, use_safetensors=True,
            dtype=dtype, **NO_HUB_KERNELS, **extra)
        return freeze(model) if quant is not None else model
    torch.manual_seed(seed)
    if quant is None:
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return freeze(materialize_quantized(model, quant, compute_dtype, torch.device(device or "cpu")))


def build_run_model(model_cfg: ModelConfig, config: Any, device: Any, *, precision: PrecisionConfig,
                    adapter: AdapterConfig, quant: QuantConfig, seed: int) -> PreTrainedModel:
    """The base model of a run as training builds it (train.fit; export and inference rebuild a LoRA run's base
    with it): a frozen base under adapters in the compute dtype, quantized if the run quantizes."""
    mode, frozen = precision.mode, adapter.method != "none"
    return build_model(model_cfg, config, seed=seed, dtype=weight_dtype(mode, frozen), quant_cfg=quant,
                       compute_dtype=weight_dtype(mode, frozen=True), device=device)


# ---------------------------------------------------------------------------------------------------------------
# A run's model/ folder: full weights, or a LoRA adapter merged into the base rebuilt as the run built it.

def base_architecture(folder: Path) -> Any:
    return architecture(run_snapshot(folder).model)


def merged(folder: Path, dtype: Any, quant_cfg: QuantConfig | None) -> PreTrainedModel:
    """Base + adapter, merged, in `dtype`: a plain transformers model that trains or generates like any other."""
    if quant_cfg is not None and quant_cfg.method != "none":
        raise UserError(f"model.path={folder} with quant={quant_cfg.name}: a LoRA run's folder loads merged in 16 "
                        f"bits; `dsrun export {folder.parent} OUT` first, then model.path=OUT quant={quant_cfg.name}")
    model, _ = merged_model(folder.resolve().parent, dtype=dtype, snap=run_snapshot(folder))
    for parameter in model.parameters():  # peft loads the adapter for inference (frozen): this is a model to train
        parameter.requires_grad_(True)
    return model


def read_run(run_dir: Path) -> Any:
    """The run's resolved config; a folder that is not a finished run is one line."""
    from omegaconf import OmegaConf

    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.yaml); pass a folder `python -m dsrun` wrote")
    if not (run_dir / "model").is_dir():
        raise UserError(f"{run_dir}: the run saved no final weights (no model/); finish it with "
                        f"`dsrun resume {run_dir}`, then export")
    return OmegaConf.load(run_dir / "config.yaml")


def dequantize(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Every bitsandbytes layer back to a plain nn.Linear holding its dequantized weight: the weight the
    adapters were trained against."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                continue
            state = getattr(child.weight, "quant_state", None) or getattr(child, "state", None)
            weight = dequantize_bnb_weight(cast(torch.nn.Parameter, child.weight), state=state).to(dtype)
            linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                     device=weight.device, dtype=dtype)
            linear.weight.data.copy_(weight)
            if child.bias is not None:
                linear.bias.data.copy_(child.bias.data.to(dtype))
            setattr(parent, name, linear)
    return model


def merged_model(run_dir: Path, dtype: torch.dtype = torch.bfloat16, snap: Any = None) -> tuple[PreTrainedModel, Any]:
    """The run's final model in `dtype` with any LoRA adapter merged, and the run's config (`snap`: that config
    with its base path made absolute, dsrun/lora_folder.py). The base is rebuilt as training built it (same seed,
    dtype, device type and, for a quantized base, the same block-by-block creation), so random-init runs load too."""
    from transformers import AutoModelForCausalLM

    snap = snap if snap is not None and (run_dir / "model").is_dir() else read_run(run_dir)
    weights = run_dir / "model"
    if not (weights / "adapter_config.json").is_file():
        try:
            return AutoModelForCausalLM.from_pretrained(weights, dtype=dtype, use_safetensors=True,
                                                        **NO_HUB_KERNELS), snap
        except (OSError, ValueError) as exc:
            raise UserError(f"{weights}: cannot load the run's weights: {str(exc).splitlines()[0]}") from None
    from peft import PeftModel

    device = torch.device("cuda" if snap.hardware.accelerator == "cuda" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available() and snap.model.init == "random":
        raise UserError(f"{run_dir}: a LoRA adapter over a random-init base built on a GPU; that base is rebuilt "
                        "from the same random numbers only on a GPU: run this on a GPU machine")
    snap.model.experts_implementation = "eager" if device.type == "cpu" else snap.model.experts_implementation
    with torch.device(device):  # where training created the base: random init draws from that device's generator
        base = build_run_model(snap.model, architecture(snap.model), device, precision=snap.precision,
                               adapter=snap.adapter, quant=snap.quant, seed=snap.train.seed)
    merged = PeftModel.from_pretrained(dequantize(base, dtype).to(dtype), weights).merge_and_unload()
    return merged.to(dtype), snap


# ---------------------------------------------------------------------------------------------------------------

def materialize_quantized(model: PreTrainedModel, quant_cfg: QuantConfig, compute_dtype: torch.dtype,
                          device: torch.device) -> PreTrainedModel:
    """A model built on the meta device, given storage on `device` and initialised part by part: embeddings,
    head, norms and rotary buffers first, then each decoder block, quantized before the next one is created, so
    the device holds at most one block in 16 bits."""
    blocks = decoder_blocks(model)
    inside = {id(m) for block in blocks for m in block.modules()}
    outside = [m for m in model.modules() if id(m) not in inside]
    with torch.no_grad():
        for module in outside:
            module.to_empty(device=device, recurse=False)
        model.tie_weights()  # a tied head shares the embedding's new storage
        for module in outside:
            model._init_weights(module)
        for block in blocks:
            block.to_empty(device=device)
            for module in block.modules():
                model._init_weights(module)
            quantize_linears(block, quant_cfg, compute_dtype)
    return model


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """A quantized base is frozen: only adapters added afterwards train."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def weight_dtype(precision_mode: str, frozen: bool = False) -> torch.dtype:
    """The dtype the base weights are created in. A frozen base (adapters train, it does not) is stored in the
    compute dtype: no optimizer ever reads an fp32 copy of it, and autocast would only cast it down again
    (peft's prepare_model_for_kbit_training upcasts embedding and head to fp32: 4.4 GB for a 7B, not done here).
    bf16-true weights are created in bf16: building them in fp32 and casting afterwards peaks at 1.5x the weights
    (a 1.5B model reached 7.1 GiB on an 8 GB card before its first step)."""
    precision = PRECISIONS[precision_mode]
    return getattr(torch, precision.compute if frozen else precision.weights)


def numel(p: torch.Tensor) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it away (ds_numel)."""
    return getattr(p, "ds_numel", None) or p.numel()


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    embedding = sum(numel(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": total, "trainable": trainable, "embedding": embedding}


def millions(count: int) -> str:
    """A parameter count for a start line: millions, or the exact count where one decimal of a million shows 0.0
    (a LoRA adapter of a small model)."""
    return f"{count / 1e6:,.1f} M" if count >= 10**6 else f"{count:,}"


def active_matmul_params(model: CausalLM) -> int:
    """Parameters one token passes through, less the input embedding (a lookup, not a matmul): for MoE only
    num_experts_per_tok of the routed experts count."""
    config = model.config
    total = sum(numel(p) for p in model.parameters())
    embedding = sum(numel(p) for p in model.get_input_embeddings().parameters())
    routed = sum(numel(p) for n, p in model.named_parameters() if ".mlp.experts." in n)
    n_routed = getattr(config, "n_routed_experts", None) or 0
    inactive = routed * (n_routed - config.num_experts_per_tok) / n_routed if n_routed else 0
    return int(total - embedding - inactive)


def flops_per_token(model: CausalLM, seq_len: int) -> float:
    """Training FLOPs per token, the anchors' formula (nanoGPT's estimate_mfu, PaLM appendix B):
    6 x active non-embedding params + 12 x layers x hidden x seq_len."""
    config = model.config
    return 6 * active_matmul_params(model) + 12 * config.num_hidden_layers * config.hidden_size * seq_len


@contextlib.contextmanager
def written_whole(folder: Path, partial: Path) -> Iterator[Path]:
    """A model folder written under a temporary name beside it (`partial`), renamed into place when the block ends:
    a full disk or a kill leaves the previous `folder` (or none), never a half-written one that loads as a model.
    An existing `folder` is renamed aside first and removed after; if the block raises, `partial` is removed."""
    old = folder.parent / f".{folder.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        yield partial
        readable(partial)
        if folder.exists():
            folder.rename(old)
        partial.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def readable(folder: Path) -> None:
    """Every file the mode a new file gets under the user's umask: safetensors writes its file through a private
    temporary one (0600), which a server running as another user could not read."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def save_weights(model: CausalLM, state: dict[str, torch.Tensor], folder: Path, tokenizer: Any) -> None:
    """Final weights as safetensors (+ config.json) and the tokenizer files (chat template included), loadable with
    model.init=pretrained model.path=<folder>; a LoRA run's folder holds the adapter (`dsrun export` merges it)."""
    from safetensors import SafetensorError

    partial = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # a killed save's
    try:
        with written_whole(folder, partial):
            absolute_base(model)  # the adapter names its base folder wherever it is loaded from
            model.save_pretrained(partial, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(partial)
    except (OSError, SafetensorError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:160]
        note = last_checkpoint_note(folder.parent)
        then = (f"free disk space, then `dsrun resume {folder.parent}` writes them from it" if not note.startswith("no")
                else "the trained weights are lost with this process: free disk space and train again")
        raise UserError(f"{folder}: cannot write the final weights ({why}); {note}; {then}") from None
