"""train.py end to end on a tiny random Llama: perplexity, learning, 1 vs 2 processes, crash + resume, NaN, Hub push.

The tiny model (2 layers, width 32, weights drawn by this file rather than by transformers' initialisation) and its
word-level tokenizer are built offline into a temp folder; the corpus is a few hundred synthetic sentences with
learnable structure. Runs use one CPU thread (tiny matmuls are fastest that way, and the numbers are then exactly
reproducible within a machine). Results computed along different paths (2 processes vs 1, accumulation vs one
batch) are compared with a tolerance, since their float32 sums are ordered differently; nothing relies on a
particular CPU's rounding.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from fake_hub import fake_hub  # noqa: E402, F401 - a pytest fixture (tests/ is on sys.path through conftest.py)
from gin_adapter.compare.budget import RunPlan  # noqa: E402
from gin_adapter.compare.checkpoints import TRAINER_STATE, complete_checkpoints  # noqa: E402
from gin_adapter.compare.checks import NonFiniteLossError  # noqa: E402
from gin_adapter.compare.data import collate_blocks  # noqa: E402
from gin_adapter.compare.evaluation import evaluate_perplexity, sequence_nll  # noqa: E402
from gin_adapter.compare.launch import single_process_cpu_launch_warning  # noqa: E402
from gin_adapter.compare.metrics import perplexity as perplexity_module  # noqa: E402
from gin_adapter.compare.report import summarize  # noqa: E402

STEPS = 12


# ----------------------------------------------------------------------------- tiny model, corpus, configs
def synthetic_documents(n_docs: int = 300, seed: int = 0) -> list[str]:
    """Short documents with repeated structure ("X likes Y and X likes more Y ."), so a tiny model can learn."""
    rng = random.Random(seed)
    names = ["anna", "ben", "carl", "dora", "emil", "fay"]
    foods = ["apples", "bread", "cheese", "dates", "eggs", "figs"]
    verbs = ["likes", "hates", "eats", "buys"]
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            n, v, f = rng.choice(names), rng.choice(verbs), rng.choice(foods)
            sentences.append(f"{n} {v} {f} and {n} {v} more {f} .")
        docs.append(" ".join(sentences))
    return docs


def build_tiny_setup(root: Path) -> tuple[Path, Path]:
    """Save a tiny random Llama + word-level tokenizer to ``root/model`` and the corpus to ``root/docs.txt``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    docs = synthetic_documents()
    (root / "docs.txt").write_text("\n".join(docs) + "\n")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # Our own draw, in name order: the weights (and so every curve below) do not change with how or in which order a
    # transformers release initialises modules.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.fill_(1.0) if param.dim() == 1 else param.normal_(0.0, 0.02, generator=generator)  # RMSNorm gains: 1
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model", root / "docs.txt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    model_dir, docs = build_tiny_setup(root)
    return {"root": root, "model": str(model_dir), "docs": str(docs)}


