"""Hub round trips over real HTTP against a local fake Hub (tests/fake_hub.py): push, then load back.

The real huggingface_hub client, PEFT and transformers code runs unpatched; only the endpoint points at
127.0.0.1, and resolving any other host name fails during these tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import hf_hub_download, model_info, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from gin_adapter.hub import MissingHubTokenError, build_model_card, push_adapter

try:
    from fake_hub import FakeHub, fake_hub  # noqa: F401 - fake_hub is a pytest fixture
except ImportError:  # tests/ is not on sys.path (e.g. --import-mode=importlib)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fake_hub import FakeHub, fake_hub  # noqa: F401

BASE_ID = "tiny-org/tiny-llama"
METRICS = {"validation_perplexity": 12.3456, "train_steps": 60, "dataset": "wiki-intros"}


def tiny_llama() -> LlamaForCausalLM:
    """The same random tiny Llama on every call."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_lora() -> PeftModel:
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(tiny_llama(), config).eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    input_ids = torch.arange(2 * 9).reshape(2, 9) % 128
    return model(input_ids=input_ids).logits


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def assert_clean(hub: FakeHub) -> None:
    assert hub.unhandled == [], f"requests the fake hub does not serve: {hub.unhandled}"
    assert hub.blocked_hosts == [], f"tried to reach other hosts: {hub.blocked_hosts}"


# -- model card ------------------------------------------------------------------------------------


def test_build_model_card_has_metadata_metrics_loading_code_and_config():
    config = {"peft_type": "GIN", "hidden_dim": 8, "target_modules": {"self_attn"}}
    card = build_model_card(
        BASE_ID, METRICS, config=config, command="python train.py --config configs/gin.yaml", repo_id="me/gin"
    )
    meta = front_matter(card)
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == BASE_ID
    assert {"gin-adapter", "sparse-gin", "peft"} <= set(meta["tags"])
    assert "| validation_perplexity | 12.3456 |" in card
    assert "| train_steps | 60 |" in card
    assert "| dataset | wiki-intros |" in card
    assert 'PeftModel.from_pretrained(base, "me/gin")' in card
    assert "import gin_adapter" in card
    assert '"hidden_dim": 8' in card
    assert "python train.py --config configs/gin.yaml" in card


def test_build_model_card_license_and_local_base_path(tmp_path):
    known = front_matter(build_model_card("HuggingFaceTB/SmolLM2-135M-Instruct", {}))
    assert known["license"] == "apache-2.0"
    assert "license" not in front_matter(build_model_card(BASE_ID, {}))
    # A local folder is no Hub id: kept out of the metadata (the Hub would reject it) but named in the text.
    card = build_model_card(str(tmp_path), {"validation_perplexity": 3.0}, adapter_type="LoRA")
    assert "base_model" not in front_matter(card)
    assert str(tmp_path) in card
    assert "lora" in front_matter(card)["tags"] and "sparse-gin" not in front_matter(card)["tags"]


# -- push_adapter ----------------------------------------------------------------------------------


