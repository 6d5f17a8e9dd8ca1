"""The study machinery of train.py: any PEFT method as an arm, the published GIN preset, per-arm budgets, grid
extension at an edge, extra seeds at the best rate, paired differences, out-of-domain perplexity, cost per trial."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import single_thread, tiny, write_config  # noqa: F401 - pytest fixtures shared with test_train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import study_report  # noqa: E402

import train
from gin_adapter.compare.config import TrainingConfig
from gin_adapter.compare.report import control_differences, message_controls, summarize, verdict
from gin_adapter.compare.runs import next_trial, trial_from_id


def _result(run: str, lr: float, seed: int, ppl: float) -> dict:
    return {"trial": f"{run}__lr{lr:g}__seed{seed}", "run": run, "learning_rate": lr, "seed": seed, "final_val_ppl": ppl}


def test_schedule_sweeps_then_extends_an_edge_then_adds_seeds_at_the_best_rate():
    cfg = TrainingConfig.from_dict({"runs": [{"name": "a", "method": "lora", "lora": {"r": 2}}], "learning_rates": [1e-3, 3e-3],
                                    "seeds": [0], "extra_seeds": [1, 2], "extend_grid": 1})
    plans = {"a": None}
    results: list[dict] = []
    ppl = {1e-3: 12.0, 3e-3: 10.0, 9e-3: 11.0}  # best at the high edge of the grid, then bracketed by 9e-3
    order = []
    while (trial := next_trial(cfg, plans, results)) is not None:
        order.append((trial.lr, trial.seed))
        results.append(_result("a", trial.lr, trial.seed, ppl[trial.lr] + 0.1 * trial.seed))
    assert order == [(1e-3, 0), (3e-3, 0), (9e-3, 0), (3e-3, 1), (3e-3, 2)]


def test_a_trial_is_named_by_its_id_whatever_the_schedule_would_pick():
    """``train.py --trial``: the schedule, missing a finished extension's result, would pick another trial; the id
    names exactly one (any rate, any seed), and a malformed or unknown id says what is expected."""
    cfg = TrainingConfig.from_dict({"runs": [{"name": "a", "method": "lora", "lora": {"r": 2}}], "learning_rates": [1e-3, 3e-3],
                                    "seeds": [0], "extra_seeds": [1, 2], "extend_grid": 2})
    plans = {"a": None}
    # the study: 9e-3 extended the grid, 2.7e-2 bracketed it, the extra seeds ran at 9e-3; its seed 0 is missing
    results = [_result("a", 1e-3, 0, 12.0), _result("a", 3e-3, 0, 10.5), _result("a", 2.7e-2, 0, 10.8),
               _result("a", 9e-3, 1, 10.1), _result("a", 9e-3, 2, 10.2)]
    assert next_trial(cfg, plans, results).id == "a__lr0.003__seed1"  # 3e-3 now looks best: not the missing trial
    trial = trial_from_id(cfg, plans, "a__lr0.009__seed0")
    assert (trial.run.name, trial.lr, trial.seed, trial.id) == ("a", 9e-3, 0, "a__lr0.009__seed0")
    with pytest.raises(ValueError, match="not a trial of this config.*one of \\['a'\\]"):
        trial_from_id(cfg, plans, "b__lr0.01__seed0")
    with pytest.raises(ValueError, match="did you mean 'a__lr0.009__seed0'"):
        trial_from_id(cfg, plans, "a__lr9e-3__seed0")


def test_schedule_stops_extending_after_extend_grid_steps():
    cfg = TrainingConfig.from_dict({"runs": [{"name": "a", "method": "lora", "lora": {"r": 2}}], "learning_rates": [1e-3, 3e-3], "extend_grid": 1})
    results = [_result("a", 1e-3, 0, 12.0), _result("a", 3e-3, 0, 11.0), _result("a", 9e-3, 0, 10.0)]  # still at the edge
    assert next_trial(cfg, {"a": None}, results) is None


@pytest.mark.parametrize("fields,message", [
    (dict(method="peft"), "method=peft but no peft"),
    (dict(method="gin", gin={"preset": "paper"}), "only preset is 'published'"),
    (dict(method="lora", budget_reference="nope"), "budget_reference='nope' is not the name of a run"),
])
def test_study_fields_are_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig.from_dict({"runs": [{"name": "g", "method": "gin"}, {"name": "x", **fields}]})


def test_study_end_to_end_on_a_tiny_model(tiny: dict, tmp_path: Path, single_thread: None) -> None:  # noqa: F811
    """Two budgets (a small GIN and the published preset), each with its rank-matched LoRA, plus IA3 through
    method: peft; one rate extended past an edge, one extra seed at the best rate; an out-of-domain corpus."""
    ood = tmp_path / "ood.txt"
    ood.write_text("\n".join(["carl buys figs and dora eats bread ."] * 80) + "\n")
    runs = [
        {"name": "gin_small", "method": "gin", "gin": {"hidden_dim": 8, "node_features": "hidden"}, "baseline": "lora_small"},
        {"name": "lora_small", "method": "lora", "budget_reference": "gin_small"},
        {"name": "published", "method": "gin", "gin": {"preset": "published", "hidden_dim": 16, "graph": "gin"}, "baseline": "lora_big"},
        {"name": "lora_big", "method": "lora", "budget_reference": "published"},
        {"name": "ia3", "method": "peft", "peft": {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, "baseline": "lora_small"},
    ]
    config = write_config(tiny, tmp_path / "config.yaml", runs=runs, max_steps=4, eval_every=0, learning_rates=[1e-2], extend_grid=1,
                          extra_seeds=[1], budget={"tolerance": 0.2}, export_adapter_dtype="bfloat16",
                          ood={"source": "files", "files": [str(ood)], "block_size": 32, "max_val_blocks": 4})
    report = train.main(["--config", str(config)])
    summary, trials = report["summary"], {t["trial"]: t for t in report["trials"]}
    budget = report["budget"]["matches"]
    assert budget["lora_small"]["reference"] == "gin_small" and budget["lora_big"]["reference"] == "published"
    assert summary["lora_big"]["trainable_params"] > summary["lora_small"]["trainable_params"]  # two budgets, two ranks
    for name, s in summary.items():
        # a single rate is an edge: one extension each (by x3), then the extra seed at the better of the two
        assert s["grid"] == [1e-2, 3e-2] and s["n_seeds"] == 2, name
        assert {t["learning_rate"] for t in trials.values() if t["run"] == name} == {1e-2, 3e-2}
        assert s["ood_ppl_mean"] > 1 and s["peak_memory_mb"] > 0 and s["train_tokens_per_s"] > 0 and s["train_cpu_s_per_step"] > 0
    assert report["base"]["ood_perplexity"] > 1
    for trial in trials.values():  # what ran where: CPU, threads and the versions that decide the numbers
        assert trial["machine"]["versions"]["torch"] == torch.__version__ and trial["machine"]["cpu_model"]
        assert trial["machine"]["cpu_allocator"] != "system"  # the default, cpu_allocator: keep, was applied (or says why not)
    paired = summary["gin_small"]["paired_difference_to_baseline"]
    assert paired["n"] == 2 and paired["ci95_low"] <= paired["mean"] <= paired["ci95_high"]
    assert summary["ia3"]["method"] == "peft" and summary["ia3"]["paired_difference_to_baseline"]["n"] >= 1
    exported = json.loads((Path(report["config"]["output_dir"]) / "adapters" / "published" / "adapter_config.json").read_text())
    assert exported["block"] == "published" and exported["graph"] == "gin" and exported["node_features"] == "hidden"
    weights = load_file(Path(report["config"]["output_dir"]) / "adapters" / "published" / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}

    # scripts/study_report.py renders the same numbers from the files on disk, one table per budget
    text = study_report.report(Path(report["config"]["output_dir"]))
    assert "7 trial(s) finished" not in text and f"{len(report['trials'])} trial(s) finished" in text
    assert "The study is complete." in text
    assert f"torch {torch.__version__}" in text  # the machines section names the versions
    commit = next(iter(trials.values()))["machine"]["commit"] or "not recorded"
    assert f"- {commit}: `" in text  # and the commit each trial ran
    assert "## Compared with `lora_small`" in text and "## Compared with `lora_big`" in text
    row = next(line for line in text.splitlines() if line.startswith("| `gin_small` |"))
    assert f"{paired['mean']:+.3f} [{paired['ci95_low']:+.3f}, {paired['ci95_high']:+.3f}] (2 seeds)" in row
    assert f"{summary['gin_small']['val_ppl_mean']:.3f} +- {summary['gin_small']['val_ppl_std']:.3f} (2)" in row
    # --export writes the same best-seed adapters while a study runs, and names an arm whose trial adapter is gone
    out = Path(report["config"]["output_dir"])
    (out / "adapters" / "gin_small" / "adapter_model.safetensors").unlink()
    shutil.rmtree(out / "adapters" / "ia3" / "trials")  # as when its trials ran in another checkout
    record = json.loads((out / "adapters" / "ia3" / "study_trial.json").read_text())
    best = min((t for t in report["trials"] if t["run"] == "ia3" and t["learning_rate"] == summary["ia3"]["best_learning_rate"]),
               key=lambda t: t["final_val_ppl"])
    assert record["trial"] == best["trial"] and record["final_val_ppl"] == best["final_val_ppl"]
    assert study_report.export_finished(out)[1] == []  # exported before from the same trial: nothing missing
    (out / "adapters" / "ia3" / "study_trial.json").unlink()  # no record of which trial it came from
    exported, missing = study_report.export_finished(out)
    assert "gin_small" in exported and missing == ["ia3"]
    # train that trial again in a scratch copy of the study lacking only it; export from there, the study unchanged
    scratch = tmp_path / "retrain"
    assert study_report.prepare_missing(out, scratch) == [best["trial"]]
    assert {f.name for f in (scratch / "trials").glob("*.json")} == {f.name for f in (out / "trials").glob("*.json")} - {f"{best['trial']}.json"}
    with pytest.raises(FileExistsError, match="already holds a study"):
        study_report.prepare_missing(out, scratch)
    study_trials = {f.name: f.read_text() for f in (out / "trials").glob("*.json")}
    train.main(["--config", str(config), "--output-dir", str(scratch), "--resume", "--trial", best["trial"]])
    again = json.loads((scratch / "trials" / f"{best['trial']}.json").read_text())
    exported, missing = study_report.export_finished(out, retrained=[scratch])
    assert "ia3" in exported and missing == []
    record = json.loads((out / "adapters" / "ia3" / "study_trial.json").read_text())
    assert record["trial"] == best["trial"] and record["final_val_ppl"] == best["final_val_ppl"]
    assert record["retrained"]["final_val_ppl"] == again["final_val_ppl"] and record["retrained"]["machine"]["cpu_model"]
    assert {f.name: f.read_text() for f in (out / "trials").glob("*.json")} == study_trials
    row = next(line for line in study_report.report(out, with_next=False).splitlines() if line.startswith("| `ia3` | `"))
    assert f"| {best['final_val_ppl']:.4f} | {again['final_val_ppl']:.4f} |" in row and "trained again" in row
    config_file = scratch / "config.json"
    config_file.write_text(config_file.read_text().replace('"max_steps": 4', '"max_steps": 5'))
    (out / "adapters" / "ia3" / "study_trial.json").unlink()
    with pytest.raises(ValueError, match="was not prepared from"):
        study_report.export_finished(out, retrained=[scratch])
    rewritten = load_file(out / "adapters" / "gin_small" / "adapter_model.safetensors")
    assert {t.dtype for t in rewritten.values()} == {torch.bfloat16}

    # the curves at each arm's best rate: validation perplexity at every evaluated step, mean over its seeds
    curve = next(line for line in text.split("## Did training flatten?")[1].splitlines() if line.startswith("| `gin_small` ("))
    on_disk = [json.loads(f.read_text()) for f in (Path(report["config"]["output_dir"]) / "trials").glob("*.json")]
    at_best = [t for t in on_disk if t["run"] == "gin_small" and t["learning_rate"] == summary["gin_small"]["best_learning_rate"]]
    final = sum(t["curves"]["val_ppl"][-1][1] for t in at_best) / len(at_best)
    assert f"{at_best[0]['curves']['val_ppl'][-1][0]}: {final:.3f}" in curve and f"({len(at_best)})" in curve


def test_trials_record_the_commit_the_process_started_from(monkeypatch) -> None:
    """A study runs for hours while the checkout moves on: the commit is read once, at start, not when a trial ends."""
    import subprocess

    from gin_adapter.compare import machine as machine_module

    heads = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])

    def fake_git(command, **kwargs):
        stdout = next(heads) if "rev-parse" in command else ""
        return subprocess.CompletedProcess(command, 0, stdout=stdout, stderr="")

    monkeypatch.setattr(machine_module.subprocess, "run", fake_git)
    machine_module.source_commit.cache_clear()
    try:
        assert machine_module.source_commit() == "aaaaaaaaaaaa"  # train.main reads it at start
        assert machine_module.machine()["commit"] == "aaaaaaaaaaaa"  # a trial written after HEAD moved
    finally:
        machine_module.source_commit.cache_clear()


def _control_study() -> TrainingConfig:
    return TrainingConfig.from_dict({"learning_rates": [1e-3], "extend_grid": 0, "seeds": [0], "extra_seeds": [1, 2], "runs": [
        {"name": "lora", "method": "lora", "lora": {"r": 2}},
        {"name": "h", "method": "gin", "gin": {"node_features": "hidden", "hidden_dim": 8}, "baseline": "lora"},
        {"name": "h_ref", "method": "gin", "gin": {"node_features": "hidden", "hidden_dim": 8, "graph": "reference"}, "baseline": "lora"},
        {"name": "v_ref", "method": "gin", "gin": {"hidden_dim": 8, "graph": "reference"}},  # other features: no control of h
        {"name": "p", "method": "gin", "gin": {"preset": "published", "graph": "gin"}},
        {"name": "p_ref", "method": "gin", "gin": {"preset": "published"}},  # the preset's own graph is 'reference'
    ]})


def test_message_controls_pair_gin_runs_that_differ_only_in_graph():
    assert message_controls(_control_study()) == [("h", "h_ref"), ("p", "p_ref")]


def test_control_and_out_of_domain_differences_are_paired_over_seeds(tmp_path: Path, monkeypatch) -> None:
    cfg = _control_study()
    val = {"lora": [12.0, 12.2, 12.1], "h": [12.5, 12.9, 12.4], "h_ref": [12.3, 12.4, 12.6]}
    ood = {"lora": [50.0, 51.0, 52.0], "h": [49.0, 50.5, 50.0], "h_ref": [52.0, 52.0, 52.5]}
    trials = [{**_result(run, 1e-3, seed, val[run][seed]), "ood_ppl": ood[run][seed], "trainable_params": 10,
               "curves": {"val_ppl": [[0, 18.0], [50, 13.0], [100, val[run][seed]]]}, "machine": {}}
              for run in val for seed in range(3)]
    summary = summarize(cfg, trials)
    (row,) = control_differences(cfg, summary)  # p / p_ref have no trials yet
    assert (row["with_messages"], row["without_messages"]) == ("h", "h_ref")
    assert row["val_ppl"]["mean"] == pytest.approx((0.2 + 0.5 - 0.2) / 3) and row["val_ppl"]["n"] == 3
    assert row["ood_ppl"]["mean"] == pytest.approx((-3.0 - 1.5 - 2.5) / 3)
    assert summary["h"]["paired_ood_difference_to_baseline"]["mean"] == pytest.approx((-1.0 - 0.5 - 2.0) / 3)
    verdict_text = verdict(summary, 18.0, [row])
    assert "Messages: h is 0.167 ppl higher than h_ref (paired over 3 seeds; 95 % CI" in verdict_text

    # scripts/study_report.py renders both from the files on disk
    (tmp_path / "trials").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "base_eval.json").write_text(json.dumps({"perplexity": 18.0, "ood_perplexity": 60.0}))
    for trial in trials:
        (tmp_path / "trials" / f"{trial['trial']}.json").write_text(json.dumps(trial))
    text = study_report.report(tmp_path, with_next=False)
    d = row["val_ppl"]
    assert f"| `h` | `h_ref` | {d['mean']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}] (3 seeds) |" in text
    gap = next(line for line in text.split("## In-domain gain")[1].splitlines() if line.startswith("| `h` |"))
    assert gap.startswith(f"| `h` | {sum(val['h']) / 3 - 18.0:+.3f} | {sum(ood['h']) / 3 - 60.0:+.2f} | -1.167 [")
    # --plots: one figure per budget, of the arms whose seeds are all done (here all three of `lora`'s budget)
    drawn = {}
    monkeypatch.setattr("gin_adapter.analysis.plotting.plot_training_curves", lambda curves, path: drawn.setdefault(Path(path), curves) and Path(path))
    (tmp_path / "trials" / "h_ref__lr0.001__seed2.json").unlink()  # h_ref unfinished: left out
    assert study_report.write_curves(tmp_path) == [tmp_path / "curves_lora.png"]
    assert set(drawn[tmp_path / "curves_lora.png"]) == {"lora", "h"}
    assert drawn[tmp_path / "curves_lora.png"]["h"]["val_ppl"][-1][1] == min(val["h"])  # the best seed's trial


def test_readme_study_rows_are_rendered_from_the_committed_trials() -> None:
    """Every table row of the README's study section that names only finished arms (all seeds at the best rate,
    and the same for their LoRA) is a row scripts/study_report.py renders from results/study: a number copied into
    the README that the committed trial files do not hold fails here."""
    root = Path(__file__).resolve().parent.parent
    folder = root / "results" / "study"
    cfg, trials, _ = study_report.load_study(folder)
    finished = study_report.finished_arms(cfg, summarize(cfg, trials))
    baseline = {run.name: run.baseline for run in cfg.runs}
    rendered = set(study_report.report(folder, with_next=False).splitlines())
    section = (root / "README.md").read_text().split("### The study: `configs/study.yaml`")[1].split("\n### ")[0]
    shown = set()
    for row in (line for line in section.splitlines() if line.startswith("| `")):
        names = row.split("|")[1:3]
        arms = {part.split("`")[1] for part in names if part.strip().startswith("`")} & set(baseline)
        if arms and all(a in finished and (baseline[a] is None or baseline[a] in finished) for a in arms):
            assert row in rendered, f"README row not rendered from results/study (rerun scripts/study_report.py and copy it): {row}"
            shown |= arms
    missing = {a for a in finished if baseline[a] is None or baseline[a] in finished} - shown
    assert not missing, f"finished arms without their rows in the README's study section: {sorted(missing)}"


def test_committed_study_fits_in_60_mb() -> None:
    """results/study as committed (trials, results, plots, the best-seed adapters; not the ignored checkpoints, logs
    and per-trial adapters) stays within the 60 MB the study may take in the repository."""
    folder = Path(__file__).resolve().parent.parent / "results" / "study"
    ignored = ("checkpoints", "logs")
    total = sum(f.stat().st_size for f in folder.rglob("*")
                if f.is_file() and f.relative_to(folder).parts[0] not in ignored and "trials" not in f.relative_to(folder).parts[2:3])
    assert total <= 60e6, f"results/study holds {total / 1e6:.1f} MB; export the adapters in bfloat16 or drop what is not needed"
