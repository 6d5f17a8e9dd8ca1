"""Where a train.py study stands, as Markdown: one table per parameter budget, every learning rate tried, what ran
where, and the next trial ``--resume`` would run. Works on a finished study and on one still running (it reads
``<output_dir>/trials/*.json``, ``config.json`` and ``base_eval.json``; it trains nothing).

    .venv/bin/python scripts/study_report.py results/study            # print
    .venv/bin/python scripts/study_report.py results/study --write    # also write <output_dir>/REPORT.md
    .venv/bin/python scripts/study_report.py results/study --export   # also export finished arms' best adapters
    .venv/bin/python scripts/study_report.py results/study --plots    # also write curves_<LoRA run>.png per budget

A best-seed adapter whose trial ran in another checkout (its JSON committed, its adapter not) is trained again
without touching the study's trials:

    .venv/bin/python scripts/study_report.py results/study --prepare-retrain /tmp/retrain
    OMP_NUM_THREADS=2 .venv/bin/python train.py --config configs/study.yaml --output-dir /tmp/retrain --resume --trial ID ...
    .venv/bin/python scripts/study_report.py results/study --export --adapters-from /tmp/retrain --write

Every number printed comes from the trial files, so the README's Results can be pasted from this output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gin_adapter.compare.config import TrainingConfig  # noqa: E402
from gin_adapter.compare.adapter_export import EXPORT_RECORD, export_adapters, needs_adapter, prepare_retrain  # noqa: E402
from gin_adapter.compare.report import control_differences, representative, summarize  # noqa: E402


def load_study(folder: Path) -> tuple[TrainingConfig, list[dict[str, Any]], dict[str, Any]]:
    """``(config, finished trials, base model evaluation)`` of a study folder."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SystemExit(f"{folder} has no config.json: is it the output_dir of a train.py run?")
    cfg = TrainingConfig.from_dict(json.loads(config_file.read_text()))
    trials = [json.loads(f.read_text()) for f in sorted((folder / "trials").glob("*.json"))]
    base_file = folder / "base_eval.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else {}
    return cfg, trials, base


def budget_groups(cfg: TrainingConfig) -> dict[str, list[str]]:
    """Runs grouped by the LoRA they are compared with: ``{baseline run: [it, and every run whose baseline it is]}``."""
    groups: dict[str, list[str]] = {}
    for run in cfg.runs:
        root = run.baseline or run.name
        groups.setdefault(root, [root] if root != run.name else [])
        if run.name not in groups[root]:
            groups[root].append(run.name)
    return groups


