"""The comparison harness that ``train.py`` drives: GIN against LoRA at the same trainable-parameter budget.

Nothing in the adapter (``gin_adapter`` itself) imports this package; it imports the adapter like any PEFT user.

* :mod:`~gin_adapter.compare.config`: the YAML experiment schema (``TrainingConfig``, runs, data, budget);
* :mod:`~gin_adapter.compare.runs`: a trial (run x learning rate x seed) and the method registry
  (``WRAPPERS``: how a ``method:`` wraps the base model, and whether it starts as the identity);
* :mod:`~gin_adapter.compare.budget`: the LoRA rank (or GIN width) that matches the parameter counts;
* :mod:`~gin_adapter.compare.data`: documents, the train/validation split, tokenising and packing into blocks;
* :mod:`~gin_adapter.compare.evaluation`: corpus perplexity over all processes, through
  :mod:`~gin_adapter.compare.metrics.perplexity` (an ``evaluate`` metric module loaded by path);
* :mod:`~gin_adapter.compare.checks`: non-finite losses and the identity-at-initialisation check;
* :mod:`~gin_adapter.compare.checkpoints`: adapter-only Accelerate checkpoints, written atomically, resumed;
* :mod:`~gin_adapter.compare.outputs`: the output folder (refusing to mix configs) and atomic JSON;
* :mod:`~gin_adapter.compare.launch`: launcher pitfalls and trackers;
* :mod:`~gin_adapter.compare.stats`: mean +- std over seeds, paired differences with a 95 % interval;
* :mod:`~gin_adapter.compare.report`: the summary over seeds, the verdict, the table, ``results.json`` and plots;
* :mod:`~gin_adapter.compare.publish`: pushing the best run's adapter with a model card.
"""
