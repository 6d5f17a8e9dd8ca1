"""Run tests/test_architectures.py's checks over every causal-LM type and write docs/architectures.md.

    python scripts/architecture_report.py            # about a minute on 2 CPU cores

The table gives each type's status (works / fails / refused / skipped), the reason, the modules wrapped and where
the adapter's correction lands. The README's supported-architectures paragraph (between the
``<!-- architectures:start -->`` and ``<!-- architectures:end -->`` markers) is rewritten from the same counts, so no
number there is written by hand.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import transformers  # noqa: E402
from architecture_checks import CHECKS, BaseCannotTrain, Case, logits, prepare, prompt, set_scale  # noqa: E402
from test_architectures import KNOWN_FAILURES  # noqa: E402

HIDDEN = "hidden-state features"  # reported in its own column: the headline counts the default GinConfig()
from tiny_models import model_types  # noqa: E402

logger = logging.getLogger("architecture_report")
START, END = "<!-- architectures:start -->", "<!-- architectures:end -->"


def placement(case: Case) -> str:
    """Where the delta lands, measured: which norm of the decoder layer receives the attention output itself."""
    modules = dict(case.model.base_model.model.named_modules())
    name = case.wrapped[0]
    match = re.fullmatch(r"(.*?\.\d+)\.(.+)", name)
    if match is None:
        return ""
    layer, attribute = modules[match.group(1)], match.group(2)
    if "." in attribute:
        parent = modules[f"{match.group(1)}.{attribute.rsplit('.', 1)[0]}"]
        if not isinstance(parent, torch.nn.ModuleList):
            return f"before the output projection and residual LayerNorm of `{type(parent).__name__}` (`{attribute}`)"
    attention = modules[name]
    seen: dict[str, torch.Tensor] = {}
    outputs: list[torch.Tensor] = []

    def keep_output(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    def keep_input(norm_name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                seen.setdefault(norm_name, args[0])
        return hook

    handles = [attention.register_forward_hook(keep_output)]
    for norm_name, norm in layer.named_modules():
        if "norm" in type(norm).__name__.lower() and not norm_name.startswith(attribute):
            handles.append(norm.register_forward_pre_hook(keep_input(norm_name)))
    try:
        logits(case.model, prompt())
    finally:
        for handle in handles:
            handle.remove()
    if not outputs:
        return ""
    for norm_name, tensor in seen.items():
        if tensor.shape == outputs[0].shape and torch.equal(tensor, outputs[0]):
            return f"inside the post-attention norm: `h + {norm_name}(attn + delta)`"
    return ""


def run(types: list[str]) -> list[dict]:
    rows = []
    for model_type in types:
        start = time.perf_counter()
        case = prepare(model_type)
        row = dict(type=model_type, status="works", reason="", wrapped="", placement="", hidden="")
        if case.skip:
            row.update(status="skipped", reason=case.skip)
        elif case.refused:
            row.update(status="refused", reason=case.refused.split(": ", 1)[-1])
        else:
            failures = []
            for name, check in CHECKS.items():
                try:
                    torch.manual_seed(0)
                    try:
                        check(case)
                    except BaseCannotTrain:  # the base model's own limitation: nothing of the adapter's to check
                        continue
                    if name == HIDDEN:
                        row["hidden"] = "works"
                except (AssertionError, RuntimeError) as error:
                    known = KNOWN_FAILURES.get((model_type, name))
                    if name == HIDDEN:
                        row["hidden"] = f"no: {known or error}"
                    else:
                        failures.append(f"{name}: {known or error}")
            if failures:
                row.update(status="fails", reason="; ".join(failures))
            row["wrapped"] = _compact(case.wrapped)
            set_scale(case.model, 0.5)
            row["placement"] = placement(case)
        logger.info("%-28s %-8s %.2fs %s", model_type, row["status"], time.perf_counter() - start, row["reason"][:120])
        rows.append(row)
    return rows


def _compact(names: list[str]) -> str:
    """``model.layers.0.self_attn, model.layers.1.self_attn`` -> ``model.layers.{0,1}.self_attn``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        match = re.fullmatch(r"(.*?)\.(\d+)\.(.+)", name)
        key = (match.group(1), match.group(3)) if match else (name, "")
        groups.setdefault(key, []).append(match.group(2) if match else "")
    return ", ".join(f"{head}.{{{','.join(idx)}}}.{tail}" if tail else head for (head, tail), idx in groups.items())


def summary(rows: list[dict]) -> str:
    count = {status: sum(row["status"] == status for row in rows) for status in ("works", "fails", "refused", "skipped")}
    post_norm = sorted(row["type"] for row in rows if row["status"] == "works" and "post-attention norm" in row["placement"])
    refused = ", ".join(f"`{row['type']}`" for row in rows if row["status"] == "refused")
    hidden_works = sum(row["status"] == "works" and row["hidden"] == "works" for row in rows)
    hidden_not = ", ".join(f"`{row['type']}`" for row in rows if row["status"] == "works" and row["hidden"] != "works")
    fails = ", ".join(f"`{row['type']}`" for row in rows if row["status"] == "fails")
    return (
        f"With transformers {transformers.__version__}, **{count['works']} of the {len(rows)} causal-LM model types** "
        "in transformers' auto mapping work with the default `GinConfig()`: built tiny, wrapped by discovery, identity "
        "at init, a non-zero adapter changes the output, causal, a training step, cached == uncached generation "
        f"(`tests/test_architectures.py`; the table per type is [docs/architectures.md](docs/architectures.md), "
        f"written by `scripts/architecture_report.py`). {count['fails']} wrapped but fail a check for a known reason "
        f"outside discovery ({fails or 'none'}), {count['refused']} are refused with an error naming the model type and why ({refused}), "
        f"and {count['skipped']} cannot be built as tiny models on a CPU here (skipped, with the reason). In "
        f"{len(post_norm)} working types the attention output goes through a post-attention norm before the residual "
        "add, so the correction lands inside it, `h + norm(attn + delta)` (identity at init still holds): "
        + ", ".join(f"`{t}`" for t in post_norm)
        + f". With `node_features=\"hidden\"` (a second adapter, same checks) {hidden_works} of those work; not: "
        + (hidden_not or "none") + " (reasons in the table)."
    )


def write(rows: list[dict], docs: Path, readme: Path) -> None:
    text = summary(rows)
    table = ["| model type | status | reason | wrapped modules | where the correction lands | hidden-state features |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = [f"`{row['type']}`", row["status"], row["reason"], f"`{row['wrapped']}`" if row["wrapped"] else "", row["placement"], row["hidden"]]
        table.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    docs.write_text(
        "# Architectures\n\nGenerated by `scripts/architecture_report.py` (do not edit by hand).\n\n"
        + text.replace("(docs/architectures.md)", "(architectures.md)")
        + "\n\nWhere the correction lands is measured: a norm of the decoder layer whose input is the attention output "
        "itself. Elsewhere it is the residual branch, `h + attn + delta` (post-LN blocks normalise that sum).\n\n"
        + "\n".join(table)
        + "\n"
    )
    content = readme.read_text()
    if START in content and END in content:
        before, rest = content.split(START, 1)
        readme.write_text(before + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    else:
        logger.warning("%s has no %s ... %s markers; README not updated", readme, START, END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: all); a subset prints only, writes nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    torch.set_num_threads(1)
    rows = run(args.types or model_types())
    if args.types:
        for row in rows:
            logger.info("%s", row)
        return
    write(rows, ROOT / "docs" / "architectures.md", ROOT / "README.md")
    logger.info("%s", summary(rows))


if __name__ == "__main__":
    main()