def write_config(tiny: dict, path: Path, **overrides) -> Path:
    cfg = {
        "model": tiny["model"],
        "output_dir": str(path.parent / "out"),
        "data": {"source": "files", "files": [tiny["docs"]], "block_size": 32, "val_fraction": 0.2},
        "runs": [{"name": "gin", "method": "gin", "gin": {"hidden_dim": 8}}, {"name": "lora", "method": "lora"}],
        "learning_rates": [1.0e-2],
        "seeds": [0],
        "max_steps": STEPS,
        "per_device_batch_size": 4,
        "eval_batch_size": 8,
        "warmup_steps": 3,
        "eval_every": 6,
    }
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def single_thread():
    """One CPU thread, and a fresh Accelerate state for every in-process ``train.main`` call."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


def run_subprocess(args: list[str], cwd: Path = ROOT, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra_env}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference_run(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted single-process run (GIN + LoRA), shared by several tests."""
    from accelerate.state import AcceleratorState, GradientState

    work = tmp_path_factory.mktemp("reference")
    config = write_config(tiny, work / "config.yaml", checkpoint_every=4, log_with=["tensorboard"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        report = train.main(["--config", str(config)])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(threads)
    return {"report": report, "config": config, "out": work / "out"}


# ----------------------------------------------------------------------------- perplexity
def test_perplexity_metric_loads_offline_and_matches_direct_computation() -> None:
    code = (
        "import evaluate, json, math, random\n"
        f"m = evaluate.load({perplexity_module.__file__!r}, keep_in_memory=True)\n"
        "rng = random.Random(0)\n"
        "nll = [rng.uniform(0, 50) for _ in range(20)]; tok = [rng.randint(1, 30) for _ in range(20)]\n"
        "for i in range(0, 20, 7): m.add_batch(predictions=nll[i:i+7], references=tok[i:i+7])\n"
        "print(json.dumps({'metric': m.compute(), 'direct': math.exp(sum(nll) / sum(tok))}))\n"
    )
    proc = run_subprocess([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["metric"]["perplexity"] == pytest.approx(out["direct"], rel=1e-12)


def test_evaluate_perplexity_equals_token_weighted_model_loss(tiny: dict, single_thread: None) -> None:
    """Corpus ppl = exp(sum NLL / tokens) from the model's own loss, with unequal token counts per batch."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    torch.manual_seed(0)
    blocks = [{"input_ids": torch.randint(3, model.config.vocab_size, (16,)).tolist()} for _ in range(7)]
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(blocks, batch_size=3, collate_fn=collate_blocks))  # batches of 3, 3, 1
    got = evaluate_perplexity(model, loader, accelerator)

    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, 7, 3):
            ids = torch.tensor([b["input_ids"] for b in blocks[i : i + 3]])
            loss = model(input_ids=ids, labels=ids).loss.item()  # mean over this batch's label tokens
            tokens = ids.shape[0] * (ids.shape[1] - 1)
            total_nll, total_tokens = total_nll + loss * tokens, total_tokens + tokens
    assert got["tokens"] == total_tokens == 7 * 15
    assert got["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)


def test_sequence_nll_ignores_masked_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    labels[1, 3:] = -100
    nll, tokens = sequence_nll(logits, labels)
    assert tokens.tolist() == [4, 2]
    expected = torch.nn.functional.cross_entropy(logits[1, :2], labels[1, 1:3], reduction="sum")
    assert nll[1].item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------- a full run
def test_run_learns_and_writes_results(reference_run: dict) -> None:
    report, out = reference_run["report"], reference_run["out"]
    results = json.loads((out / "results.json").read_text())
    base = results["base"]["perplexity"]
    for name in ("gin", "lora"):
        losses = [v for _, v in results["curves"][name]["train_loss"]]
        steps, ppls = zip(*results["curves"][name]["val_ppl"], strict=True)
        assert steps == (0, 6, 12)
        # Step 0 is measured; zero-initialised adapters reproduce the base model (to float32 noise, not bit for bit).
        assert ppls[0] == pytest.approx(base, rel=1e-4)
        # Learning, with no margin tuned to one machine's numbers: the validation perplexity (the same blocks every
        # time) falls at each evaluation, and the training loss (a new batch each step) ends below where it began.
        assert ppls[2] < ppls[1] < ppls[0], (name, ppls)
        assert sum(losses[-3:]) < sum(losses[:3]), (name, losses)
        assert results["summary"][name]["val_ppl_mean"] == ppls[-1] < base
        assert (out / "adapters" / name / "adapter_config.json").is_file()
    # matched budgets, recorded
    counts = results["budget"]["trainable_params"]
    assert abs(counts["lora"] - counts["gin"]) / counts["gin"] <= 0.05
    assert results["summary"]["gin"]["trainable_params"] == counts["gin"]
    # scales per layer over training, for the GIN run only
    history = results["scale_history"]["gin"]
    assert history[0] == [0, [0.0, 0.0]] and len(history[-1][1]) == 2 and history[-1][0] == STEPS
    assert set(results["scale_history"]) == {"gin"}
    assert (out / "curves.png").stat().st_size > 1000 and (out / "scales.png").stat().st_size > 1000
    assert {"torch", "transformers", "peft", "accelerate"} <= set(results["versions"])
    assert results["wall_time_s"] > 0 and results["config"]["max_steps"] == STEPS
    assert report["summary"] == results["summary"]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "the tensorboard tracker wrote nothing"


def test_push_to_hub_from_the_command_line_loads_back_from_the_hub(tiny: dict, tmp_path: Path, fake_hub, single_thread: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.main([..., "--push-to-hub", ...])`` against the local fake Hub (tests/fake_hub.py, real HTTP), then
    ``PeftModel.from_pretrained`` from that Hub gives the logits of the best GIN adapter saved locally."""
    import datasets
    from huggingface_hub import model_info
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import gin_adapter  # noqa: F401  (registers the GIN PEFT type)

    # datasets pings its download counter for packaged builders (here: text) unless offline; not part of the push
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
    runs = [{"name": "gin", "method": "gin", "gin": {"hidden_dim": 8}}, {"name": "lora", "method": "lora", "lora": {"r": 2}}]
    config = write_config(tiny, tmp_path / "config.yaml", runs=runs, eval_every=0)
    report = train.main(["--config", str(config), "--set", "max_steps=4", "--push-to-hub", "user/gin-tiny", "--hub-private"])

    files = fake_hub.files("user/gin-tiny")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert json.loads(files["adapter_config.json"])["peft_type"] == "GIN"
    card = files["README.md"].decode()
    assert f"| val_ppl | {report['summary']['gin']['val_ppl_mean']:.6g} |" in card
    assert f"| lora_val_ppl | {report['summary']['lora']['val_ppl_mean']:.6g} |" in card
    assert f"python train.py --config {config} --set max_steps=4" in card  # the card reproduces this very run
    assert model_info("user/gin-tiny").private is True

    ids = torch.arange(2 * 12).reshape(2, 12) % 19 + 3
    with torch.no_grad():
        pushed = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), "user/gin-tiny").eval()(input_ids=ids).logits
        local_dir = tmp_path / "out" / "adapters" / "gin"
        local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), str(local_dir)).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()(input_ids=ids).logits
    assert ("GET", "/user/gin-tiny/resolve/main/adapter_model.safetensors") in fake_hub.requests
    assert torch.allclose(pushed, local, rtol=0, atol=1e-6)
    assert not torch.allclose(local, base, rtol=0, atol=1e-6), "the trained adapter must change the logits"
    assert fake_hub.unhandled == [] and fake_hub.blocked_hosts == []


