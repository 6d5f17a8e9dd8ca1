"""The benchmark suites' functions at toy sizes (a tiny random Llama), so benchmarks/ does not rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import run_benchmarks as rb  # noqa: E402
from benchmarks.crossover_suite import plot_crossover, run_crossover  # noqa: E402
from benchmarks.decode_suite import run_decode  # noqa: E402
from benchmarks.eval_suite import run_eval  # noqa: E402
from benchmarks.generate_suite import run_generate  # noqa: E402
from benchmarks.kernel_suite import kernel_cases, kernel_inputs, run_kernel  # noqa: E402
from benchmarks.report import markdown_tables, round_ratios, show_ratio, summarize  # noqa: E402
from benchmarks.train_suite import equivalence_checks, run_train  # noqa: E402
from benchmarks.variants import ALL_VARIANTS, LABELS, build_gin  # noqa: E402
from gin_adapter import native_block, native_decode  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine OpenMP barriers stall tiny kernels (seconds instead of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(0))


def test_train_suite_rows_and_saved_tensor_accounting():
    base = tiny_model("llama")
    base.requires_grad_(False)
    result = run_train(base, _ids(2, 24), list(ALL_VARIANTS), warmup=0, steps=1, device=CPU, collect=False, input_grad=True)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == set(ALL_VARIANTS)
    assert rows["base"]["trainable_params"] == 0
    # LoRA rank matched to the GIN's parameter count
    assert abs(rows["lora"]["trainable_params"] - rows["gin"]["trainable_params"]) <= rows["gin"]["trainable_params"] * 0.5
    assert abs(rows["lora_b"]["trainable_params"] - rows["gin_published"]["trainable_params"]) <= rows["gin_published"]["trainable_params"] * 0.5
    assert rows["gin_published"]["trainable_params"] > rows["gin"]["trainable_params"]  # the published preset's budget
    for row in rows.values():
        assert row["step_s"] > 0 and row["step_peak_mib"] > 0
        if sys.platform != "win32":
            assert row["step_system_s"] >= 0 and row["step_minor_faults"] >= 0
    # the sdpa path keeps nothing of size (B, H, L, L) for backward; the published-style eager path does
    for name in ("gin", "gin_generic", "gin_pyg", "gin_detached", "gin_thr"):
        assert rows[name]["saved_attention_maps"] == 0, rows[name]["saved_square_shapes"]
    assert rows["published"]["saved_attention_maps"] > 0


@pytest.mark.skipif(sys.platform == "win32", reason="getrusage")
def test_interleaved_times_count_the_page_faults_of_each_call():
    """Every call's minor faults are its own: fresh anonymous memory written page by page faults once per page."""
    import mmap

    from benchmarks.measure import interleaved_times

    def touch_16_mib() -> None:
        buffer = mmap.mmap(-1, 16 * 2**20)  # not from malloc, so the allocator setting cannot change it
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # where transparent huge pages are "always", 2 MiB would be one fault
            buffer.madvise(mmap.MADV_NOHUGEPAGE)
        for offset in range(0, len(buffer), mmap.PAGESIZE):
            buffer[offset] = 1
        buffer.close()

    times = interleaved_times({"touch": touch_16_mib, "idle": lambda: None}, warmup=1, steps=3, sync=lambda: None)
    assert len(times.minor_faults["touch"]) == 3 and len(times.system["touch"]) == 3
    assert min(times.minor_faults["touch"]) >= 16 * 2**20 // mmap.PAGESIZE // 2  # about one per page
    assert max(times.minor_faults["idle"]) < 64


def test_equivalence_checks_pass():
    base = tiny_model("llama")
    base.requires_grad_(False)
    checks = equivalence_checks(base, _ids(2, 20))
    assert all(c["allclose"] for c in checks if "allclose" in c), checks
    assert checks[-1]["max_abs_logit_diff"] > 0  # the perturbed adapter does change the output


def test_generic_variant_takes_the_generic_chain(monkeypatch):
    """``gin_generic`` must really run the pre-kernel chain (else the benchmark compares the kernel with itself)."""
    import gin_adapter.aggregate as aggregate

    calls = {"generic": 0, "fused": 0}
    generic, fused = aggregate.neighbour_sums, aggregate.topk_neighbour_sum

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(aggregate, "neighbour_sums", count("generic", generic))
    monkeypatch.setattr(aggregate, "topk_neighbour_sum", count("fused", fused))
    base = tiny_model("llama")
    with torch.no_grad():
        build_gin(base, "gin_generic")(_ids(1, 8))
        assert calls == {"generic": 2, "fused": 0}
        build_gin(base, "gin")(_ids(1, 8))
        assert calls == {"generic": 2, "fused": 2}
    build_gin(base, "gin_generic").train()(_ids(1, 8))  # training: layer 1's queries need a gradient, and still the chain
    assert calls == {"generic": 4, "fused": 2}


