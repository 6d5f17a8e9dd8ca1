"""Fine-tune a causal LM with a Sparse-GIN adapter or LoRA on the same data and budget, and compare perplexity.

The question this script answers: at the same number of trainable parameters, does Sparse-GIN fine-tuning
(Buehler 2025) reach a lower validation perplexity than LoRA?

    python train.py --config configs/quick.yaml                       # one process
    accelerate launch train.py --config configs/compare.yaml          # any Accelerate setup
    accelerate launch --num_processes 2 --cpu train.py --config configs/smoke.yaml
    python train.py --config configs/compare.yaml --resume            # continue after a crash
    python train.py --config configs/study.yaml --output-dir DIR --resume --trial gin_values__lr0.01__seed0   # one trial

One config (see gin_adapter/compare/config.py) lists runs (``method: gin`` or ``method: lora``), learning rates
and seeds. The script

1. builds the corpus once (split by document, tokenised, packed into blocks) and one validation loader that every
   method is scored on,
2. measures the base model's validation perplexity,
3. matches the LoRA rank to the GIN adapter's trainable-parameter count (gin_adapter/compare/budget.py),
4. trains every run x learning rate x seed (``train_one_run``) with checkpoints that survive a crash; each trial's
   step-0 perplexity is measured (and checked against the base model's where the adapter starts as the identity),
5. writes ``results.json``, ``curves.png``, ``scales.png`` and ``adapters/<run>/`` into ``output_dir`` and prints
   a summary: per run, the best learning rate by validation perplexity and the mean +- std over seeds there.

Perplexity is ``exp(total NLL / total label tokens)`` over the whole validation set, gathered across processes
(``evaluate_perplexity``), never a mean of batch means. Selecting the learning rate and reporting on the same
validation split flatters every method equally; the numbers compare methods, they are not test-set estimates.

This file is the experiment read top to bottom: parse, prepare, the training loop, report. The plumbing
(config schema, data, budgets, checkpoints, summary and report, Hub push) is in ``gin_adapter/compare/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, get_constant_schedule_with_warmup

from gin_adapter.compare.allocator import configure_cpu_allocator
from gin_adapter.compare.budget import plan_runs
from gin_adapter.compare.checkpoints import TrainerState, register_adapter_checkpointing, resume_latest, save_checkpoint
from gin_adapter.compare.checks import NonFiniteLossError, identity_at_init_warning, inject_non_finite, non_finite_message
from gin_adapter.compare.config import TrainingConfig
from gin_adapter.compare.data import build_datasets, build_ood_blocks, check_block_size, collate_blocks, train_order
from gin_adapter.compare.evaluation import evaluate_perplexity, load_metric
from gin_adapter.compare.launch import init_trackers, single_process_cpu_launch_warning
from gin_adapter.compare.machine import machine, source_commit
from gin_adapter.compare.memory import PeakMemory
from gin_adapter.compare.outputs import prepare_output_dir, write_json
from gin_adapter.compare.publish import push_best, reproduce_command
from gin_adapter.compare.report import build_report, write_report
from gin_adapter.compare.runs import Trial, gin_scales, load_base_model, next_trial, trial_from_id, wrap_model
from gin_adapter.embedded import resolve_model_path


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML experiment config, e.g. configs/quick.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set max_steps=10 --set runs.0.gin.hidden_dim=16 (repeatable)")
    parser.add_argument("--output-dir", help="overrides output_dir from the config")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="delete earlier results in output_dir and start over")
    parser.add_argument("--trial", dest="trials", action="append", default=[], metavar="ID",
                        help="train exactly this trial of the config (e.g. gin_values__lr0.01__seed0) instead of the schedule; "
                             "repeatable; with --resume a finished one is skipped (scripts/study_report.py --prepare-retrain)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="push the best GIN adapter with a model card to this repo")
    parser.add_argument("--push-run", metavar="RUN", help="which run to push (default: the best GIN run)")
    parser.add_argument("--hub-token", default=None, help="token for --push-to-hub (default: the cached login)")
    parser.add_argument("--hub-private", action="store_true", help="create the pushed repo as private")
    return parser.parse_args(argv)


@dataclass
class Context:
    """What every trial shares: the accelerator, the model source, the data and the output folder."""

    cfg: TrainingConfig
    accelerator: Accelerator
    model_path: str
    train_blocks: Any
    val_loader: DataLoader
    out: Path
    resume: bool
    base_ppl: float | None = None
    ood_loader: DataLoader | None = None  # an out-of-domain corpus scored after training (forgetting)


# ----------------------------------------------------------------------------- one trial = run x lr x seed
def _train_steps(trial: Trial, ctx: Context, model, optimizer, scheduler, batches, trainable: list, state: TrainerState, ckpt_root: Path,
                 started: float, last_ckpt: Path | None) -> None:
    """The optimiser steps from ``state.step`` to ``max_steps``: loss, backward, clipping, logging, evaluation every
    ``eval_every`` steps and at the end, checkpoints; ``state`` is updated in place. ``started`` is the
    ``time.perf_counter()`` the trial's training time counts from (earlier working periods included)."""
    cfg, accelerator = ctx.cfg, ctx.accelerator
    progress = tqdm(total=cfg.max_steps, initial=state.step, desc=trial.id, disable=not accelerator.is_local_main_process)
    model.train()
    step_loss = 0.0
    for batch in batches:
        inject = cfg.debug_non_finite if cfg.debug_non_finite_at_step == state.step + 1 and not ctx.resume else None
        with accelerator.accumulate(model):
            loss = inject_non_finite(model(**batch).loss, inject)
            global_loss = accelerator.reduce(loss.detach().float(), reduction="mean")  # every process sees the same value
            if not torch.isfinite(global_loss):
                raise NonFiniteLossError(non_finite_message("loss", global_loss.item(), state.step + 1, trial, last_ckpt, inject))
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                if not torch.isfinite(torch.as_tensor(grad_norm)):
                    raise NonFiniteLossError(non_finite_message("gradient norm", float(grad_norm), state.step + 1, trial, last_ckpt, inject))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        step_loss += global_loss.item() / cfg.gradient_accumulation_steps
        if not accelerator.sync_gradients:
            continue

        state.step += 1
        state.train_loss.append((state.step, step_loss))
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}")
        logs = {f"{trial.id}/train_loss": step_loss, f"{trial.id}/lr": scheduler.get_last_lr()[0]}
        if state.step % cfg.log_every == 0 and (scales := gin_scales(accelerator.unwrap_model(model))) is not None:
            state.scales.append((state.step, scales))
            logs[f"{trial.id}/mean_gin_scale"] = sum(scales) / len(scales)
        if (cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == cfg.max_steps:
            ppl = evaluate_perplexity(model, ctx.val_loader, accelerator)["perplexity"]
            state.val_ppl.append((state.step, ppl))
            logs[f"{trial.id}/val_ppl"] = ppl
            accelerator.print(f"[{trial.id}] step {state.step}: train loss {step_loss:.4f}, val ppl {ppl:.4f}")
        if state.step % cfg.log_every == 0 or f"{trial.id}/val_ppl" in logs:
            accelerator.log(logs, step=state.step)
        step_loss = 0.0
        state.elapsed_s = time.perf_counter() - started
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            last_ckpt = save_checkpoint(accelerator, ckpt_root, state, cfg.keep_checkpoints)
        if cfg.debug_crash_at_step == state.step and not ctx.resume:
            accelerator.print(f"[{trial.id}] debug_crash_at_step={state.step}: simulating a crash (os._exit)")
            sys.stdout.flush()
            os._exit(17)
        if state.step >= cfg.max_steps:
            break
    progress.close()
    if state.step < cfg.max_steps:
        raise RuntimeError(f"[{trial.id}] the training loader ran out at step {state.step} of {cfg.max_steps}.")


def train_one_run(trial: Trial, ctx: Context) -> dict[str, Any]:
    """Train one run at one learning rate and seed; return its metrics and curves (also written to trials/<id>.json)."""
    cfg, accelerator = ctx.cfg, ctx.accelerator
    ckpt_root = ctx.out / "checkpoints" / trial.id
    with PeakMemory(accelerator.device) as memory:  # peak over training and scoring; stopped on any exit
        set_seed(trial.seed)  # same seed -> same adapter init and the same data order for every method
        model = wrap_model(load_base_model(cfg, ctx.model_path), trial.plan)
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(trainable, lr=trial.lr, weight_decay=cfg.weight_decay)
        # Accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
        scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=cfg.warmup_steps * accelerator.num_processes)
        global_batch = cfg.per_device_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
        order = train_order(len(ctx.train_blocks), cfg.max_steps * global_batch, seed=trial.seed)
        train_loader = DataLoader(ctx.train_blocks.select(order), batch_size=cfg.per_device_batch_size, shuffle=False, collate_fn=collate_blocks)
        model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)

        state, resumed_from = resume_latest(accelerator, ckpt_root) if ctx.resume else (TrainerState(), None)
        resumed_step = state.step
        if resumed_from is not None:
            accelerator.print(f"[{trial.id}] resumed from {resumed_from} at step {state.step}")
        batches = accelerator.skip_first_batches(train_loader, state.step * cfg.gradient_accumulation_steps)

        accelerator.print(f"\n[{trial.id}] {trial.plan.method}: {n_trainable:,} trainable / {n_total:,} parameters, lr={trial.lr:g}, "
                          f"seed={trial.seed}, {cfg.max_steps} steps x {global_batch} blocks x {cfg.data.block_size} tokens")
        if state.step == 0:  # measured, not assumed: a broken identity at initialisation shows in the curves
            state.val_ppl.append((0, evaluate_perplexity(model, ctx.val_loader, accelerator)["perplexity"]))
            if (warning := identity_at_init_warning(trial, state.val_ppl[0][1], ctx.base_ppl)) is not None:
                accelerator.print(warning)
            if (scales := gin_scales(accelerator.unwrap_model(model))) is not None:
                state.scales.append((0, scales))

        started = time.perf_counter() - state.elapsed_s
        cpu_started = time.process_time()  # this working period's CPU time: unlike wall time, not inflated by pauses
        _train_steps(trial, ctx, model, optimizer, scheduler, batches, trainable, state, ckpt_root, started, last_ckpt=resumed_from)
        train_wall = time.perf_counter() - started
        train_cpu = time.process_time() - cpu_started
        ood_ppl = evaluate_perplexity(model, ctx.ood_loader, accelerator)["perplexity"] if ctx.ood_loader is not None else None

    adapter_dir = ctx.out / "adapters" / trial.run.name / "trials" / trial.id
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(str(adapter_dir), is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    wall = time.perf_counter() - started
    result = {
        "trial": trial.id, "run": trial.run.name, "method": trial.plan.method, "learning_rate": trial.lr, "seed": trial.seed,
        "final_val_ppl": state.val_ppl[-1][1], "best_val_ppl": min(v for _, v in state.val_ppl),
        "final_train_loss": state.train_loss[-1][1], "steps": state.step,
        "trainable_params": n_trainable, "total_params": n_total, "plan": trial.plan.to_dict(),
        "ood_ppl": ood_ppl, "peak_memory": memory.result(), "machine": machine(accelerator.device),
        "wall_time_s": wall, "train_tokens_per_s": state.step * global_batch * cfg.data.block_size / max(train_wall, 1e-9),
        # process CPU seconds of the steps this working period ran (all threads; with training evaluations)
        "train_cpu_s": train_cpu, "train_cpu_steps": state.step - resumed_step,
        "resumed_from": str(resumed_from) if resumed_from else None, "adapter_dir": str(adapter_dir.relative_to(ctx.out)),
        "curves": {"train_loss": state.train_loss, "val_ppl": state.val_ppl}, "scale_history": state.scales,
    }
    if accelerator.is_main_process:
        write_json(ctx.out / "trials" / f"{trial.id}.json", result)
    accelerator.wait_for_everyone()
    accelerator.free_memory(model, optimizer, train_loader, scheduler)
    return result


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    source_commit()  # read now: the commit of the code this process runs, recorded with every trial
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = TrainingConfig.from_yaml(args.config, overrides)
    allocator = configure_cpu_allocator(cfg.cpu_allocator)  # before the large allocations; recorded in every trial's machine info
    t_start = time.perf_counter()
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,  # None: the Accelerate config / launch flags decide
        log_with=cfg.log_with or None,
        project_dir=str(Path(cfg.output_dir) / "logs"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters)],
    )
    out = Path(cfg.output_dir)
    prepare_output_dir(cfg, out, args.resume, args.overwrite, accelerator)
    register_adapter_checkpointing(accelerator)
    accelerator.print(f"{accelerator.state}".strip() + f"\nCPU allocator: {allocator}")
    if (warning := single_process_cpu_launch_warning(accelerator.num_processes)) is not None:
        accelerator.print(warning)

    # Model source, limits and the parameter budget (checked before any weights are loaded).
    with accelerator.main_process_first():
        model_path = resolve_model_path(cfg.model)  # "embedded" -> converted local folder (converted once)
    model_config = AutoConfig.from_pretrained(model_path)
    check_block_size(cfg.data.block_size, model_config)
    plans, budget = plan_runs(cfg, model_config)
    for name, match in budget["matches"].items():
        accelerator.print(f"budget [{name} vs {match['reference']}]: GIN hidden_dim={match['hidden_dim']} -> {match['gin_params']:,} "
                          f"params; LoRA r={match['rank']} -> {match['lora_params']:,} params ({100 * match['relative_difference']:.2f} % apart)")

    # Data: one corpus, one validation loader for every method.
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with accelerator.main_process_first():
        train_blocks, val_blocks = build_datasets(cfg.data, tokenizer)
        load_metric()  # copy the metric script into the modules cache once
        ood_blocks = build_ood_blocks(cfg.ood, tokenizer) if cfg.ood is not None else None
    val_loader = accelerator.prepare_data_loader(DataLoader(val_blocks, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate_blocks))
    accelerator.print(f"data: {len(train_blocks)} training and {len(val_blocks)} validation blocks of {cfg.data.block_size} tokens"
                      + (f"; {len(ood_blocks)} out-of-domain blocks ({cfg.ood.source})" if ood_blocks is not None else ""))
    ctx = Context(cfg, accelerator, model_path, train_blocks, val_loader, out, args.resume)
    if ood_blocks is not None:
        ctx.ood_loader = accelerator.prepare_data_loader(DataLoader(ood_blocks, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate_blocks))
    init_trackers(accelerator, cfg, out)

    # The base model's perplexity (cached in base_eval.json so --resume does not redo it).
    base_file = out / "base_eval.json"
    if args.resume and base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        model = accelerator.prepare_model(load_base_model(cfg, model_path), evaluation_mode=True)
        t0 = time.perf_counter()
        base = evaluate_perplexity(model, val_loader, accelerator)
        base["wall_time_s"] = time.perf_counter() - t0
        if ctx.ood_loader is not None:
            base["ood_perplexity"] = evaluate_perplexity(model, ctx.ood_loader, accelerator)["perplexity"]
        accelerator.free_memory(model)
        if accelerator.is_main_process:
            write_json(base_file, base)
    ctx.base_ppl = base["perplexity"]
    accelerator.print(f"base model: validation perplexity {base['perplexity']:.4f} over {base['tokens']:,} tokens")

    # The sweep (every run x learning rate x seed), then grid extensions and extra seeds as the results ask;
    # finished trials are read back when resuming, so a study continues where it stopped.
    results = [json.loads(f.read_text()) for f in sorted((out / "trials").glob("*.json"))] if args.resume else []
    if results:
        accelerator.print(f"resuming: {len(results)} finished trial(s) read from {out / 'trials'}")
    if args.trials:  # exactly these trials (retraining one), whatever the schedule would pick next
        done = {r["trial"] for r in results}
        for trial in (trial_from_id(cfg, plans, trial_id) for trial_id in args.trials):
            if trial.id not in done:
                results.append(train_one_run(trial, ctx))
    else:
        while (trial := next_trial(cfg, plans, results)) is not None:
            results.append(train_one_run(trial, ctx))

    # Summary, results.json, plots, adapters; then the optional Hub push.
    report = build_report(cfg, results, base, budget, model_path, accelerator, t_start)
    write_report(cfg, report, out, accelerator)
    if args.push_to_hub and accelerator.is_main_process:
        push_best(cfg, report, model_path, accelerator, args.push_to_hub, run=args.push_run, token=args.hub_token,
                  private=args.hub_private, command=reproduce_command(args.config, args.overrides))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


if __name__ == "__main__":
    main()
