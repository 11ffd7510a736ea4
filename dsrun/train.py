"""The training loop, top to bottom: Fabric, data, model, optimizer, steps, summary.

It knows nothing of which strategy, precision or monitor is in use beyond the objects it is handed.
Host syncs (`.item()`) happen only at log steps.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from omegaconf import OmegaConf

from dsrun.batch import data_parallel_rank, data_parallel_size, global_batch, sequences_per_row
from dsrun.run.checkpoint import Checkpointer, last_checkpoint_note, latest_checkpoint
from dsrun.data import BatchStream, build_datasets, load_tokenizer
from dsrun.errors import ConfigError, DataError, TrainingDiverged, UserError
from dsrun.evaluate import Evaluator
from dsrun import hardware
from dsrun.hardware import emulate_memory, gpu_catalog
from dsrun.attention import use_varlen_attention
from dsrun.loss import IGNORE_INDEX, attach_chunked_loss
from dsrun.lm import CausalLM
from dsrun.adapters import add_adapters
from dsrun.model import architecture, build_run_model, flops_per_token, millions, parameter_counts, save_weights
from dsrun.model_inputs import HostEmbedding, model_inputs, offload_embedding
from dsrun.precision import PRECISIONS
from dsrun.monitor import build_monitors
from dsrun.optim import build_optimizer
from dsrun.preference import PreferenceEvaluator, PreferenceLoss, preference_data, reference_logps
from dsrun.profiling import StepProfiler
from dsrun.reinforce import GroupPolicy, Prompts, describe_rollouts, prompt_budget, prompt_data
from dsrun.router_balance import RouterBalance
from dsrun.run.files import metrics_row, snapshot, write_json
from dsrun.schedule import horizon_on_resume, lr_factor, schedule_problems
from dsrun.strategy import (all_reduce_, build_fabric, checkpoint_state, full_state_dict, grad_clip, is_deepspeed,
                            micro_step, model_init, optimizer_step, zero3_partitioned)
from dsrun.strategy import setup as setup_strategy

from dsrun.schema import container

if TYPE_CHECKING:
    from dsrun.schema import RunConfig


def fit(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Train: set up, then one optimizer step at a time with logging, eval and checkpoints between steps, then
    finish. A stop signal ends the loop after its step's checkpoint; both endings go through finish()."""
    run = setup(cfg, run_dir)
    tr, stop = cfg.train, StopSignal(run.fabric)
    run.model.train()
    status, step = "completed", run.start_step
    for step in range(run.start_step + 1, run.max_steps + 1):
        grad_norm = train_step(run, step)
        streak = int(run.skipped_seen.swap(run.skipped_in_a_row))  # as of the previous step
        if streak >= tr.max_nonfinite_steps:
            raise TrainingDiverged(diverged_message(cfg, streak, step - 1, run.loss_sum, grad_norm, run_dir))
        run.profiler.step()
        evaluating = run.evaluator is not None and (step == run.max_steps
                                                    or (tr.eval_every > 0 and step % tr.eval_every == 0))
        if step % tr.log_every == 0 or step == run.max_steps or evaluating:
            log(run, step, grad_norm, evaluating)
        interrupted = stop.requested()
        every = tr.checkpoint_every
        if every >= 0 and (interrupted or step == run.max_steps or (every and step % every == 0)):
            save_checkpoint(run, step)
        if interrupted:
            status = "interrupted"
            break
    return finish(run, stop, status, step)