def test_eval_generate_and_summary(tmp_path):
    base = tiny_model("llama")
    base.requires_grad_(False)
    evals = run_eval(base, _ids(2, 16), ["base", "lora", "gin", "gin_generic"], warmup=0, steps=1, device=CPU, collect=False)
    gen = run_generate(base, None, _ids(1, 8), ["base", "lora", "gin", "gin_generic"], new_tokens=3, warmup=0, steps=1, device=CPU, collect=False)
    assert all(r["tokens_per_s"] > 0 for r in evals + gen["rows"])
    assert gen["same_tokens_as_gin"]["gin_generic"]
    results = {"eval": evals, "generate": gen}
    results["summary"] = summarize(results)
    assert results["summary"]["targets"]["generate tokens/s GIN/LoRA >= 0.90"]["value"] > 0
    assert "Cached generate()" in markdown_tables(results)


def test_decode_suite_counts_operators_and_times_the_parts():
    """Per-layer overhead above the base, by ATen operator calls (deterministic: no timing asserted)."""
    base = tiny_model("llama")
    base.requires_grad_(False)
    result = run_decode(base, _ids(1, 9), ["lora", "gin"], warmup=0, steps=1, device=CPU)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"base", "lora", "gin"}
    assert rows["base"]["aten_calls_per_layer"] == 0
    assert rows["lora"]["aten_calls_per_layer"] > 0
    if native_decode.available() and native_block.available():  # sdpa and the block's operators become two compiled calls
        assert rows["gin"]["aten_calls_per_layer"] < 0
    else:  # the GIN adds a graph, a sum and a block
        assert rows["gin"]["aten_calls_per_layer"] > rows["lora"]["aten_calls_per_layer"]
    assert len(rows["gin"]["token_s_all"]) == 20 and all(r["token_s"] > 0 for r in rows.values())
    assert result["gin_parts"]["neighbour_sum_us"] > 0 and result["gin_parts"]["block_us"] > 0
    inside = result["in_model"]
    assert set(inside) == {"base", "lora", "gin"} and set(inside["base"]) == set(inside["lora"]) == {"attention_module"}
    gin = inside["gin"]
    assert set(gin) == {"attention_module", "base_attention", "neighbour_sum", "block", "rest"}  # value features: no projection
    assert all(gin[key] > 0 for key in ("base_attention", "neighbour_sum", "block", "rest"))
    assert gin["base_attention"] + gin["neighbour_sum"] + gin["block"] < gin["attention_module"]
    assert "Inside the model" in markdown_tables({"decode": result}) and "One decoded token" in markdown_tables({"decode": result})


def test_in_model_timers_are_removed_afterwards():
    """Timing the parts in place leaves the model's modules and the neighbour-sum function as they were."""
    from benchmarks.decode_suite import _decode_call
    from benchmarks.in_model_parts import in_model_parts_us
    from gin_adapter import layer as gin_layer_module

    base = tiny_model("llama")
    base.requires_grad_(False)
    model = build_gin(base, "gin_hidden").eval()
    original_sum, original_update = gin_layer_module.graph_neighbour_sum, native_block.decode_update
    parts = in_model_parts_us(model, _decode_call(model, _ids(1, 8), _ids(1, 1)), calls=2, warmup=1)
    assert parts["decode_update"] > 0 and "node_features" not in parts and parts["rest"] > 0  # each decoded token's update: one call
    assert gin_layer_module.graph_neighbour_sum is original_sum and native_block.decode_update is original_update
    assert not any({"forward", "_projected_features"} & set(vars(m)) for m in model.modules())


def test_decode_variants_before_the_joint_decode_step_and_the_gelu_change():
    """``gin_separate`` decodes through sdpa + the separate step (more operator calls than ``gin``);
    ``gin_onednn_gelu`` also puts torch's own ``nn.GELU`` back in every block (same calls, other kernel)."""
    from benchmarks.variants import build_gin
    from gin_adapter.activations import GELU

    base = tiny_model("llama")
    base.requires_grad_(False)
    result = run_decode(base, _ids(1, 9), ["gin", "gin_separate", "gin_onednn_gelu"], warmup=0, steps=1, device=CPU)
    calls = {r["variant"]: r["aten_calls_per_layer"] for r in result["rows"]}
    assert calls["gin"] < calls["gin_separate"] == calls["gin_onednn_gelu"]
    kinds = {name: {type(m) for m in build_gin(base, name).modules() if isinstance(m, torch.nn.GELU)} for name in ("gin", "gin_onednn_gelu")}
    assert kinds == {"gin": {GELU}, "gin_onednn_gelu": {torch.nn.GELU}}