def next_trial_id(cfg: TrainingConfig, trials: list[dict[str, Any]]) -> str | None:
    """The trial ``train.py --resume`` would run next (``None``: the study is complete)."""
    from transformers import AutoConfig

    from gin_adapter.compare.budget import plan_runs
    from gin_adapter.compare.runs import next_trial
    from gin_adapter.embedded import resolve_model_path

    plans, _ = plan_runs(cfg, AutoConfig.from_pretrained(resolve_model_path(cfg.model)))
    trial = next_trial(cfg, plans, trials)
    return trial.id if trial is not None else None


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def budget_table(names: list[str], summary: dict[str, dict[str, Any]], base: dict[str, Any]) -> list[str]:
    """Markdown rows for one budget: the base model first, then each run of the group that has finished a trial."""
    base_ood = base.get("ood_perplexity")
    lines = [
        "| arm | trainable params | best lr (grid) | val ppl, mean +- std (seeds) | paired diff to its LoRA [95 % CI] | "
        "out-of-domain ppl (change vs base) | train tokens/s | CPU s / step | peak memory MB | min / trial |",
        "| --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    if base:
        lines.append(f"| base model | 0 | - | {base['perplexity']:.3f} | - | {_fmt(base_ood, '.2f')} | - | - | - | - |")
    for name in names:
        s = summary.get(name)
        if s is None:
            lines.append(f"| `{name}` | | not started | | | | | | | |")
            continue
        grid = ", ".join(f"{lr:g}" for lr in s["grid"])
        flags = (" **at edge**" if s["best_at_edge"] else "") + ("" if s["sweep_complete"] else " (sweep unfinished)")
        ppl = f"{s['val_ppl_mean']:.3f} +- {s['val_ppl_std']:.3f} ({s['n_seeds']})" if s["n_seeds"] > 1 else f"{s['val_ppl_mean']:.3f} (1)"
        paired = _paired(s.get("paired_difference_to_baseline"))
        ood = s.get("ood_ppl_mean")
        ood_text = f"{ood:.2f} ({ood - base_ood:+.2f})" if ood is not None and base_ood else _fmt(ood, ".2f")
        minutes = s.get("wall_time_s_per_trial")
        lines.append(
            f"| `{name}` | {s['trainable_params']:,} | {s['best_learning_rate']:g} ({grid}){flags} | {ppl} | {paired} | {ood_text} | "
            f"{_fmt(s.get('train_tokens_per_s'), '.0f')} | {_fmt(s.get('train_cpu_s_per_step'), '.1f')} | {_fmt(s.get('peak_memory_mb'), '.0f')} | "
            f"{_fmt(minutes and minutes / 60, '.1f')} |"
        )
    return lines


def _paired(diff: dict[str, float] | None) -> str:
    """A paired difference as a table cell: mean [95 % CI] (seeds)."""
    if diff is None:
        return "-"
    if diff["n"] < 2:
        return f"{diff['mean']:+.3f} (1 seed, no CI)"
    return f"{diff['mean']:+.3f} [{diff['ci95_low']:+.3f}, {diff['ci95_high']:+.3f}] ({diff['n']} seeds)"


def control_lines(controls: list[dict[str, Any]]) -> list[str]:
    """Each GIN arm against the same arm without messages (``graph: reference``, self-loops only)."""
    lines = ["| with messages | without (self-loops only) | val ppl difference [95 % CI] | out-of-domain ppl difference [95 % CI] |",
             "| --- | --- | --- | --- |"]
    lines += [f"| `{c['with_messages']}` | `{c['without_messages']}` | {_paired(c['val_ppl'])} | {_paired(c['ood_ppl'])} |" for c in controls]
    return lines


def generalisation_lines(summary: dict[str, dict[str, Any]], base: dict[str, Any]) -> list[str]:
    """In-domain gain next to out-of-domain change per arm (the paper's generalisation-gap claim), with the paired
    out-of-domain difference to the arm's LoRA."""
    lines = ["| arm | in-domain val ppl change vs base | out-of-domain ppl change vs base | out-of-domain difference to its LoRA [95 % CI] |",
             "| --- | ---: | ---: | --- |"]
    base_ppl, base_ood = base.get("perplexity"), base.get("ood_perplexity")
    for name, s in summary.items():
        gain = f"{s['val_ppl_mean'] - base_ppl:+.3f}" if base_ppl else "-"
        ood = f"{s['ood_ppl_mean'] - base_ood:+.2f}" if base_ood and s.get("ood_ppl_mean") is not None else "-"
        lines.append(f"| `{name}` | {gain} | {ood} | {_paired(s.get('paired_ood_difference_to_baseline'))} |")
    return lines


def learning_rate_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """Final validation perplexity at every learning rate tried (mean over the seeds run there)."""
    lines = ["| arm | " + "final val ppl by learning rate (seeds) |", "| --- | --- |"]
    for name, s in summary.items():
        cells = ", ".join(f"{lr}: {d['mean']:.3f} ({d['n']})" for lr, d in s["by_learning_rate"].items())
        lines.append(f"| `{name}` | {cells} |")
    return lines


def curve_lines(summary: dict[str, dict[str, Any]], trials: list[dict[str, Any]]) -> list[str]:
    """Whether training had flattened: validation perplexity at each evaluated step of every arm's trials at its
    best rate (mean over their seeds), and the drop over the second half of training."""
    lines = ["| arm (best lr) | val ppl by step (seeds) | last half's drop |", "| --- | --- | --- |"]
    for name, s in summary.items():
        at_best = [t for t in trials if t["run"] == name and t["learning_rate"] == s["best_learning_rate"]]
        by_step: dict[int, list[float]] = {}
        for trial in at_best:
            for step, ppl in trial["curves"]["val_ppl"]:
                by_step.setdefault(int(step), []).append(ppl)
        steps = sorted(by_step)
        means = {step: sum(v) / len(v) for step, v in by_step.items()}
        cells = ", ".join(f"{step}: {means[step]:.3f}" for step in steps)
        middle = min(steps, key=lambda step: abs(step - steps[-1] / 2)) if len(steps) > 2 else None
        drop = f"{(means[middle] - means[steps[-1]]) / means[middle]:.1%} (step {middle} -> {steps[-1]})" if middle else "-"
        lines.append(f"| `{name}` ({s['best_learning_rate']:g}) | {cells} ({len(at_best)}) | {drop} |")
    return lines


FLATTEN_NOTE = (
    "Step 0 is the wrapped model before training: the base model's perplexity for every arm that starts as the "
    "identity; `GinConfig.published()` starts with the published per-layer scales (0 in the first layer to 0.5 in "
    "the last), so it starts above it."
)

CONTROL_NOTE = (
    "Each pair has the same GinConfig except `graph`: `gin` sums the node features of the attention graph's "
    "neighbours, `reference` only each token's own (self-loops, the published code's behaviour). The difference is "
    "paired over seeds (same data order, same validation blocks), each arm at its own best learning rate; a negative "
    "value means the messages lowered perplexity."
)

OOD_NOTE = (
    "The paper claims GIN narrows the gap between training and unseen data. Here: each arm's change of in-domain "
    "validation perplexity from the base model next to its change on the out-of-domain corpus (never trained on), "
    "and the out-of-domain difference to the LoRA of its budget, paired over seeds (negative: less forgetting, or "
    "more transfer, than that LoRA)."
)

ADAPTER_NOTE = (
    "`adapters/<arm>/` holds each finished arm's best seed at its best learning rate (bf16 safetensors, "
    "`study_trial.json` naming the trial). A trial that ran in a checkout that was not kept was trained again from "
    "the same config, seed, data order and validation set (`--prepare-retrain`, then `train.py --resume --trial`): the "
    "study's numbers are its first run; re-scoring the committed adapter gives the retrained run's perplexity, which "
    "differs from the first by float rounding carried through 100 steps: other CPUs, other kernels (the commit, and "
    "docs/benchmarks.md for what changed between commits; tested equal to 1e-5 per step, not per trial)."
)

COST_NOTE = (
    "Cost columns (medians over the arm's trials at its best rate): tokens/s and minutes are wall-clock on a shared "
    "machine and include any time the study was paused for a benchmark or slowed by tests running beside it; "
    "CPU s / step is the process's CPU time per training step (evaluations at steps 50 and 100 included, all "
    "threads), which pauses do not inflate; '-' for trials recorded before it was."
)


def machines(trials: list[dict[str, Any]]) -> list[str]:
    """What ran where: CPU model, threads and device, with the number of trials each."""
    seen: dict[str, int] = {}
    for t in trials:
        m = t.get("machine") or {}
        flags = ", ".join(f for f in ("avx512", "avx512_bf16", "amx") if m.get(f)) or "no AVX-512"
        key = f"{m.get('cpu_model', '?')} ({flags}), {m.get('torch_threads', '?')} threads, {m.get('device', '?')}"
        libraries = m.get("versions") or {}
        key += "; " + (", ".join(f"{name} {libraries[name]}" for name in ("torch", "transformers", "peft") if libraries.get(name))
                       if libraries else "library versions not recorded (trials before they were)")
        seen[key] = seen.get(key, 0) + 1
    lines = [f"- {key}: {count} trial(s)" for key, count in seen.items()]
    commits: dict[str, list[str]] = {}
    for t in trials:
        commits.setdefault((t.get("machine") or {}).get("commit") or "not recorded", []).append(t["trial"])
    lines += ["", "Source commit of the code each trial ran. Kernels changed between some of them: each change is tested to "
              "give the replaced code's values and gradients (to 1e-5), but such differences can grow over a trial, and "
              "the speeds differ:", ""]
    lines += [f"- {commit}: {', '.join(f'`{name}`' for name in sorted(names))}" for commit, names in commits.items()]
    return lines


def report(folder: Path, with_next: bool = True) -> str:
    cfg, trials, base = load_study(folder)
    summary = summarize(cfg, trials)
    lines = [f"# Study status: `{folder}`", "", f"{len(trials)} trial(s) finished."]
    if with_next:
        upcoming = next_trial_id(cfg, trials)
        lines.append(f"Next trial: `{upcoming}`." if upcoming else "The study is complete.")
    for root, names in budget_groups(cfg).items():
        lines += ["", f"## Compared with `{root}`", ""] + budget_table(names, summary, base)
    lines += ["", COST_NOTE]
    lines += ["", "## Do messages along the graph matter?", "", CONTROL_NOTE, ""] + control_lines(control_differences(cfg, summary))
    lines += ["", "## In-domain gain and out-of-domain change", "", OOD_NOTE, ""] + generalisation_lines(summary, base)
    lines += ["", "## Every learning rate", ""] + learning_rate_lines(summary)
    lines += ["", "## Did training flatten?", "", FLATTEN_NOTE, ""] + curve_lines(summary, trials)
    lines += ["", "## The committed adapters", "", ADAPTER_NOTE, ""] + adapter_lines(folder, cfg, summary, trials)
    lines += ["", "## Where the trials ran", ""] + machines(trials)
    return "\n".join(lines) + "\n"


def adapter_lines(folder: Path, cfg: TrainingConfig, summary: dict[str, dict[str, Any]], trials: list[dict[str, Any]]) -> list[str]:
    """One row per finished arm: the trial its committed adapter (``adapters/<run>/``) holds, the trial's validation
    perplexity in the study and, for an adapter trained again (``retrained`` in its record), the retrained one's."""
    lines = ["| arm | trial | val ppl in the study | the committed adapter's val ppl | trained on, code |", "| --- | --- | ---: | ---: | --- |"]
    for name, trial in representative(finished_arms(cfg, summary), trials, cfg).items():
        record_file = folder / "adapters" / name / EXPORT_RECORD
        record = json.loads(record_file.read_text()) if record_file.is_file() else None
        if record is None or record["trial"] != trial["trial"]:
            lines.append(f"| `{name}` | `{trial['trial']}` | {trial['final_val_ppl']:.4f} | not exported | - |")
            continue
        again = record.get("retrained")
        own = again or record
        recorded = own.get("machine") or {}
        where = _cpu(recorded) + f", commit {recorded.get('commit') or '?'}" + (", trained again" if again else "")
        lines.append(f"| `{name}` | `{trial['trial']}` | {trial['final_val_ppl']:.4f} | {own['final_val_ppl']:.4f} | {where} |")
    return lines


def _cpu(machine: dict[str, Any]) -> str:
    """``AMD EPYC (AVX-512)``: the CPU model and its widest vector extension, as recorded with a trial."""
    widest = "AMX" if machine.get("amx") else "AVX-512" if machine.get("avx512") else "AVX2" if machine.get("avx2") else None
    return machine.get("cpu_model", "?") + (f" ({widest})" if widest else "")


def export_finished(folder: Path, dtype: str = "bfloat16", retrained: list[Path] | None = None) -> tuple[list[str], list[str]]:
    """Export the best-seed adapter (``adapters/<run>/``, as train.py does when the study completes) of every arm
    that has all its seeds at its best rate (train.py runs the extra seeds only once that rate is settled), so it
    can be committed as soon as it is final; a trial adapter not in this checkout is taken from the scratch
    studies ``retrained`` (:func:`prepare_missing`) where it was trained again.
    ``dtype``: the config's ``export_adapter_dtype`` (``config.json`` does not keep it; configs/study.yaml's is
    bfloat16). Returns ``(exported, missing)``: the runs written, and those whose trial adapter is not in this
    checkout."""
    cfg, trials, _ = load_study(folder)
    cfg = dataclasses.replace(cfg, export_adapter_dtype=dtype)
    chosen = representative(finished_arms(cfg, summarize(cfg, trials)), trials, cfg)
    missing = export_adapters(cfg, chosen, folder, retrained or ())
    return [name for name in chosen if name not in missing], missing


def prepare_missing(folder: Path, scratch: Path) -> list[str]:
    """A scratch copy of the study lacking only the trials of the finished arms' best-seed adapters that are neither
    in this checkout nor exported (``train.py --resume`` on it trains them again; the study's trials stay as they
    are). Returns those trial ids."""
    cfg, trials, _ = load_study(folder)
    chosen = representative(finished_arms(cfg, summarize(cfg, trials)), trials, cfg)
    wanted = [trial["trial"] for name, trial in chosen.items() if needs_adapter(name, trial, folder)]
    return prepare_retrain(folder, wanted, scratch) if wanted else []


def finished_arms(cfg: TrainingConfig, summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The summary of the arms that have all their seeds at their best rate (train.py runs the extra seeds only
    once that rate is settled, so these rows are final)."""
    seeds = len(cfg.seeds) + len(cfg.extra_seeds)
    return {name: s for name, s in summary.items() if s["n_seeds"] >= seeds}


def write_curves(folder: Path) -> list[Path]:
    """``curves_<LoRA run>.png`` per budget: training loss and validation perplexity of the best-seed trial of each
    finished arm at its best rate (train.py's ``curves.png`` holds every arm once the study is complete)."""
    from gin_adapter.analysis.plotting import plot_training_curves

    cfg, trials, _ = load_study(folder)
    chosen = representative(finished_arms(cfg, summarize(cfg, trials)), trials, cfg)
    written = []
    for root, names in budget_groups(cfg).items():
        curves = {name: chosen[name]["curves"] for name in names if name in chosen}
        if curves:
            written.append(plot_training_curves(curves, folder / f"curves_{root}.png"))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default="results/study", help="the study's output_dir")
    parser.add_argument("--write", action="store_true", help="also write <folder>/REPORT.md")
    parser.add_argument("--no-next", action="store_true", help="do not work out the next trial (needs the model's config)")
    parser.add_argument("--export", nargs="?", const="bfloat16", choices=["bfloat16", "float32"],
                        help="also export the best-seed adapter of every arm whose seeds are all done, in this dtype (default bfloat16)")
    parser.add_argument("--adapters-from", type=Path, action="append", default=[], metavar="DIR",
                        help="with --export: a scratch study (--prepare-retrain) holding trial adapters this checkout lacks (repeatable)")
    parser.add_argument("--prepare-retrain", type=Path, metavar="DIR",
                        help="copy the study into DIR without the trials whose best-seed adapters are missing, then exit")
    parser.add_argument("--plots", action="store_true", help="also write curves_<LoRA run>.png per budget (finished arms)")
    args = parser.parse_args(argv)
    if args.prepare_retrain:
        wanted = prepare_missing(Path(args.folder), args.prepare_retrain)
        trials = " ".join(f"--trial {trial}" for trial in wanted)
        sys.stderr.write(f"{args.prepare_retrain}: the study without {', '.join(wanted)}; train them again with\n"
                         f"  train.py --config <the study's YAML> --output-dir {args.prepare_retrain} --resume {trials}\n"
                         f"then: scripts/study_report.py {args.folder} --export --adapters-from {args.prepare_retrain}\n"
                         if wanted else "every finished arm's best-seed adapter is here or exported: nothing to retrain\n")
        return
    if args.plots:
        sys.stderr.write("wrote " + ", ".join(str(path) for path in write_curves(Path(args.folder))) + "\n")
    if args.export:
        exported, missing = export_finished(Path(args.folder), args.export, args.adapters_from)
        sys.stderr.write(f"exported adapters/<run>/ for: {', '.join(exported) or 'none'}\n")
        if missing:
            sys.stderr.write(f"not exported, trial adapter not in this checkout: {', '.join(missing)}\n")
    text = report(Path(args.folder), with_next=not args.no_next)
    if args.write:
        (Path(args.folder) / "REPORT.md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