def test_saved_adapters_reload_to_the_same_perplexity(reference_run: dict, tiny: dict, single_thread: None) -> None:
    from accelerate import Accelerator
    from peft import PeftModel
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gin_adapter  # noqa: F401  (registers the GIN PEFT type)
    from gin_adapter.compare.config import TrainingConfig
    from gin_adapter.compare.data import build_datasets

    cfg = TrainingConfig.from_yaml(reference_run["config"])
    _, val = build_datasets(cfg.data, AutoTokenizer.from_pretrained(tiny["model"]))
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(val, batch_size=8, collate_fn=collate_blocks))
    results = json.loads((reference_run["out"] / "results.json").read_text())
    for name in ("gin", "lora"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), str(reference_run["out"] / "adapters" / name))
        ppl = evaluate_perplexity(model, loader, accelerator)["perplexity"]
        assert ppl == pytest.approx(results["summary"][name]["val_ppl_mean"], rel=1e-5)


def test_output_dir_is_not_overwritten_silently(reference_run: dict, single_thread: None) -> None:
    with pytest.raises(ValueError, match="already holds results; pass --resume"):
        train.main(["--config", str(reference_run["config"])])


def test_summary_picks_best_learning_rate_and_averages_seeds() -> None:
    from gin_adapter.compare.config import TrainingConfig

    cfg = TrainingConfig.from_dict({"runs": [{"name": "lora", "method": "lora", "lora": {"r": 2}}], "learning_rates": [1e-3, 1e-2], "seeds": [0, 1]})
    trials = [{"run": "lora", "learning_rate": lr, "seed": s, "final_val_ppl": p, "trainable_params": 10}
              for lr, s, p in [(1e-3, 0, 10.0), (1e-3, 1, 12.0), (1e-2, 0, 9.0), (1e-2, 1, 9.5)]]
    s = summarize(cfg, trials)["lora"]
    assert s["best_learning_rate"] == 1e-2 and s["n_seeds"] == 2
    assert s["val_ppl_mean"] == pytest.approx(9.25) and s["val_ppl_std"] == pytest.approx(math.sqrt(0.125))