def test_tables_show_the_spread_of_per_round_ratios():
    """'vs LoRA' is the median of per-round ratios with the lowest and highest round beside it."""
    lora = dict(variant="lora", label="LoRA", step_s_all=[2.0, 4.0, 2.0], token_s_all=[1.0, 1.0])
    gin = dict(variant="gin", label="GIN", step_s_all=[2.2, 4.0, 2.6], token_s_all=[1.25, 1.0])
    assert round_ratios(gin, lora, "step_s_all") == pytest.approx([1.1, 1.0, 1.3])
    assert show_ratio(round_ratios(gin, lora, "step_s_all")) == "1.10 (1.00-1.30)"
    assert show_ratio([0.9]) == "0.90" and show_ratio(None) == "" and round_ratios(gin, dict(step_s_all=[1.0]), "step_s_all") is None
    rows = [dict(lora, aten_calls=10, aten_calls_per_layer=5, overhead_us_per_layer=1.0, token_s=1.0, prompt=8, layers=2, timer="cpu"),
            dict(gin, aten_calls=12, aten_calls_per_layer=6, overhead_us_per_layer=2.0, token_s=1.1, prompt=8, layers=2, timer="cpu")]
    assert "| 0.90 (0.80-1.00) |" in markdown_tables({"decode": {"rows": rows}})


def test_published_rows_are_compared_with_the_lora_of_their_budget():
    """Training, evaluation and generation tables put each ``gin_published*`` row against ``lora_b`` (its budget),
    the others against ``lora``; without ``lora_b`` in the run, against ``lora``."""
    from benchmarks.report import its_lora

    def row(name, t):
        return dict(variant=name, label=name, batch=1, seq_len=8, layers=2, trainable_params=1, step_s_all=t, forward_s_all=t,
                    tokens_per_cpu_s=1.0, tokens_per_wall_s=1.0, timer="wall")

    rows = [row("lora", [1.0, 1.0]), row("gin", [1.2, 1.2]), row("lora_b", [2.0, 2.0]), row("gin_published", [2.2, 2.2]),
            row("gin_published_keep", [2.1, 2.1])]
    assert [its_lora(rows, r)["variant"] for r in rows] == ["lora", "lora", "lora", "lora_b", "lora_b"]
    assert its_lora(rows[:2] + rows[3:4], rows[3])["variant"] == "lora"
    train = markdown_tables({"train": [{"rows": rows}]})
    for line in ("| gin_published | 1 |  |  | 1.10 (1.10-1.10) |", "| gin_published_keep | 1 |  |  | 1.05 (1.05-1.05) |", "| gin | 1 |  |  | 1.20 (1.20-1.20) |"):
        assert line in train, line
    evaluation = markdown_tables({"eval": rows})
    for line in ("| gin_published | 1 | 1 | 0.91 (0.91-0.91) |", "| gin | 1 | 1 | 0.83 (0.83-0.83) |"):
        assert line in evaluation, line


def test_crossover_and_plot(tmp_path):
    args = rb.parse_args(["--crossover-lens", "32,64", "--crossover-topk", "4,8", "--crossover-reps", "1", "--crossover-full-max-len", "64"])
    rows = run_crossover(args)
    assert len(rows) == 4
    for row in rows:
        assert row["dense_ms"] > 0 and row["pyg_ms"] > 0 and row["full_fused_dense_ms"] > 0 and row["full_fused_gather_ms"] > 0
        assert all(row["allclose"].values()), row["allclose"]
    plot_crossover(rows, tmp_path / "crossover.png")
    assert (tmp_path / "crossover.png").stat().st_size > 0
    assert "Crossover" in markdown_tables({"crossover": rows})