@dataclass
class Run:
    """What setup() builds and the steps carry forward: the objects, the run's length, and the counters a checkpoint
    saves (the loss and labelled-token sums of the current log interval, tokens trained, the best eval)."""
    cfg: RunConfig
    run_dir: Path
    fabric: Any
    model: Any
    optimizer: Any
    tokenizer: Any
    batches: BatchStream
    evaluator: Evaluator | None
    host_embedding: HostEmbedding | None  # parallel.offload_embedding: the input embedding in host memory
    router_balance: RouterBalance  # DeepSeek-V3 routers' load-balancing biases, moved after every step
    checkpointer: Checkpointer
    state: dict[str, Any]  # what a checkpoint restores: model, optimizer (and the fp16 scaler)
    monitors: Any
    profiler: Any  # StepProfiler, made once the start step is known
    lr: float  # the peak learning rate (scaled with the data-parallel size when asked)
    lr_at: Any  # step -> factor of lr (dsrun/schedule.py), made once the horizon is known
    horizon: int  # the schedule's length, kept on resume
    max_steps: int
    length: dict[str, Any]  # max_steps, epochs, steps and tokens per epoch: in the summary
    replicas: int  # ranks of one tensor-parallel group hold the same batch
    clip: float
    flops: float  # per token
    peak_flops: float  # of all devices; 0 on CPU
    tokens_per_step: int
    memory_cap: float | None
    load_peak: float | None
    start_step: int = 0
    last_log_step: int = 0
    tokens_trained: float = 0.0
    best_eval: dict[str, Any] = field(default_factory=lambda: {"loss": float("inf"), "step": None})
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: Any = None  # 0-d device tensors, summed on the device: read at log steps only
    trained_sum: Any = None
    trained_steps: Any = None  # steps of the log interval that had a labelled token
    skipped_in_a_row: Any = None
    skipped_seen: Any = None  # OneStepLate: the streak of skipped steps, read one step late
    grad_norm: Any = None  # the last step's, before clipping (a device tensor)
    # task=dpo: pairs of replies; task=grpo: completions sampled and rewarded — instead of next-token targets
    objective: PreferenceLoss | GroupPolicy | None = None
    started: float = 0.0
    last_log_time: float = 0.0
    last_checkpoint_time: float | None = None

    @property
    def rank_zero(self) -> bool:
        return self.fabric.global_rank == 0