# ----------------------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_two_processes_match_one(reference_run: dict, tiny: dict, tmp_path: Path) -> None:
    """Same global batch (4 = 2 per device x 2 processes): the same perplexities as the 1-process run."""
    config = write_config(tiny, tmp_path / "config.yaml", per_device_batch_size=2)
    # `accelerate launch --cpu --num_processes 2` would start ONE process (Accelerate needs mpirun for several CPU
    # processes); the torchrun-based launcher with ACCELERATE_USE_CPU starts two gloo processes.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531"]
    proc = run_subprocess([*launcher, str(ROOT / "train.py"), "--config", str(config)], timeout=420, ACCELERATE_USE_CPU="true")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    two = json.loads((tmp_path / "out" / "results.json").read_text())
    one = reference_run["report"]
    assert two["accelerate"]["num_processes"] == 2
    assert two["base"]["perplexity"] == pytest.approx(one["base"]["perplexity"], rel=1e-6)
    assert two["base"]["tokens"] == one["base"]["tokens"]  # the padded duplicates were dropped
    for name in ("gin", "lora"):
        assert two["summary"][name]["val_ppl_mean"] == pytest.approx(one["summary"][name]["val_ppl_mean"], rel=1e-4)


def test_gradient_accumulation_matches_the_same_global_batch(reference_run: dict, tiny: dict, tmp_path: Path, single_thread: None) -> None:
    """2 blocks x 2 accumulation steps trains like 4 blocks at once (same blocks, same mean loss, same schedule)."""
    config = write_config(tiny, tmp_path / "config.yaml", per_device_batch_size=2, gradient_accumulation_steps=2)
    report = train.main(["--config", str(config)])
    for name in ("gin", "lora"):
        assert report["summary"][name]["val_ppl_mean"] == pytest.approx(reference_run["report"]["summary"][name]["val_ppl_mean"], rel=1e-4)


def test_bf16_mixed_precision_trains_both_arms(tiny: dict, tmp_path: Path, single_thread: None) -> None:
    """``mixed_precision: bf16`` (what configs/compare_gpu.yaml and study_gpu.yaml use; on CPU Accelerate autocasts
    the forward to bf16): both arms train, their validation perplexity ends below the base model's."""
    config = write_config(tiny, tmp_path / "config.yaml", mixed_precision="bf16")
    report = train.main(["--config", str(config)])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["accelerate"]["mixed_precision"] == "bf16"
    for name in ("gin", "lora"):
        ppl = report["summary"][name]["val_ppl_mean"]
        assert math.isfinite(ppl) and ppl < results["base"]["perplexity"], (name, ppl)


def test_warns_when_accelerate_cpu_launch_starts_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "torchrun --nproc_per_node N" in single_process_cpu_launch_warning(1)
    assert single_process_cpu_launch_warning(2) is None


# ----------------------------------------------------------------------------- crash safety
def test_resume_after_crash_matches_uninterrupted_run(reference_run: dict, tiny: dict, tmp_path: Path, single_thread: None) -> None:
    config = write_config(tiny, tmp_path / "config.yaml", checkpoint_every=4, debug_crash_at_step=6)
    proc = run_subprocess([sys.executable, str(ROOT / "train.py"), "--config", str(config)])
    assert proc.returncode == 17, proc.stderr[-3000:]  # os._exit: no cleanup, like a kill
    ckpts = tmp_path / "out" / "checkpoints" / "gin__lr0.01__seed0"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-4"]
    assert not (tmp_path / "out" / "results.json").exists()
    # a checkpoint killed half-way through writing: a temp folder without trainer_state.json
    (ckpts / ".checkpoint-8.tmp").mkdir()
    (ckpts / ".checkpoint-8.tmp" / "optimizer.bin").write_bytes(b"garbage")
    assert [p.name for p in complete_checkpoints(ckpts)] == ["checkpoint-4"]

    resumed = train.main(["--config", str(config), "--resume"])
    gin_trial = next(t for t in resumed["trials"] if t["run"] == "gin")
    assert gin_trial["resumed_from"].endswith("checkpoint-4")
    assert gin_trial["train_cpu_steps"] == STEPS - 4 and gin_trial["train_cpu_s"] > 0  # CPU time of this working period's steps
    reference = reference_run["report"]
    for name in ("gin", "lora"):
        assert resumed["summary"][name]["val_ppl_mean"] == pytest.approx(reference["summary"][name]["val_ppl_mean"], rel=1e-6)
        steps, losses = zip(*resumed["curves"][name]["train_loss"], strict=True)
        ref_steps, ref_losses = zip(*reference["curves"][name]["train_loss"], strict=True)
        assert steps == ref_steps and losses == pytest.approx(ref_losses, rel=1e-6)
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-12", "checkpoint-8"]  # keep_checkpoints=2, temp removed