def test_kernel_suite_times_every_way_and_they_agree():
    args = rb.parse_args(["--kernel-shapes", "2x40", "--kernel-chunks", "16,0", "--kernel-reps", "1"])
    rows = run_kernel(args)
    assert set(rows[0]["ms"]) == {"sdpa", "generic", "fused_dense_c16", "fused_dense_c0", "fused_gather_c16", "fused_gather_c0", "joint", "joint_keep",
                               "joint_chunked", "joint_published", "joint_published_chunked"}
    assert all(t > 0 for t in rows[0]["ms"].values())
    assert "forward + backward" in markdown_tables({"kernel": rows})
    # the timed cases compute the same gradients to q, k, v
    grads = {}
    for name in ("generic", "fused_dense_c16", "fused_gather_c16", "fused_dense_c0", "fused_gather_c0", "sdpa", "joint", "joint_keep", "joint_chunked"):
        inputs = kernel_inputs(1, 40)
        kernel_cases(inputs, chunks=(16, 0))[name]()
        grads[name] = torch.cat([t.grad.flatten() for t in inputs[:3]])
    joint = {name: grads.pop(name) for name in ("sdpa", "joint", "joint_keep", "joint_chunked")}
    for name, grad in grads.items():
        assert torch.allclose(grad, grads["generic"], atol=1e-5), name
    # the joint cases stand for sdpa and the sum together: their gradients are the sum of the two
    for name in ("joint", "joint_keep", "joint_chunked"):
        assert torch.allclose(joint[name], joint["sdpa"] + grads["generic"], atol=1e-5), name
    # the published rule's cases: the attention's gradients plus its graph's (which reach q and k, not v)
    sdpa_grads = joint["sdpa"].split([t.numel() for t in inputs[:3]])
    for name in ("joint_published", "joint_published_chunked"):
        inputs = kernel_inputs(1, 40)
        kernel_cases(inputs, chunks=(16, 0))[name]()
        published = [t.grad for t in inputs[:3]]
        assert torch.allclose(published[2].flatten(), sdpa_grads[2], atol=1e-5), name
        assert not torch.allclose(published[0].flatten(), sdpa_grads[0], atol=1e-3), name


def test_report_rerenders_saved_results(tmp_path):
    import json

    row = lambda name, t: dict(variant=name, label=LABELS[name], batch=1, seq_len=8, layers=2, trainable_params=1,  # noqa: E731
                               step_s=t, step_s_all=[t, t], step_cpu_s=t, step_wall_s=t, step_peak_mib=1.0, total_peak_mib=2.0,
                               saved_attention_maps=0)
    path = tmp_path / "benchmark_results.json"
    path.write_text(json.dumps({"train": [{"rows": [row("lora", 1.0), row("gin", 1.1), row("published", 1.4)]}]}))
    results = rb.main(["--report", str(path)])
    targets = results["summary"]["targets"]
    assert targets["train GIN/LoRA <= 1.10 (1x8, 2 layers)"]["met"] is True
    assert targets["published-style adapter overhead >= 3x GIN's"]["value"] == pytest.approx(4.0)  # 0.4 s over LoRA vs 0.1 s
    assert targets["eval tokens/s GIN/LoRA >= 0.85"]["met"] is None  # not measured
    assert "Training step" in json.loads(path.read_text())["markdown"]


def test_profile_step_shows_the_operators_a_variant_replaces():
    from benchmarks.profile_step import markdown, profile_variants

    base = tiny_model("llama")
    base.requires_grad_(False)
    result = profile_variants(base, _ids(2, 24), ["lora", "gin"], warmup=1, rounds=2, top=500)
    lora, gin = (result["per_variant"][name] for name in ("lora", "gin"))
    assert len(lora["step_s_all"]) == len(gin["step_s_all"]) == len(gin["minor_faults_all"]) == 2 and lora["step_s"] > 0
    rows = {row["op"]: row for row in result["top_differences"]}
    # training, the default GIN builds its graph with the attention (gin_adapter/joint.py) instead of sdpa's kernel,
    # picking neighbours with the compiled top-k (a labelled range in the profile: it is no ATen operator)
    top_k = rows["gin_adapter::row_top_k"]
    assert top_k["first_s"] == 0 and top_k["second_s"] > 0
    flash = [op for op in rows if op.startswith("aten::_scaled_dot_product_flash_attention")]  # (sdpa still runs in layer 0,
    assert flash and all(rows[op]["second_s"] < rows[op]["first_s"] for op in flash)  # whose queries need no gradient)
    assert all(row["diff_s"] == pytest.approx(row["second_s"] - row["first_s"]) for row in rows.values())
    assert "| `gin_adapter::row_top_k` |" in markdown(result)
    with pytest.raises(ValueError, match="two variants"):
        profile_variants(base, _ids(2, 24), ["lora", "gin", "base"], warmup=0, rounds=1)