def setup(cfg: RunConfig, run_dir: Path) -> Run:
    """Fabric, the run folder's snapshot, monitors, data, model, optimizer; then resume from the latest checkpoint
    (model, optimizer, data position and the partial log interval, as if never stopped)."""
    fabric = build_fabric(cfg)
    fabric.launch()
    rank_zero = fabric.global_rank == 0
    if rank_zero:
        snapshot(container(cfg), run_dir)
        if is_deepspeed(fabric):
            write_json(run_dir / "deepspeed.json", fabric.strategy.config)
    memory_cap = emulate_memory(cfg.hardware, fabric.device)
    plain = cast(dict[str, Any], OmegaConf.to_container(container(cfg), resolve=True))
    monitors = build_monitors(cfg.monitor, plain, run_dir, rank_zero)  # a taken port fails before the model costs anything
    tr = cfg.train
    fabric.seed_everything(tr.seed + fabric.global_rank, verbose=False)

    # data first: a bad dataset stops the run before the model costs anything
    arch = architecture(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    dpo, grpo = cfg.task.name == "dpo", cfg.task.name == "grpo"
    assert tr.seq_len is not None and tr.lr is not None  # resolve() fills them
    if dpo:  # [pairs, 2, seq_len]: a micro-batch of N pairs runs 2N sequences
        rows, eval_rows, data_line = preference_data(cfg.data, tokenizer, tr.seq_len, arch.vocab_size)
    elif grpo:  # prompts: a micro-batch of N prompts runs N x task.generations completions
        rows, data_line = prompt_data(cfg.data, tokenizer, prompt_budget(cfg.task, tr.seq_len), arch.vocab_size)
        eval_rows = None
    else:
        rows, eval_rows, data_line = build_datasets(cfg.data, tokenizer, tr.seq_len, arch.vocab_size)
    if rank_zero:
        print(data_line, file=sys.stderr)
    dp, dp_rank = data_parallel_size(cfg), data_parallel_rank(fabric.global_rank, cfg)
    replicas = fabric.world_size // dp  # ranks of one tensor-parallel group hold the same batch
    batches = BatchStream(rows, tr.micro_batch, dp_rank, dp, seed=tr.seed, pin=fabric.device.type == "cuda",
                          accumulation=tr.accumulation)
    evaluator = Evaluator(eval_rows, tr.micro_batch, dp_rank, dp, replicas) if eval_rows is not None and not dpo \
        else None  # task=dpo's is made once its loss is (below)
    epochs = tr.epochs or 0  # resolve() leaves train.max_steps null only for a run counted in epochs
    max_steps = tr.max_steps or epochs * batches.steps_per_epoch
    if max_steps == 0:
        raise DataError(f"train.epochs={tr.epochs}: the data packs into {len(rows)} rows, fewer than one global "
                        f"batch ({global_batch(cfg)}); add data or lower train.micro_batch / train.accumulation")
    if problems := schedule_problems(cfg.optim, max_steps):  # a length in epochs is known only now
        raise ConfigError(problems)
    with model_init(fabric, cfg):
        model = build_run_model(cfg.model, arch, fabric.device, precision=cfg.precision, adapter=cfg.adapter,
                                quant=cfg.quant, seed=tr.seed)
        model = attach_chunked_loss(model, chunked=not zero3_partitioned(fabric, cfg))
        if cfg.data.packing and cfg.data.document_mask and not grpo:  # grpo's rows: one completion each
            use_varlen_attention(model)
        model = add_adapters(model, cfg.adapter)

    lr = tr.lr * (data_parallel_size(cfg) if cfg.optim.scale_lr_with_data_parallel else 1)

    def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
        trainable = [p for p in module.parameters() if p.requires_grad]
        # fused AdamW skips a non-finite step on the device (optimizer_step); offloaded states stay with torch's
        # reference kernels
        fused = not cfg.parallel.offload
        return build_optimizer(cfg.optim, trainable, lr=lr, fused=fused)

    counts = parameter_counts(model)
    flops = flops_per_token(model, tr.seq_len)
    host_embedding = offload_embedding(model) if cfg.parallel.offload_embedding else None
    model, optimizer = setup_strategy(fabric, cfg, model, make_optimizer)
    load_peak = load_peak_gib(fabric.device)  # building and placing the model, kept apart from the step's peak

    tokens_per_step = global_batch(cfg) * tr.seq_len * sequences_per_row(cfg)
    if dpo and cfg.adapter.method == "none":  # the reference: this model before its first step, once
        for pairs in filter(None, (rows, eval_rows)):
            pairs.reference = reference_logps(model, pairs, tr.micro_batch, fabric.device,
                                              lambda i, lab, pos, dev: model_inputs(i, lab, pos, dev, host_embedding))
    per_epoch = batches.steps_per_epoch  # 0 when the data is smaller than one global batch
    # an epoch is `per_epoch` whole steps: the rows they take (a remainder smaller than a global batch waits for
    # the next epoch's shuffle), so both token counts are of those rows (the labelled ones on average over epochs)
    taken = per_epoch * global_batch(cfg)
    length = {"max_steps": max_steps, "epochs": max_steps / per_epoch if per_epoch else None,
              "steps_per_epoch": per_epoch, "tokens_per_epoch": per_epoch * tokens_per_step,
              "trained_tokens_per_epoch": round(rows.trained_tokens * taken / len(rows)) if len(rows) else 0}
    info = {**length, "start_step": 0, "global_batch": global_batch(cfg),
            "tokens_per_step": tokens_per_step, "world_size": fabric.world_size, "parameters": counts}
    if rank_zero:
        print(f"dsrun: global batch {global_batch(cfg)} = micro_batch {tr.micro_batch} x accumulation "
              f"{tr.accumulation} x data-parallel {data_parallel_size(cfg)} ({tokens_per_step:,} tokens/step); "
              f"{millions(counts['total'])} parameters, {millions(counts['trainable'])} trainable; "
              f"{fabric.world_size} x {fabric.device.type}, precision {cfg.precision.mode}", file=sys.stderr)
        if per_epoch:
            print(f"dsrun: {max_steps} steps = {length['epochs']:.2f} epochs of {per_epoch} steps "
                  f"({length['tokens_per_epoch']:,} tokens per epoch)", file=sys.stderr)
    checkpointer = Checkpointer(fabric, run_dir, tr.keep_checkpoints, adapter_only=cfg.adapter.method != "none")
    zero = torch.zeros((), device=fabric.device)
    run = Run(cfg=cfg, run_dir=run_dir, fabric=fabric, model=model, optimizer=optimizer, tokenizer=tokenizer,
              batches=batches, evaluator=evaluator, host_embedding=host_embedding,
              router_balance=RouterBalance(model, cfg.optim.router_bias_rate), checkpointer=checkpointer,
              state=checkpoint_state(fabric, model, optimizer), monitors=monitors, profiler=None, lr=lr,
              lr_at=None, horizon=max_steps, max_steps=max_steps, length=length, replicas=replicas,
              clip=grad_clip(cfg), flops=flops, peak_flops=peak_flops_per_s(cfg) * fabric.world_size,
              tokens_per_step=tokens_per_step, memory_cap=memory_cap, load_peak=load_peak,
              loss_sum=zero.clone(), trained_sum=zero.clone(), trained_steps=zero.clone(),
              skipped_in_a_row=torch.zeros((), dtype=torch.int64, device=fabric.device),
              skipped_seen=OneStepLate(fabric.device))
    if dpo:
        off = None if rows.reference is not None else fabric_unwrap(model).disable_adapter
        assert cfg.task.beta is not None and cfg.task.loss is not None  # conf/task/dpo.yaml; validate() checks them
        run.objective = PreferenceLoss(cfg.task.beta, cfg.task.loss, off, fabric.device)
        if eval_rows is not None:
            run.evaluator = PreferenceEvaluator(eval_rows, tr.micro_batch, dp_rank, dp, run.objective)
    resume(run)
    if grpo:  # after resume: the engine's compiled step reads the weights as they are from here on
        unwrapped = fabric_unwrap(model)
        off = unwrapped.disable_adapter if cfg.adapter.method != "none" else None
        inner = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        if rank_zero:
            print(describe_rollouts(cfg.task, tr.micro_batch, tr.accumulation), file=sys.stderr)
        assert isinstance(rows, Prompts)
        run.objective = GroupPolicy(cfg.task, tr.seed, inner, model, tokenizer, rows, tr.micro_batch * tr.accumulation,
                                    tr.seq_len + 1, off, rank_zero)
    if rank_zero:  # also when a run killed before its first checkpoint starts over in its folder
        run.history = truncate_metrics(run_dir / "metrics.jsonl", run.start_step)
    info["start_step"] = run.start_step
    run.lr_at = lr_factor(cfg.optim, run.horizon)
    monitors.start(info)
    run.last_checkpoint_time = time.time() if tr.checkpoint_every >= 0 else None  # the age alert needs no lie
    run.profiler = StepProfiler(tr.profile_steps, run_dir, fabric.global_rank, fabric.device, run.start_step)
    run.started = run.last_log_time = time.perf_counter()
    return run


def resume(run: Run) -> None:
    """From train.resume (auto: the latest checkpoint in the run folder): the weights, optimizer and scaler in place,
    and the counters, data position and schedule horizon as they were at that step."""
    tr = run.cfg.train
    resume_from = run.checkpointer.latest() if tr.resume == "auto" else None if tr.resume == "never" \
        else Path(tr.resume)
    if resume_from is None:
        return
    saved = run.checkpointer.load(resume_from, run.state)
    run.start_step, run.last_log_step = saved["step"], saved["last_log_step"]
    run.batches.load_state_dict(saved["data"])
    run.loss_sum.fill_(saved["loss_sum"])
    run.trained_sum.fill_(saved.get("trained_sum", 0.0))
    # a checkpoint from before the count: every step since the last log step counted
    run.trained_steps.fill_(saved.get("trained_steps", saved["step"] - saved["last_log_step"]))
    run.tokens_trained = saved.get("tokens_trained", 0.0)
    run.best_eval = saved.get("best_eval", run.best_eval)
    run.horizon = horizon_on_resume(run.cfg.optim, saved.get("horizon"), run.max_steps, run.start_step)
    if run.rank_zero:
        print(f"dsrun: resumed from {resume_from} at step {run.start_step}", file=sys.stderr)


def train_step(run: Run, step: int) -> Any:
    """One optimizer step: the learning rate of this step, the micro-batches (gradients reduced once, on the last),
    clipping, the step (skipped when the gradients are not finite). Returns the gradient norm before clipping (a
    device tensor); the loss and labelled-token sums and the skip streak stay on the device in `run`."""
    fabric, model, optimizer, tr = run.fabric, run.model, run.optimizer, run.cfg.train
    for group in optimizer.param_groups:  # set directly: DeepSpeed's ZeRO optimizers are no torch Optimizer
        group["lr"] = run.lr * run.lr_at(step - 1)
    # a Batch each; task=grpo turns them into its rollouts, task=dpo's objective reads them as pairs
    drawn: list[Any] = [next(run.batches) for _ in range(tr.accumulation)]
    if isinstance(run.objective, GroupPolicy):  # prompts -> completions, rewards, advantages; then the updates
        drawn = run.objective.rollout(model, drawn, step)
    dp = data_parallel_size(run.cfg)

    def to_inputs(inputs: torch.Tensor, labels: torch.Tensor, positions: Any = None) -> dict[str, Any]:
        # prepared on the host (packed documents' bounds, embedding rows kept in host memory), copied without a sync
        return model_inputs(inputs, labels, positions, fabric.device, run.host_embedding)

    # task=dpo/grpo: rows stay on the host, the objective makes their sequences (dsrun/preference.py, reinforce.py)
    objective = run.objective
    micro_batches: list[Any] = drawn if objective is not None else [to_inputs(*batch) for batch in drawn]
    # task=dpo/grpo: the step's loss is the mean over the global batch's pairs / completions
    rows = tr.micro_batch * tr.accumulation * dp * (objective.per_row if objective is not None else 1)
    # the step's loss is its token losses over every labelled token of the global batch (torchtune's
    # normalisation): counted from the labels up front, one all-reduce, no host sync
    labels = [batch[1] if objective is not None else batch["labels"] for batch in micro_batches]
    labelled = sum((label != IGNORE_INDEX).sum() for label in labels).float().to(fabric.device)
    if fabric.world_size > 1:
        labelled = all_reduce_(labelled) / run.replicas
    run.trained_sum += labelled
    run.trained_steps += labelled > 0  # a step with no labelled token has no loss: not counted in the mean
    labelled = labelled.clamp(min=1)
    for micro, batch in enumerate(micro_batches):
        # gradients are reduced once per optimizer step, not per micro-batch
        with micro_step(fabric, model, accumulating=micro < tr.accumulation - 1) as backward:
            # softmax in fp32 whatever the compute dtype (fp16 overflows), a chunk of the vocabulary's logits
            # at a time (dsrun/loss.py); position ids restart per packed document (dsrun/attention.py)
            if objective is not None:
                loss = objective(model, batch, to_inputs) / rows
            else:
                token_losses, _ = model(**batch)
                loss = token_losses / labelled
            backward(loss * dp)  # the gradient reduction averages over the data-parallel ranks: undo its 1/dp
        run.loss_sum += loss.detach()
    grad_norm, stepped = optimizer_step(fabric, optimizer, model.parameters(), run.clip)
    run.router_balance.update(stepped, all_reduce_)
    run.skipped_in_a_row = torch.where(stepped, 0, run.skipped_in_a_row + 1)
    run.grad_norm = grad_norm
    return grad_norm


def log(run: Run, step: int, grad_norm: Any, evaluating: bool) -> None:
    """The metrics of the log interval that ends at `step` (one host sync), an eval pass when due, and the best
    checkpoint when it improved."""
    fabric, tr = run.fabric, run.cfg.train
    assert tr.seq_len is not None  # resolve() fills it
    # each rank holds its share of each step's global mean: the sum over ranks, each batch counted once
    loss_sum = all_reduce_(run.loss_sum).item() / run.replicas
    steps_with_tokens = int(run.trained_steps.item())
    # None, not 0.0: an interval whose steps had no token to learn from (every label masked) has no loss
    mean_loss = loss_sum / steps_with_tokens if steps_with_tokens else None
    trained = run.trained_sum.item()
    run.tokens_trained += trained
    now = time.perf_counter()
    tokens_per_s = run.tokens_per_step * (step - run.last_log_step) / (now - run.last_log_time)
    metrics = {"step": step, "loss": mean_loss, "lr": run.optimizer.param_groups[0]["lr"],
               "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s,
               "trained_tokens_per_s": trained / (now - run.last_log_time),
               "samples_per_s": tokens_per_s / tr.seq_len,
               "mfu": tokens_per_s * run.flops / run.peak_flops if run.peak_flops else None,
               "tokens_seen": step * run.tokens_per_step, "tokens_trained": run.tokens_trained,
               **peak_memory_gib(fabric.device),
               "elapsed_s": now - run.started, "last_checkpoint_time": run.last_checkpoint_time}
    if run.objective is not None:  # dpo: rewards, margin, accuracy of the pairs; grpo: rewards, lengths, KL
        metrics.update(run.objective.metrics(all_reduce_))
    if evaluating and run.evaluator is not None:
        metrics.update(run.evaluator(run.model, fabric, run.host_embedding))
        if tr.keep_best and metrics["eval_loss"] < run.best_eval["loss"]:
            run.best_eval = {"loss": metrics["eval_loss"], "step": step}
            run.checkpointer.save(step, {**run.state, "step": step, "best_eval": run.best_eval,
                                         "horizon": run.horizon}, name="best")
    run.history.append(metrics)
    run.monitors.log(metrics)
    run.loss_sum.zero_()
    run.trained_sum.zero_()
    run.trained_steps.zero_()
    run.last_log_step, run.last_log_time = step, time.perf_counter()  # eval and saves are not training time


def save_checkpoint(run: Run, step: int) -> None:
    run.checkpointer.save(step, {**run.state, "step": step, "last_log_step": run.last_log_step,
                                 "loss_sum": run.loss_sum.item(), "data": run.batches.state_dict(),
                                 "trained_sum": run.trained_sum.item(), "tokens_trained": run.tokens_trained,
                                 "trained_steps": run.trained_steps.item(), "best_eval": run.best_eval, "horizon": run.horizon})
    run.last_checkpoint_time = time.time()


def finish(run: Run, stop: StopSignal, status: str, step: int) -> dict[str, Any]:
    """The one ending: the summary (summary.json, the monitors). A completed run also checks its last step's
    gradients and writes its final weights (a collective: every rank takes part); an interrupted one says what is on
    disk and keeps its signal handlers, so a second Ctrl-C does not cut the save short."""
    fabric, run_dir, cfg = run.fabric, run.run_dir, run.cfg
    weights = None
    if status == "completed":
        stop.restore()
    run.profiler.stop()
    if status == "completed":
        streak = int(run.skipped_in_a_row)  # the last step, which the loop saw only one step late
        if streak >= cfg.train.max_nonfinite_steps:
            raise TrainingDiverged(diverged_message(cfg, streak, run.max_steps, run.loss_sum, run.grad_norm,
                                                    run_dir))
    elif run.rank_zero:
        print(stopped_message(stop.name, step, run_dir), file=sys.stderr)
    wall = time.perf_counter() - run.started
    if isinstance(run.objective, GroupPolicy):
        run.objective.close()
    if status == "completed":
        final_weights = full_state_dict(fabric, run.model)  # collective: every rank takes part
        if run.rank_zero:
            weights = run_dir / "model"
            save_weights(fabric_unwrap(run.model), final_weights, weights, run.tokenizer)
    summary = summarize(run.history, wall, run_dir, global_batch(cfg), weights, status=status) | run.length
    if run.length["steps_per_epoch"]:  # the epochs trained, not those planned (a stopped run did fewer)
        summary["epochs"] = summary["steps"] / run.length["steps_per_epoch"]
    if status == "completed":
        summary["memory_cap_gib"] = run.memory_cap
        summary["load_peak_gib"] = run.load_peak
    if run.rank_zero:
        write_json(run_dir / "summary.json", summary)
    run.monitors.finish(summary)
    if status == "completed":
        fabric.barrier()
    return summary


def diverged_message(cfg: RunConfig, streak: int, step: int, loss_sum: torch.Tensor, grad_norm: Any,
                     run_dir: Path) -> str:
    """What went non-finite, and the advice that fits this precision and what is on disk (one host sync, on the
    way out)."""
    what = "the loss" if not torch.isfinite(loss_sum).item() else f"the gradient norm ({float(grad_norm)})"
    if PRECISIONS[cfg.precision.mode].loss_scaling:
        return (f"{what} was not finite for {streak} steps in a row (step {step}); those steps were skipped and no "
                f"weights with NaN/Inf were saved; {last_checkpoint_note(run_dir)}. fp16 overflows: train in a new "
                "folder with precision=bf16 (hydra.run.dir=...), and keep clipping on")
    found = latest_checkpoint_or_none(run_dir)
    then = (f"then continue from {found.name}: dsrun resume {run_dir} train.lr=<lower>" if found else
            f"no checkpoint was saved, so `dsrun resume {run_dir} train.lr=<lower>` starts over at step 0")
    return (f"{what} was not finite for {streak} steps in a row (step {step}); those steps were skipped and no "
            f"weights with NaN/Inf were saved; lower train.lr (now {cfg.train.lr}) and keep clipping on; {then}")


def latest_checkpoint_or_none(run_dir: Path) -> Path | None:
    try:
        return latest_checkpoint(run_dir)
    except UserError:
        return None


def stopped_message(name: str, step: int, run_dir: Path) -> str:
    """What a stop left on disk, read from the disk: a checkpoint at this step, an older one, or none."""
    found = latest_checkpoint_or_none(run_dir)
    head = f"dsrun: stopped by {name} after step {step}"
    if found is not None and found.name == f"step-{step:08d}":
        return f"{head}; checkpoint saved ({found}). Resume with: dsrun resume {run_dir}"
    if found is not None:
        saved = int(found.name.split("-")[1])
        return (f"{head}; no checkpoint was written now (train.checkpoint_every=-1): {step - saved} steps are not "
                f"saved; dsrun resume {run_dir} continues from {found.name}")
    return (f"{head}; no checkpoint was written (train.checkpoint_every=-1): all {step} steps are not saved and no "
            f"weights were written; dsrun resume {run_dir} starts over at step 0")


class OneStepLate:
    """A small device value read on the host one step after it was queued: a pinned copy behind a CUDA event.
    `.item()` on the value itself would wait for the whole step just queued, and the GPU would then idle while
    the host issues the next forward. Every rank reads the same step, so ranks still agree. CPU: no wait to save,
    the same one-step lag (one code path, tested on CPU)."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        self.host: torch.Tensor | None = None

    def swap(self, value: torch.Tensor) -> float:
        """Queue `value`; return the value queued by the previous call (0 at the first)."""
        if self.event is not None:
            self.event.synchronize()  # the previous step's copy: that step has run, or nearly
        previous = self.host.item() if self.host is not None else 0
        if self.host is None:
            self.host = torch.empty_like(value, device="cpu", pin_memory=self.event is not None)
        self.host.copy_(value.detach(), non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()
        return previous


class StopSignal:
    """SIGTERM/SIGINT (preemption, Ctrl-C, SLURM) ask the loop to finish its step, checkpoint and exit 0. The
    ranks agree through one tiny all-reduce per step, since a signal may reach only one of them; they read it one
    step late (OneStepLate), all at the same step."""

    def __init__(self, fabric: Any):
        self.fabric, self.name = fabric, ""
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.flag = torch.zeros((), device=fabric.device)
        self.agreed = OneStepLate(fabric.device)

    def _handle(self, signum: int, frame: Any) -> None:
        self.name = signal.Signals(signum).name

    def requested(self) -> bool:
        if self.fabric.world_size == 1:
            return bool(self.name)
        self.flag.fill_(float(bool(self.name)))  # fill_, not torch.tensor(...): a host-to-device copy syncs
        agreed = bool(self.agreed.swap(all_reduce_(self.flag, "max")))
        self.name = self.name or ("a signal to another rank" if agreed else "")
        return agreed

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


METRICS_SET_ASIDE = "metrics.set_aside.jsonl"


def truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the rows up to the resumed step: rows a killed run logged after its last checkpoint are replayed. What
    is not kept (those rows, and half a line a kill mid-write left) is set aside in metrics.set_aside.jsonl, never
    dropped; the file is replaced whole (written beside it, then renamed)."""
    if not path.is_file():
        return []
    kept, aside = [], []
    for line in path.read_text(errors="replace").splitlines():
        row = metrics_row(line)
        if row is not None and row["step"] <= step:
            kept.append(row)
        elif line.strip():
            aside.append(line)
    if aside:
        with (path.parent / METRICS_SET_ASIDE).open("a") as handle:
            handle.write("".join(line + "\n" for line in aside))
        print(f"dsrun: note: {len(aside)} line(s) of metrics.jsonl after step {step} or unreadable (steps to be "
              f"replayed, a line cut by a kill) moved to {METRICS_SET_ASIDE}", file=sys.stderr)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in kept))
    partial.replace(path)
    return kept


