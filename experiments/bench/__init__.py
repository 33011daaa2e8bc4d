"""The efficiency benchmarks: each writes `results.json`, a markdown table `results.md` and a chart `results.png`.

Commands (`python -m experiments.bench.NAME --help`):

- `training`: training-step time and peak memory of S2FT against LoRA, DoRA, full fine-tuning, SpFT and the floor;
- `switch`: adapter-switching cost of S2FT against LoRA, on one layer and on a whole model;
- `serving`: mixed-adapter batches of S2FT against PEFT LoRA, S2FT exported to LoRA, and switching;
- `layout`: S2FT's training step with index-gathered units against co-permuted contiguous blocks;
- `redraw`: the tables and charts again from a benchmark folder's `results.json`.

`gpu.sh` runs the GPU measurements on a lent machine. The other modules are the commands' parts: `train_worker`
(one training measurement, in a fresh process), `switch_layer` / `switch_model`, `serving_layer` / `serving_model`,
`models` (benchmark models), `machine` (where it ran), `timing`, `targets` (S2FT's target records and their
line) and `results` (tables, charts, files).
"""

import warnings


def silence_peft_deprecation() -> None:
    """Hides transformers' `is_gradient_checkpointing` FutureWarning, and nothing else.

    PEFT's `get_peft_model` reads the deprecated property on every model it wraps (transformers 5 warns), so each
    LoRA / DoRA the benchmarks build printed it between their own lines; the warning is about PEFT's code, not ours.
    Every benchmark module imports this package, so the filter below holds for all of them and their worker processes.
    """
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


silence_peft_deprecation()