def test_summary_holds_the_long_shape_to_its_own_target():
    """At 1 x 2048 every variant is held to <= 1.15 (not the 4 x 256 shape's 1.10), each against its own LoRA."""
    def row(variant: str, times: list[float]) -> dict:
        return dict(variant=variant, batch=1, seq_len=2048, layers=30, step_s_all=times)

    lora, lora_b = row("lora", [10.0, 10.0, 10.0]), row("lora_b", [10.0, 10.0, 10.0])
    rows = [lora, row("gin", [11.0, 11.0, 12.0]), row("gin_hidden", [11.6, 11.6, 11.6]), lora_b, row("gin_published", [11.2, 11.4, 11.6])]
    targets = summarize({"train": [{"rows": rows}]})["targets"]
    long = {name.split(" <=")[0]: verdict for name, verdict in targets.items() if "<= 1.15" in name}
    assert long["train GIN/LoRA"] == dict(value=pytest.approx(1.1), met=True)
    assert long["train GIN hidden/LoRA"] == dict(value=pytest.approx(1.16), met=False)
    assert long["train GIN published preset/its LoRA"] == dict(value=pytest.approx(1.14), met=True)
    assert all(verdict["value"] is None for name, verdict in targets.items() if "<= 1.10 (1x2048" in name)


def test_top_k_suite_times_three_ways_that_agree(monkeypatch):
    """The three ways are timed, checked against ``torch.topk`` first (a wrong pick stops the suite), and tabled."""
    from benchmarks import top_k_suite

    args = rb.parse_args(["--suite", "top_k", "--top-k-keys", "64,300", "--top-k-picks", "8,32", "--top-k-reps", "1"])
    rows = top_k_suite.run_top_k(args)
    assert [(r["k"], r["keys"]) for r in rows] == [(8, 64), (8, 300), (32, 300)]  # at least 4 keys per pick
    assert set(rows[0]["ms"]) == {"torch_topk", "two_stage", "compiled"} and all(t > 0 for t in rows[0]["ms"].values())
    assert rows[0]["over_torch_topk"]["torch_topk"] == 1.0
    assert "| 32 | 300 |" in markdown_tables({"top_k": rows})
    probs = top_k_suite.chunk_probabilities(100)
    assert probs.shape == (4, 3, 192, 100) and torch.allclose(probs.sum(-1), torch.ones(4, 3, 192))
    monkeypatch.setattr(top_k_suite, "two_stage_top_k", lambda x, k: (x.topk(k, dim=-1).values.flip(-1), None))
    with pytest.raises(AssertionError, match="two_stage picked other values"):
        top_k_suite.top_k_cases(probs)


def test_pool_rounds_pools_per_round_ratios_of_several_runs(tmp_path):
    """benchmarks/pool_rounds.py: training ratios are variant / its LoRA per round, eval and generate ratios LoRA /
    variant (tokens/s), pooled over every file given."""
    import json

    from benchmarks.pool_rounds import pooled_ratios, summary

    def train_row(variant, times):
        return dict(variant=variant, batch=4, seq_len=256, step_s_all=times)

    runs = [dict(train=[dict(rows=[train_row("lora", [1.0, 2.0]), train_row("gin", [1.1, 2.4]), train_row("lora_b", [1.0, 1.0]),
                                   train_row("gin_published", [1.5, 1.2])])],
                 eval=[dict(variant="lora", batch=4, seq_len=256, forward_s_all=[1.0]), dict(variant="gin", batch=4, seq_len=256, forward_s_all=[1.25])],
                 generate=dict(rows=[dict(variant="lora", batch=1, prompt=128, generate_s_all=[2.0]), dict(variant="gin", batch=1, prompt=128, generate_s_all=[2.5])],
                               same_tokens_as_gin={"gin": True})),
            dict(train=[dict(rows=[train_row("lora", [2.0]), train_row("gin", [2.6])])])]
    paths = []
    for number, run in enumerate(runs):
        paths.append(tmp_path / f"run{number}.json")
        paths[-1].write_text(json.dumps(run))
    pooled = pooled_ratios(paths)
    assert pooled[("train", None, "4x256", "gin")] == pytest.approx([1.1, 1.2, 1.3])
    assert pooled[("train", None, "4x256", "gin_published")] == pytest.approx([1.5, 1.2])  # against lora_b
    assert pooled[("generate", None, "1x128", "gin")] == pytest.approx([0.8])
    assert pooled[("eval", None, "4x256", "gin")] == pytest.approx([0.8])
    assert summary(pooled[("train", None, "4x256", "gin")])["median"] == pytest.approx(1.2)