def test_push_adapter_lora_round_trip_over_http(fake_hub):
    model = tiny_lora()
    url = push_adapter(model, "user/tiny-lora", METRICS, base_model=BASE_ID)

    commits = fake_hub.commits("user/tiny-lora")
    assert len(commits) == 2, "everything goes up in one commit after the repository's initial one"
    assert url == f"{fake_hub.url}/user/tiny-lora/commit/{commits[0].oid}"
    files = fake_hub.files("user/tiny-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert front_matter(card)["base_model"] == BASE_ID
    assert "12.3456" in card and "validation_perplexity" in card
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"

    loaded = PeftModel.from_pretrained(tiny_llama(), "user/tiny-lora").eval()
    assert ("GET", "/user/tiny-lora/resolve/main/adapter_model.safetensors") in fake_hub.requests
    assert (logits(loaded) - logits(model)).abs().max().item() == 0.0
    assert not torch.equal(logits(loaded), logits(tiny_llama())), "the LoRA adapter must change the outputs"
    assert_clean(fake_hub)


def test_push_adapter_again_commits_only_what_changed(fake_hub):
    model = tiny_lora()
    push_adapter(model, "user/tiny-lora", METRICS, base_model=BASE_ID)
    weights = fake_hub.files("user/tiny-lora")["adapter_model.safetensors"]
    push_adapter(model, "user/tiny-lora", {"validation_perplexity": 11.0}, base_model=BASE_ID, commit_message="New ppl")

    latest = fake_hub.commits("user/tiny-lora")[0]
    assert latest.summary == "New ppl"
    assert "| validation_perplexity | 11 |" in latest.files["README.md"].decode()
    assert latest.files["adapter_model.safetensors"] == weights
    info = model_info("user/tiny-lora")
    assert info.sha == latest.oid
    assert info.card_data.base_model == BASE_ID
    assert_clean(fake_hub)


def test_plain_peft_push_to_hub_works(fake_hub):
    model = tiny_lora()
    model.push_to_hub("user/plain-lora")

    files = fake_hub.files("user/plain-lora")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    folder = Path(snapshot_download("user/plain-lora"))
    assert (folder / "adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(tiny_llama(), "user/plain-lora").eval()
    assert (logits(loaded) - logits(model)).abs().max().item() == 0.0
    assert_clean(fake_hub)


def test_push_adapter_without_token_says_how_to_log_in(fake_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(MissingHubTokenError, match="hf auth login"):
        push_adapter(tiny_lora(), "user/no-token", METRICS, base_model=BASE_ID)
    assert not fake_hub.repo_exists("user/no-token")
    assert fake_hub.requests == []


def test_push_adapter_with_a_rejected_token(fake_hub):
    with pytest.raises(MissingHubTokenError, match="rejected"):
        push_adapter(tiny_lora(), "user/bad-token", METRICS, base_model=BASE_ID, token="not-the-token")
    assert not fake_hub.repo_exists("user/bad-token")


def test_push_adapter_needs_a_peft_model(fake_hub):
    with pytest.raises(TypeError, match="PeftModel"):
        push_adapter(tiny_llama(), "user/not-peft", METRICS, base_model=BASE_ID)
    assert fake_hub.requests == []


def test_private_repo_and_client_errors(fake_hub, tmp_path):
    push_adapter(tiny_lora(), "user/private-lora", METRICS, base_model=BASE_ID, private=True)
    assert hf_hub_download("user/private-lora", "adapter_config.json")  # with the token
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/private-lora", "adapter_config.json", token=False, cache_dir=tmp_path / "no-token")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/private-lora", "missing.bin")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/does-not-exist", "adapter_config.json")


# -- GIN adapter -----------------------------------------------------------------------------------


def test_push_gin_adapter_round_trip(fake_hub):
    from gin_adapter import GinConfig, get_gin_model

    model = get_gin_model(tiny_llama(), GinConfig(hidden_dim=8)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # the adapter only; moves it away from its (near-)identity init
                param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    reference = logits(model)
    assert not torch.equal(reference, logits(tiny_llama())), "the perturbed GIN adapter must change the outputs"

    push_adapter(model, "user/tiny-gin", METRICS, base_model=BASE_ID)
    files = fake_hub.files("user/tiny-gin")
    assert json.loads(files["adapter_config.json"])["peft_type"] == "GIN"
    assert "sparse-gin" in front_matter(files["README.md"].decode())["tags"]

    loaded = PeftModel.from_pretrained(tiny_llama(), "user/tiny-gin").eval()
    assert (logits(loaded) - reference).abs().max().item() == 0.0

    io = pytest.importorskip("gin_adapter.io")
    checked = io.load_gin_model(tiny_llama(), "user/tiny-gin").eval()  # snapshot_download path
    assert (logits(checked) - reference).abs().max().item() == 0.0
    assert_clean(fake_hub)