def peak_flops_per_s(cfg: RunConfig) -> float:
    """The dense bf16 rate of the GPU that runs the step, from the catalog (0 on CPU or an unknown card: no MFU).
    Under hardware.emulate that is the card found, not the one emulated: an RTX 3060 recipe proven on an H100 ran
    at the H100's rate (its MFU against the 3060's peak read 474 %)."""
    if cfg.hardware.accelerator != "cuda":
        return 0.0
    gpu = hardware.detect()["gpu"] if cfg.hardware.emulate else cfg.hardware.gpu
    spec = gpu_catalog().get(gpu or "")
    return spec["bf16_tflops"] * 1e12 if spec else 0.0


def load_peak_gib(device: torch.device) -> float | None:
    """The allocated peak so far (the model's build and placement); the step's peak is counted from here."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """Reserved is what decides an OOM; allocated is what tensors used (what most scripts report)."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_reserved(device) / 2**30,
                "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB: peak RSS


def fabric_unwrap(model: torch.nn.Module) -> CausalLM:
    """The transformers model inside Fabric's wrapper (and DDP's): save_pretrained lives there."""
    module = getattr(model, "module", model)
    return getattr(module, "module", module)


def summarize(history: list[dict[str, Any]], wall: float, run_dir: Path, batch: int,
              weights: Path | None, status: str = "completed") -> dict[str, Any]:
    if not history:
        return {"status": status, "run_dir": str(run_dir), "steps": 0, "wall_time_s": wall}
    # throughput of the steady state: the first log interval carries start-up (allocation, lazy init)
    steady = history[1:] or history
    last = history[-1]
    return {
        "status": status,
        "run_dir": str(run_dir),
        "steps": last["step"],
        "first_loss": next((m["loss"] for m in history if m["loss"] is not None), None),
        "final_loss": next((m["loss"] for m in reversed(history) if m["loss"] is not None), None),
        "tokens_per_s": sum(m["tokens_per_s"] for m in steady) / len(steady),
        "mfu": (sum(m["mfu"] for m in steady) / len(steady)) if last["mfu"] is not None else None,
        "peak_memory_gib": max(m["peak_memory_gib"] for m in history),
        "peak_allocated_gib": max(m.get("peak_allocated_gib", 0.0) for m in history) or None,
        "tokens_seen": last["tokens_seen"],
        **trained_and_eval(history, steady),
        "global_batch": batch,
        "wall_time_s": wall,
        "weights": str(weights) if weights else None,
    }


def trained_and_eval(history: list[dict[str, Any]], steady: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens trained on (labelled) beside tokens processed, and the eval losses: the last and the best."""
    out: dict[str, Any] = {}
    if "tokens_trained" in history[-1]:
        out["tokens_trained"] = history[-1]["tokens_trained"]
        out["trained_tokens_per_s"] = sum(m["trained_tokens_per_s"] for m in steady) / len(steady)
    evals = [m for m in history if "eval_loss" in m]
    if evals:
        best = min(evals, key=lambda m: m["eval_loss"])
        out.update(eval_loss=evals[-1]["eval_loss"], eval_ppl=evals[-1].get("eval_ppl"),
                   best_eval_loss=best["eval_loss"], best_eval_step=best["step"])
    return out
