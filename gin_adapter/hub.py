"""Pushing adapters to the Hugging Face Hub with a model card.

    from gin_adapter.hub import push_adapter
    url = push_adapter(peft_model, "me/smollm2-gin", metrics={"validation_perplexity": 12.8},
                       base_model="HuggingFaceTB/SmolLM2-135M-Instruct")

:func:`push_adapter` creates the repository if needed and uploads ``save_pretrained``'s files plus a
``README.md`` model card in one commit. Anyone can then load it with PEFT::

    import gin_adapter  # registers the "GIN" PEFT type
    model = PeftModel.from_pretrained(base, "me/smollm2-gin")

``PeftModel.push_to_hub`` works as well; it just writes PEFT's generic card without the metrics.
The Hub address comes from ``huggingface_hub`` (``HF_ENDPOINT``); the token from ``token=``, ``HF_TOKEN`` or
``hf auth login``.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError
from peft import PeftModel

logger = logging.getLogger(__name__)

GIN_PEFT_TYPE = "GIN"

# Licenses of base models this project ships or documents; anything else is left out of the card unless given.
KNOWN_BASE_LICENSES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
    "HuggingFaceTB/SmolLM2-135M": "apache-2.0",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "apache-2.0",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "apache-2.0",
    "meta-llama/Llama-3.2-1B-Instruct": "llama3.2",
    "meta-llama/Llama-3.2-3B-Instruct": "llama3.2",
}

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

_LOGIN_HINT = (
    "Log in with `hf auth login` (or `huggingface_hub.login()` in Python), set the HF_TOKEN environment "
    "variable, or pass token=... . The token needs write access."
)


class MissingHubTokenError(RuntimeError):
    """Raised by :func:`push_adapter` when no Hugging Face token is available or the Hub rejects it."""


def _is_hub_id(name: str) -> bool:
    """A plausible Hub model id (``org/name`` or ``name``) that is not a local path."""
    return bool(_REPO_ID.fullmatch(name)) and not Path(name).exists() and ".." not in name


def _format_value(value: float | int | str) -> str:
    text = format(value, ".6g") if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _adapter_tags(adapter_type: str) -> list[str]:
    kind = adapter_type.lower()
    if "gin" in kind:
        return ["gin-adapter", "sparse-gin", "peft"]
    slug = re.sub(r"[^a-z0-9]+", "-", kind).strip("-")
    return ["gin-adapter", "peft", *([slug] if slug else [])]


def build_model_card(
    base_model: str,
    metrics: Mapping[str, float | int | str],
    adapter_type: str = "Sparse-GIN",
    config: Mapping[str, Any] | None = None,
    command: str | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,  # noqa: A002 - the model card field is called license
) -> str:
    """The ``README.md`` of an adapter repository: YAML front matter, metrics table, loading code, config.

    Args:
        base_model: Hub id (or local path) of the model the adapter was trained on. Only a Hub-style id goes
            into the ``base_model`` metadata field (the Hub rejects paths there); a path is still named in the text.
        metrics: name -> value, shown as a table (for example ``{"validation_perplexity": 12.8, "steps": 60}``).
        adapter_type: what kind of adapter this is (``"Sparse-GIN"``, ``"LoRA"``); sets the title and tags.
        config: the adapter configuration (``adapter_config.json``), shown as JSON.
        command: the command line that produced the adapter, shown so a reader can reproduce it.
        repo_id: the repository the card is for, used in the loading example.
        license: license identifier for the metadata; defaults to the base model's when it is known.

    Returns:
        The card as a string, front matter first.
    """
    hub_base = base_model if _is_hub_id(base_model) else None
    license = license or KNOWN_BASE_LICENSES.get(base_model)
    data = ModelCardData(
        library_name="peft",
        base_model=hub_base,
        license=license,
        pipeline_tag="text-generation",
        # PEFT's own cards tag adapters this way; the Hub links them from the base model's page.
        tags=_adapter_tags(adapter_type) + (["transformers", f"base_model:adapter:{hub_base}"] if hub_base else []),
    )
    where = repo_id or "<this-repo-id>"
    # A root-relative link resolves on whichever Hub serves the card.
    base_ref = f"[`{base_model}`](/{base_model})" if hub_base else f"`{base_model}`"
    is_gin = "gin" in adapter_type.lower()
    load_base = base_model if hub_base else "<base model id or path>"

    lines = [
        f"# {adapter_type} adapter for {base_model}",
        "",
        f"A {adapter_type} adapter for {base_ref}, trained with `gin_adapter` (Sparse GIN-Attention as a PEFT "
        "adapter: each wrapped attention layer runs a small graph isomorphism network over the tokens, on a "
        "sparse graph taken from its own attention map, and adds the result with a learnable scale). "
        "Only the adapter weights are stored here.",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        lines += ["| Metric | Value |", "|---|---|"]
        lines += [f"| {_format_value(name)} | {_format_value(value)} |" for name, value in metrics.items()]
    else:
        lines.append("No metrics were recorded.")
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from peft import PeftModel",
        "import gin_adapter  # the gin-adapter package; registers the GIN adapter type with PEFT",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{load_base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{load_base}")',
        f'model = PeftModel.from_pretrained(base, "{where}")',
        "```",
    ]
    if is_gin:
        lines += [
            "",
            "A GIN adapter cannot be merged into the base weights (its contribution depends on the input), "
            "so keep the `PeftModel` for inference.",
        ]
    if config:
        lines += [
            "",
            "## Adapter configuration",
            "",
            "```json",
            json.dumps(dict(config), indent=2, sort_keys=True, default=_json_default),
            "```",
        ]
    if command:
        lines += ["", "## Reproduce", "", "```bash", command.strip(), "```"]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    return str(card)


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value, key=str)
    return str(value)


def _adapter_type(model: PeftModel) -> str:
    config = model.peft_config[model.active_adapter]
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if str(peft_type).upper() == GIN_PEFT_TYPE:
        return "Sparse-GIN"
    return {"LORA": "LoRA"}.get(str(peft_type), str(peft_type))


def push_adapter(
    model: PeftModel,
    repo_id: str,
    metrics: Mapping[str, float | int | str],
    base_model: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    *,
    command: str | None = None,
) -> str:
    """Push a PEFT adapter (GIN or any other) with a model card to the Hub, in one commit.

    Creates ``repo_id`` if it does not exist (``private`` only applies then), saves ``model`` with
    ``save_pretrained`` (``adapter_config.json`` and ``adapter_model.safetensors``, every adapter it holds),
    writes ``README.md`` from :func:`build_model_card` and uploads the folder.

    Args:
        model: the ``peft.PeftModel`` to push (what :func:`gin_adapter.get_gin_model` returns).
        repo_id: ``"namespace/name"``; a bare ``"name"`` goes to the token owner's namespace.
        metrics: values for the card's metrics table, for example the validation perplexity.
        base_model: Hub id of the base model, for the card's metadata and loading example.
        token: a Hub token with write access; defaults to ``HF_TOKEN`` or the ``hf auth login`` one.
        private: create the repository private.
        commit_message: defaults to ``"Upload <adapter type> adapter"``.
        command: optional command line shown in the card.

    Returns:
        The URL of the commit (``<endpoint>/<repo_id>/commit/<sha>``).

    Raises:
        TypeError: ``model`` is not a ``PeftModel``.
        MissingHubTokenError: no token was found, or the Hub rejected it.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"push_adapter needs a peft.PeftModel (from gin_adapter.get_gin_model or peft.get_peft_model), "
            f"got {type(model).__name__}. Push a full model with its own push_to_hub instead."
        )
    token = token or get_token()
    if not token:
        raise MissingHubTokenError(f"No Hugging Face token found, cannot push to {repo_id!r}. {_LOGIN_HINT}")

    from . import __version__

    api = HfApi(token=token, library_name="gin_adapter", library_version=__version__)
    adapter_type = _adapter_type(model)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code == 401:
            raise MissingHubTokenError(f"The Hub rejected the token while creating {repo_id!r}. {_LOGIN_HINT}") from err
        raise
    repo_id = repo_url.repo_id
    logger.info("Pushing %s adapter to %s", adapter_type, repo_url)

    with tempfile.TemporaryDirectory(prefix="gin_adapter_push_") as folder:
        model.save_pretrained(folder)
        config_path = Path(folder, "adapter_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else None
        card = build_model_card(base_model, metrics, adapter_type, config, command, repo_id=repo_id)
        Path(folder, "README.md").write_text(card, encoding="utf-8")  # replaces PEFT's generic card
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload {adapter_type} adapter",
        )
    logger.info("Pushed %s adapter to %s (commit %s)", adapter_type, repo_id, info.oid)
    return info.commit_url