# ----------------------------------------------------------------------------- bad input
def test_unknown_method_is_a_clear_error(tiny: dict, tmp_path: Path, single_thread: None) -> None:
    config = write_config(tiny, tmp_path / "config.yaml", runs=[{"name": "x", "method": "adalora"}])
    with pytest.raises(ValueError, match=r"runs\[0\]\.method='adalora' is not supported; use one of \['gin', 'lora', 'peft'\].*method: peft"):
        train.main(["--config", str(config)])


def test_missing_dataset_column_is_a_clear_error(tiny: dict, tmp_path: Path, single_thread: None) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"question": d, "answer": "yes"}) for d in synthetic_documents(20)))
    config = write_config(tiny, tmp_path / "config.yaml", data={"source": "files", "files": [str(rows)], "text_column": "body", "block_size": 32})
    with pytest.raises(ValueError, match=r"data.text_column='body' is not a column of the dataset; available columns: \['question', 'answer'\]"):
        train.main(["--config", str(config)])


def test_block_size_above_model_limit_is_a_clear_error(tiny: dict, tmp_path: Path, single_thread: None) -> None:
    config = write_config(tiny, tmp_path / "config.yaml", data={"source": "files", "files": [tiny["docs"]], "block_size": 128})
    with pytest.raises(ValueError, match=r"data.block_size=128 exceeds the model's max_position_embeddings=64; set data.block_size to at most 64"):
        train.main(["--config", str(config)])


def test_empty_split_is_a_clear_error(tiny: dict, tmp_path: Path, single_thread: None) -> None:
    config = write_config(tiny, tmp_path / "config.yaml",
                          data={"source": "files", "files": [tiny["docs"]], "block_size": 32, "val_fraction": 0.001})
    with pytest.raises(ValueError, match=r"the validation split is empty: .* Raise data.val_fraction"):
        train.main(["--config", str(config)])


@pytest.mark.parametrize(("what", "label"), [("loss", "loss"), ("grad", "gradient norm")])
def test_non_finite_value_stops_with_a_clear_error_and_keeps_checkpoints(what: str, label: str, tiny: dict, tmp_path: Path,
                                                                         single_thread: None) -> None:
    """A NaN loss, or a NaN gradient norm after clipping, stops the run naming the step and run; checkpoints survive.

    ``debug_non_finite_at_step`` makes the value NaN deterministically (an absurd learning rate overflows or not
    depending on the CPU's float kernels); the loss check and the gradient-norm check that catch it are the real ones.
    """
    config = write_config(tiny, tmp_path / "config.yaml", runs=[{"name": "lora", "method": "lora", "lora": {"r": 4}}],
                          eval_every=0, checkpoint_every=1, keep_checkpoints=2, max_grad_norm=1.0,
                          debug_non_finite_at_step=3, debug_non_finite=what)
    message = (rf"non-finite training {label} \(nan\) at step 3 of run 'lora' \(method=lora, learning_rate=0.01, seed=0\) "
               rf"\(injected by debug_non_finite='{what}'\)\. Lower the learning rate")
    with pytest.raises(NonFiniteLossError, match=message) as info:
        train.main(["--config", str(config)])
    assert "peak-memory" not in {thread.name for thread in threading.enumerate()}  # the memory sampler stopped too
    root = tmp_path / "out" / "checkpoints" / "lora__lr0.01__seed0"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1", "checkpoint-2"]  # no temp folder left behind
    for step, ckpt in ((1, root / "checkpoint-1"), (2, root / "checkpoint-2")):
        assert {TRAINER_STATE, "trainable_0.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= {
            p.name for p in ckpt.iterdir()}
        state = json.loads((ckpt / TRAINER_STATE).read_text())
        assert state["step"] == step and len(state["train_loss"]) == step
        assert all(math.isfinite(v) for _, v in state["train_loss"])
    assert f"the last complete checkpoint {root / 'checkpoint-2'} is intact" in str(info.value)
    assert not (tmp_path / "out" / "results.json").exists()

    # The surviving checkpoint is usable: --resume (which ignores the debug option) finishes the run from it.
    resumed = train.main(["--config", str(config), "--resume"])
    (trial,) = resumed["trials"]
    assert trial["resumed_from"] == str(root / "checkpoint-2") and trial["steps"] == STEPS
    assert all(math.isfinite(v) for _, v in resumed["curves"]["lora"]["train_loss"])


