"""The experiment config of ``train.py`` (one YAML file): dataclasses with validation.

One YAML file describes one experiment: a model, a corpus, a training recipe and
a list of runs (``method: gin`` or ``method: lora``) that share that recipe, the
learning rates and the seeds. A file with a single top-level ``method:`` (and
optional ``gin:``/``lora:`` blocks) is shorthand for one run.

Every mistake is reported as a ``ValueError`` that names the field, the value
and what to do, before any model is loaded::

    cfg = TrainingConfig.from_yaml("configs/compare.yaml", overrides=["max_steps=5"])
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from .allocator import CPU_ALLOCATOR_HINT, CPU_ALLOCATORS
from .yaml_config import apply_override, load_yaml

METHODS = ("gin", "lora", "peft")
DATA_SOURCES = ("wiki", "jargon", "hub", "files")
MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "all")

Method = Literal["gin", "lora", "peft"]
DataSource = Literal["wiki", "jargon", "hub", "files"]
DebugNonFinite = Literal["loss", "grad"]


def _help(text: str, **kwargs: Any) -> Any:
    """A dataclass field carrying a one-line help text (PEFT style)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes fixed-length training blocks."""

    source: DataSource = _help("'wiki' (embedded Wikipedia intros), 'jargon' (the Jargon File, fetched by scripts/setup.sh), 'hub' (datasets.load_dataset(name)) or 'files' (local text/json/csv)", default="wiki")
    name: str | None = _help("dataset name or local dataset folder for source=hub", default=None)
    subset: str | None = _help("dataset configuration name for source=hub (the second argument of load_dataset)", default=None)
    split: str = _help("split to read documents from (slicing such as 'train[:5000]' works)", default="train")
    val_split: str | None = _help("an existing validation split to use instead of hashing documents into train/val", default=None)
    files: list[str] = _help("local files for source=files (.txt, .json/.jsonl, .csv; one builder per run)", default_factory=list)
    text_column: str = _help("column holding the document text (ignored when a template is given)", default="text")
    template: str | None = _help("str.format template over the columns, e.g. '### User: {question} ### Assistant: {answer}'", default=None)
    split_key: str | None = _help("column whose hash puts a document in train or val (default: title for wiki, the text otherwise)", default=None)
    block_size: int = _help("tokens per packed block (documents are joined with eos and cut into blocks)", default=256)
    val_fraction: float = _help("fraction of documents (by hash of split_key) held out for validation", default=0.05)
    max_documents: int | None = _help("use at most this many documents (a fixed random subset, taken before splitting and tokenising)", default=None)
    max_train_blocks: int | None = _help("keep at most this many training blocks (a fixed random subset)", default=None)
    max_val_blocks: int | None = _help("keep at most this many validation blocks (a fixed random subset)", default=None)

    def validate(self) -> None:
        _check_choice("data.source", self.source, DATA_SOURCES)
        if self.source == "hub" and not self.name:
            raise ValueError("data.name is required when data.source='hub': give a dataset name or a local dataset folder.")
        if self.source == "files" and not self.files:
            raise ValueError("data.files is empty but data.source='files': list one or more .txt/.json/.jsonl/.csv files.")
        if isinstance(self.files, str):
            self.files = [self.files]
        _check_positive_int("data.block_size", self.block_size)
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 < self.val_fraction < 1.0) and self.val_split is None:
            raise ValueError(f"data.val_fraction={self.val_fraction!r} must be strictly between 0 and 1 (e.g. 0.05).")
        for name in ("max_documents", "max_train_blocks", "max_val_blocks"):
            value = getattr(self, name)
            if value is not None:
                _check_positive_int(f"data.{name}", value)


@dataclass
class LoraSettings:
    """LoRA (PEFT) settings of a ``method: lora`` run."""

    r: int | None = _help("LoRA rank; null = chosen so the trainable parameters match the GIN run (see budget)", default=None)
    alpha: float | None = _help("lora_alpha; null = 2 * r", default=None)
    target_modules: list[str] = _help("names of the Linear modules LoRA adapts", default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = _help("lora_dropout", default=0.0)

    def validate(self, where: str) -> None:
        if self.r is not None:
            _check_positive_int(f"{where}.r", self.r)
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not self.target_modules:
            raise ValueError(f"{where}.target_modules is empty: name at least one Linear module, e.g. [q_proj, v_proj].")


@dataclass
class RunConfig:
    """One fine-tuning run of the comparison: a method and its settings."""

    name: str = _help("label of the run in results.json, plots and adapters/<name>/")
    method: Method = _help("'gin' (Sparse-GIN adapter), 'lora' (PEFT LoRA, rank matched to a GIN run) or 'peft' (any PEFT method, given as a PEFT config)", default="gin")
    gin: dict[str, Any] = _help("GinConfig fields for method=gin (GinConfig(**gin)); 'preset: published' starts from GinConfig.published()", default_factory=dict)
    lora: LoraSettings = _help("LoRA settings for method=lora", default_factory=LoraSettings)
    peft: dict[str, Any] = _help("for method=peft: a PEFT config as a mapping with peft_type, e.g. {peft_type: IA3, target_modules: [k_proj, v_proj, down_proj], feedforward_modules: [down_proj]}", default_factory=dict)
    budget_reference: str | None = _help("for method=lora with r: null: the GIN run whose parameter count the rank matches (default: budget.reference)", default=None)
    baseline: str | None = _help("the run this run is compared with in the summary (paired differences over shared seeds), e.g. the LoRA run of its budget", default=None)
    learning_rates: list[float] | None = _help("overrides the top-level learning_rates for this run", default=None)

    def validate(self, where: str) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"{where}.name={self.name!r} must be a non-empty folder-safe string (no '/').")
        _check_choice(f"{where}.method", self.method, METHODS, hint="Other PEFT methods run as method: peft with peft: {peft_type: ..., ...}.")
        if self.method != "gin" and self.gin:
            raise ValueError(f"{where} has method={self.method!r} but a gin: block; remove it or set method: gin.")
        if not isinstance(self.gin, dict):
            raise ValueError(f"{where}.gin must be a mapping of GinConfig fields, got {self.gin!r}.")
        if self.gin.get("preset", "published") != "published":
            raise ValueError(f"{where}.gin.preset={self.gin['preset']!r} is not known; the only preset is 'published' (GinConfig.published()).")
        if self.method == "peft" and not (isinstance(self.peft, dict) and self.peft.get("peft_type")):
            raise ValueError(f"{where} has method=peft but no peft: {{peft_type: ...}} block; e.g. peft: {{peft_type: IA3, target_modules: [k_proj, v_proj, down_proj], feedforward_modules: [down_proj]}}.")
        if self.method != "peft" and self.peft:
            raise ValueError(f"{where} has method={self.method!r} but a peft: block; remove it or set method: peft.")
        self.lora.validate(f"{where}.lora")
        if self.learning_rates is not None:
            _check_learning_rates(f"{where}.learning_rates", self.learning_rates)


@dataclass
class BudgetConfig:
    """How the LoRA rank (or the GIN hidden size) is matched to equal trainable parameters."""

    match: bool = _help("choose LoRA ranks left null so LoRA and GIN train the same number of parameters", default=True)
    tolerance: float = _help("largest allowed relative difference |lora - gin| / gin", default=0.05)
    reference: str | None = _help("name of the GIN run whose parameter count sets the budget (default: the first GIN run)", default=None)

    def validate(self) -> None:
        if not (isinstance(self.tolerance, (int, float)) and 0 < self.tolerance < 1):
            raise ValueError(f"budget.tolerance={self.tolerance!r} must be in (0, 1), e.g. 0.05 for 5 %.")


@dataclass
class TrainingConfig:
    """A whole experiment: shared recipe, data, and the runs to compare."""

    model: str = _help("Hub id, local folder, or 'embedded' (the packaged SmolLM2-135M-Instruct)", default="embedded")
    dtype: str = _help("dtype the weights are loaded in: float32, bfloat16, float16 or auto", default="float32")
    attn_implementation: str | None = _help("attention implementation passed to from_pretrained (null = the model default)", default=None)
    output_dir: str = _help("results folder (results.json, plots, adapters, checkpoints)", default="runs/compare")
    data: DataConfig = _help("corpus and blocking", default_factory=DataConfig)
    runs: list[RunConfig] = _help("the runs to compare; each is trained for every learning rate and seed", default_factory=list)
    learning_rates: list[float] = _help("peak learning rates tried for every run (the best one is reported)", default_factory=lambda: [2e-4])
    seeds: list[int] = _help("seeds of the learning-rate sweep: every run is trained at every rate with each of these", default_factory=lambda: [0])
    extra_seeds: list[int] = _help("more seeds, trained only at each run's best learning rate once its sweep is done; the summary gives mean and std over all seeds there", default_factory=list)
    extend_grid: int = _help("how many times a run's learning-rate grid may grow by one rate beyond an edge when its best rate sits at that edge (by the grid's ratio, 3 for a single rate)", default=0)
    ood: DataConfig | None = _help("an out-of-domain corpus scored for the base model and after every trial (forgetting), e.g. {source: jargon, block_size: 256, max_val_blocks: 100}", default=None)
    max_steps: int = _help("optimizer steps per run", default=100)
    per_device_batch_size: int = _help("blocks per device per micro-batch", default=4)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", default=1)
    eval_batch_size: int = _help("blocks per device per evaluation batch", default=4)
    warmup_steps: int = _help("linear warmup steps before the constant learning rate", default=50)
    max_grad_norm: float | None = _help("gradient clipping norm (null = no clipping)", default=0.5)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    eval_every: int = _help("evaluate validation perplexity every N steps (0 = only at the end)", default=0)
    log_every: int = _help("log the training loss (and GIN scales) every N steps", default=1)
    checkpoint_every: int = _help("save a resumable checkpoint every N steps (0 = never)", default=0)
    keep_checkpoints: int = _help("complete checkpoints kept per run (older ones are deleted)", default=2)
    log_with: list[str] = _help("Accelerate trackers, e.g. [tensorboard, trackio] (default: none)", default_factory=list)
    mixed_precision: str | None = _help("no/fp16/bf16; null = whatever the Accelerate config or launch flags say", default=None)
    budget: BudgetConfig = _help("parameter-budget matching between GIN and LoRA", default_factory=BudgetConfig)
    cpu_allocator: str = _help("'keep': freed CPU tensors stay mapped for the next step (glibc mallopt; about 1 s less system time per 4 x 256 step on SmolLM2-135M, the resident set stays at its peak); 'system': the C library's defaults. Numbers are the same either way", default="keep")
    ddp_find_unused_parameters: bool = _help("pass find_unused_parameters to DDP (only needed if an adapter leaves parameters unused)", default=False)
    export_adapter_dtype: str = _help("dtype of the adapters/<run>/ copies of each run's best trial: float32 or bfloat16 (half the size, for committing results)", default="float32")
    debug_crash_at_step: int | None = _help("testing only: os._exit(17) right after this step (checkpoint included) of the first run reaching it; ignored with --resume", default=None)
    debug_non_finite_at_step: int | None = _help("testing only: make a value NaN at this step of the first run reaching it, so the non-finite checks stop the run; ignored with --resume", default=None)
    debug_non_finite: DebugNonFinite = _help("what debug_non_finite_at_step makes NaN: 'loss' (caught by the loss check) or 'grad' (every gradient, caught by the gradient-norm check after clipping; needs max_grad_norm)", default="loss")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainingConfig:
        """Build and validate a config from a plain mapping (e.g. parsed YAML)."""
        if not isinstance(raw, dict):
            raise ValueError(f"the config must be a mapping of fields, got {type(raw).__name__}.")
        raw = dict(raw)
        single = {key: raw.pop(key) for key in ("method", "gin", "lora", "name") if key in raw}
        if single:
            if raw.get("runs"):
                raise ValueError(f"the config has both runs: and top-level {sorted(single)}; put method/gin/lora inside runs:.")
            single.setdefault("method", "gin")
            single.setdefault("name", str(single["method"]))
            raw["runs"] = [single]
        _check_keys("config", raw, cls)
        kwargs: dict[str, Any] = dict(raw)
        if "data" in raw:
            kwargs["data"] = _build(DataConfig, raw["data"] or {}, "data")
        if "budget" in raw:
            kwargs["budget"] = _build(BudgetConfig, raw["budget"] or {}, "budget")
        if raw.get("ood") is not None:
            kwargs["ood"] = _build(DataConfig, raw["ood"], "ood")
        runs = raw.get("runs") or []
        if not isinstance(runs, list):
            raise ValueError(f"runs must be a list of runs, got {runs!r}.")
        built = []
        for i, run in enumerate(runs):
            if not isinstance(run, dict):
                raise ValueError(f"runs[{i}] must be a mapping like {{name: gin, method: gin}}, got {run!r}.")
            run = dict(run)
            run.setdefault("name", str(run.get("method", f"run{i}")))
            if "lora" in run:
                run["lora"] = _build(LoraSettings, run["lora"] or {}, f"runs[{i}].lora")
            for block in ("gin", "peft"):
                if run.get(block) is None:
                    run[block] = {}
            built.append(_build(RunConfig, run, f"runs[{i}]"))
        kwargs["runs"] = built
        for name in ("log_with", "learning_rates", "seeds", "extra_seeds"):
            if name in kwargs and not isinstance(kwargs[name], list):
                kwargs[name] = [kwargs[name]]
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainingConfig:
        """Read a YAML file, apply ``key.sub=value`` overrides (values parsed as YAML), validate."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist; pass --config configs/quick.yaml or another YAML file.")
        raw = load_yaml(path.read_text()) or {}
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable copy (stored in results.json)."""
        return dataclasses.asdict(self)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a Hub id, a local folder or 'embedded'.")
        _check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))
        self.data.validate()
        self.budget.validate()
        if not self.runs:
            raise ValueError("runs is empty: add e.g. runs: [{name: gin, method: gin}, {name: lora, method: lora}] or a top-level method: gin.")
        names = [run.name for run in self.runs]
        for i, run in enumerate(self.runs):
            run.validate(f"runs[{i}]")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"run names must be unique; {duplicated} appear more than once. Give each run its own name:.")
        if self.budget.reference is not None:
            gin_names = [run.name for run in self.runs if run.method == "gin"]
            if self.budget.reference not in gin_names:
                raise ValueError(f"budget.reference={self.budget.reference!r} is not the name of a GIN run; GIN runs: {gin_names}.")
        needs_budget = [run.name for run in self.runs if run.method == "lora" and run.lora.r is None]
        if needs_budget and not (self.budget.match and any(run.method == "gin" for run in self.runs)):
            raise ValueError(
                f"LoRA run(s) {needs_budget} have lora.r: null, which means 'match the GIN budget', but "
                f"{'budget.match is false' if not self.budget.match else 'there is no GIN run'}; set lora: {{r: 8}} explicitly."
            )
        _check_learning_rates("learning_rates", self.learning_rates)
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"seeds={self.seeds!r} must be a non-empty list of integers, e.g. [0, 1].")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds!r} contains duplicates.")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in self.extra_seeds) or set(self.extra_seeds) & set(self.seeds) or len(set(self.extra_seeds)) != len(self.extra_seeds):
            raise ValueError(f"extra_seeds={self.extra_seeds!r} must be distinct integers not already in seeds={self.seeds!r}.")
        if not isinstance(self.extend_grid, int) or isinstance(self.extend_grid, bool) or self.extend_grid < 0:
            raise ValueError(f"extend_grid={self.extend_grid!r} must be an integer >= 0 (0: never extend the learning-rate grid).")
        if self.ood is not None:
            self.ood.validate()
        for run in self.runs:
            for field_name in ("budget_reference", "baseline"):
                other = getattr(run, field_name)
                if other is not None and other not in names:
                    raise ValueError(f"run {run.name!r}: {field_name}={other!r} is not the name of a run; runs: {names}.")
            if run.budget_reference is not None and (run.method != "lora" or not any(r.name == run.budget_reference and r.method == "gin" for r in self.runs)):
                raise ValueError(f"run {run.name!r}: budget_reference must name a GIN run and is for method: lora runs only.")
        for name in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "eval_batch_size", "log_every", "keep_checkpoints"):
            _check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0.")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r} must be positive or null (no clipping).")
        _check_choice("export_adapter_dtype", self.export_adapter_dtype, ("float32", "bfloat16"))
        _check_choice("cpu_allocator", self.cpu_allocator, CPU_ALLOCATORS, hint=CPU_ALLOCATOR_HINT)
        if self.mixed_precision is not None:
            _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        for tracker in self.log_with:
            _check_choice("log_with", tracker, TRACKERS, hint="Use e.g. log_with: [tensorboard].")
        if self.debug_crash_at_step is not None:
            _check_positive_int("debug_crash_at_step", self.debug_crash_at_step)
        if self.debug_non_finite_at_step is not None:
            _check_positive_int("debug_non_finite_at_step", self.debug_non_finite_at_step)
        _check_choice("debug_non_finite", self.debug_non_finite, get_args(DebugNonFinite))
        if self.debug_non_finite == "grad" and self.debug_non_finite_at_step is not None and self.max_grad_norm is None:
            raise ValueError("debug_non_finite='grad' needs max_grad_norm: the gradient norm is only computed (and checked) when "
                             "gradients are clipped. Set max_grad_norm (e.g. 1.0) or use debug_non_finite: loss.")

    def learning_rates_for(self, run: RunConfig) -> list[float]:
        """The learning rates tried for ``run`` (its own list, else the shared one)."""
        return list(run.learning_rates if run.learning_rates is not None else self.learning_rates)

    def comparable_dict(self) -> dict[str, Any]:
        """The fields that must not change when a run is resumed."""
        d = self.to_dict()
        for key in ("log_with", "export_adapter_dtype", "cpu_allocator", "debug_crash_at_step", "debug_non_finite_at_step", "debug_non_finite", "output_dir",
                    "checkpoint_every", "keep_checkpoints"):
            d.pop(key, None)
        return d


# ---------------------------------------------------------------------- helpers
def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping, got {raw!r}.")
    _check_keys(where, raw, cls)
    required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ValueError(f"{where} lacks required field(s) {missing}.")
    return cls(**raw)


def _check_keys(where: str, raw: dict[str, Any], cls: type) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}; valid fields are {sorted(known)}.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...], hint: str = "") -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {list(choices)}. {hint}".rstrip())


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


def _check_learning_rates(name: str, values: Any) -> None:
    if not isinstance(values, list) or not values:
        raise ValueError(f"{name}={values!r} must be a non-empty list of positive numbers, e.g. [2e-4].")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} contains {value!r}; learning rates must be finite positive numbers.")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}={values!r} contains duplicates.")


__all__ = ["load_yaml", "TrainingConfig", "DataConfig", "RunConfig", "LoraSettings", "BudgetConfig", "apply_override", "METHODS"]
assert set(get_args(Method)) == set(METHODS)
