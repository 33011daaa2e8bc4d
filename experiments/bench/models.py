"""Models for the efficiency benchmarks: real checkpoints through `s2ft.models`, or random-initialised shapes.

Timing and memory depend on shapes, not on weight values, so the paper's models (LLaMA2-7B/13B) are benchmarked as
random-initialised LLaMA architectures of the same shape; nothing has to be downloaded.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from s2ft.models import DTYPES, MODEL_SHAPES, build_model


def _shape(name: str) -> dict:
    """`s2ft.models.MODEL_SHAPES[name]`'s config fields (untied unless the model ties its embeddings; the benchmark
    sets the position range itself)."""
    family, fields = MODEL_SHAPES[name]
    if family != "llama":
        raise ValueError(f"{name} is a {family} model; the benchmark builds LLaMA shapes")
    return {"tie_word_embeddings": False} | {k: v for k, v in fields.items() if k != "max_position_embeddings"}


# Benchmark model -> its shape in the table (LLaMA2-13B has LLaMA-13B's shape).
SHAPE_OF = {"smollm2_135m_shape": "smollm2_135m", "llama2_7b_shape": "llama2_7b", "llama2_13b_shape": "llama_13b"}
SHAPES = {name: _shape(model) for name, model in SHAPE_OF.items()}
CHECKPOINTS = ("smollm2_135m", "tiny_llama")
MODELS = CHECKPOINTS + tuple(SHAPES)


def build_bench_model(name: str, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    """Builds a benchmark model in training mode, every parameter still trainable.

    Args:
        name: one of `MODELS`: a checkpoint name understood by `s2ft.models.build_model`, or a `*_shape` name
            (random-initialised LLaMA architecture).
        dtype: parameter dtype, one of `DTYPES`.
        device: torch device string ("cpu", "cuda").

    Returns:
        The causal LM on `device`.
    """
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; choose one of {', '.join(MODELS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if name in SHAPES:
        config = LlamaConfig(max_position_embeddings=4096, attention_dropout=0.0, **SHAPES[name])
        # Initialise directly on the target device and dtype: a 13B model does not fit in fp32 host memory.
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=DTYPES[dtype])
    else:
        model, _ = build_model(name, dtype=dtype)
        model = model.to(device)
    model.requires_grad_(True)
    return model.train()