def test_debug_non_finite_options_are_validated() -> None:
    from gin_adapter.compare.config import TrainingConfig

    lora = {"method": "lora", "lora": {"r": 2}}
    with pytest.raises(ValueError, match=r"debug_non_finite='weights' is not supported; use one of \['loss', 'grad'\]"):
        TrainingConfig.from_dict({**lora, "debug_non_finite_at_step": 2, "debug_non_finite": "weights"})
    with pytest.raises(ValueError, match=r"debug_non_finite_at_step=0 must be a positive integer"):
        TrainingConfig.from_dict({**lora, "debug_non_finite_at_step": 0})
    with pytest.raises(ValueError, match=r"debug_non_finite='grad' needs max_grad_norm"):
        TrainingConfig.from_dict({**lora, "debug_non_finite_at_step": 2, "debug_non_finite": "grad", "max_grad_norm": None})
    cfg = TrainingConfig.from_dict({**lora, "debug_non_finite_at_step": 2, "debug_non_finite": "grad"})
    assert not {"debug_non_finite_at_step", "debug_non_finite"} & set(cfg.comparable_dict())  # --resume may drop them


# ----------------------------------------------------------------------------- step 0
def test_step_0_is_measured_and_checked_against_the_base_model(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture, single_thread: None) -> None:
    """Step 0 of every curve is the adapter's own evaluation, never the base model's number copied.

    A zero-initialised GIN must match the base model; a GIN with ``scale_init: linear`` and a LoRA whose B is made
    non-zero behind the config's back must not, and the LoRA (which claims to be the identity) is reported.
    """
    real_wrap_model = train.wrap_model

    def wrap_with_broken_lora_init(model: torch.nn.Module, plan: RunPlan) -> torch.nn.Module:
        wrapped = real_wrap_model(model, plan)
        if plan.method == "lora":
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, param in wrapped.named_parameters():
                    if "lora_B" in name:
                        param.copy_(torch.randn(param.shape, generator=generator))
        return wrapped

    monkeypatch.setattr(train, "wrap_model", wrap_with_broken_lora_init)
    runs = [{"name": "gin", "method": "gin", "gin": {"hidden_dim": 8}},
            {"name": "gin_linear", "method": "gin", "gin": {"hidden_dim": 8, "scale_init": "linear"}},
            {"name": "lora", "method": "lora", "lora": {"r": 2}}]
    config = write_config(tiny, tmp_path / "config.yaml", runs=runs, max_steps=1, warmup_steps=0, eval_every=0)
    report = train.main(["--config", str(config)])
    base = report["base"]["perplexity"]
    step0 = {}
    for name in ("gin", "gin_linear", "lora"):
        step, step0[name] = report["curves"][name]["val_ppl"][0]
        assert step == 0
    assert step0["gin"] == pytest.approx(base, rel=1e-4)
    assert step0["gin_linear"] != pytest.approx(base, rel=1e-3)
    assert step0["lora"] != pytest.approx(base, rel=1e-3)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING: [")]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: [lora__lr0.01__seed0] the lora adapter should be the identity"), warnings


# ----------------------------------------------------------------------------- the shipped configs
@pytest.mark.integration
def test_smoke_config_runs_on_the_embedded_model(tmp_path: Path, single_thread: None) -> None:
    report = train.main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--output-dir", str(tmp_path / "smoke")])
    assert set(report["summary"]) == {"gin", "lora"}
    assert all(math.isfinite(s["val_ppl_mean"]) for s in report["summary"].values())
    assert (tmp_path / "smoke" / "adapters" / "gin" / "adapter_config.json").is_file()
