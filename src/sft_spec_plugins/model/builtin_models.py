"""Tiny random-weight causal LMs with chat tokenizers, built offline and cached on disk.

They exist so the whole SFT pipeline (templating, masking, full and LoRA training,
generation, 4-bit loading) can be exercised in seconds on a CPU without downloads.

Tokenizer: byte-level BPE with the 256 ByteLevel alphabet symbols and *no merges*,
so every UTF-8 byte is one token and nothing is trained (fully deterministic).
Any text round-trips through encode/decode, Chinese included; special tokens in
text are matched as single tokens. Offsets (``return_offsets_mapping=True``) are
character offsets into the original string: the 3 byte-tokens of one Chinese
character all carry that character's span, e.g. "微" -> (0, 1), (0, 1), (0, 1).

Weights come from a fixed seed, so two builds give byte-identical safetensors.
initializer_range is 0.2 rather than the usual 0.02: with 0.02 the logits are so
flat that LoRA adapters cannot move them within a few dozen steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from sft_spec import hookimpl
from sft_spec.errors import did_you_mean
from sft_spec.state import LoadedModel

from ..common.files import building_directory
from .gguf import PACKAGED_MODELS  # builtin: names of real models, served by the gguf loader
from .pretrained import BUILTIN_PREFIX, load_pretrained

# Bump when anything that changes the built files changes: old caches are then ignored.
BUILD_VERSION = 1

_SEED = 1234

BUILTIN_MODELS: dict[str, str] = {
    "tiny-gemma": "Tiny random GemmaForCausalLM (128 hidden, 2 layers) with the Gemma-IT chat template",
    "tiny-chatml": "Tiny random LlamaForCausalLM (128 hidden, 2 layers) with a SmolLM2-style ChatML template",
}

# The chat template shipped with google/gemma-2b-it and gemma-7b-it.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# SmolLM2-Instruct's template, with a neutral default system message.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Shared model sizes. All widths are multiples of 32 so bitsandbytes 4-bit works.
_SIZES: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "initializer_range": 0.2,
}


# NamedTuple rather than a dataclass: a dataclass with string annotations fails when the module is
# exec'd from a file path without being registered in sys.modules first.
class _Spec(NamedTuple):
    arch: str  # "gemma" or "llama"
    specials: tuple[str, ...]  # ids 0.. in this order, byte tokens follow
    bos: str
    eos: str
    pad: str
    unk: str | None
    end_of_turn: str
    chat_template: str
    add_bos: bool  # tokenizer prepends bos on encode, as the real tokenizer does


_SPECS: dict[str, _Spec] = {
    "tiny-gemma": _Spec(
        arch="gemma",
        specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        end_of_turn="<end_of_turn>",
        chat_template=GEMMA_CHAT_TEMPLATE,
        add_bos=True,
    ),
    "tiny-chatml": _Spec(
        arch="llama",
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos="<|endoftext|>",
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        end_of_turn="<|im_end|>",
        chat_template=CHATML_CHAT_TEMPLATE,
        add_bos=False,
    ),
}


def builtin_model_dir(name: str, cache_dir: Path) -> Path:
    """Return a directory holding a saved model (save_pretrained, safetensors) + tokenizer
    for builtin NAME, building it on first use under cache_dir/"builtin"/f"{name}-v{BUILD_VERSION}".

    The build goes into a temp dir in the same parent and is then renamed into place, so a
    killed build never leaves half a directory; if another process won the race, use theirs.
    Unknown name -> KeyError with a message listing the available names.
    """
    if name not in _SPECS:
        raise KeyError(f"unknown builtin model {name!r}; available: {', '.join(sorted(BUILTIN_MODELS))}")
    parent = Path(cache_dir) / "builtin"
    final = parent / f"{name}-v{BUILD_VERSION}"
    if final.is_dir():
        return final
    with building_directory(final) as tmp:
        _build(_SPECS[name], tmp)
    return final


def _build_tokenizer(spec: _Spec) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(spec.specials)}
    for sym in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[sym] = len(vocab)
    # No merges: one token per byte, deterministic and lossless for any UTF-8 text.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.specials])
    if spec.add_bos:
        bos_id = vocab[spec.bos]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)]
        )

    kwargs: dict[str, Any] = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad}
    if spec.unk is not None:
        kwargs["unk_token"] = spec.unk
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=2048, **kwargs)
    tokenizer.chat_template = spec.chat_template
    return tokenizer


def _build(spec: _Spec, out_dir: Path) -> None:
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer(spec)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in spec.specials}
    token_ids = {"bos_token_id": ids[spec.bos], "eos_token_id": ids[spec.eos], "pad_token_id": ids[spec.pad]}

    model: Any
    # fork_rng: seed for reproducible weights without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        if spec.arch == "gemma":
            config = GemmaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **_SIZES, **token_ids)
            model = GemmaForCausalLM(config)
        else:
            config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **_SIZES, **token_ids)
            model = LlamaForCausalLM(config)
    model = model.to(torch.float32).eval()

    eos_ids = [ids[spec.eos]] if spec.eos == spec.end_of_turn else [ids[spec.eos], ids[spec.end_of_turn]]
    gen = model.generation_config
    gen.bos_token_id = ids[spec.bos]
    gen.eos_token_id = eos_ids
    gen.pad_token_id = ids[spec.pad]

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


class BuiltinLoader:
    """``builtin:NAME``: tiny random models built offline on first use and cached."""

    def claims(self, model_spec) -> bool:
        # Other builtin: names are the gguf loader's packaged models, or a typo this loader explains.
        return model_spec.id.startswith(BUILTIN_PREFIX) and model_spec.id[len(BUILTIN_PREFIX):] not in PACKAGED_MODELS

    def validate(self, model_spec) -> str | None:
        name = model_spec.id[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            return did_you_mean(name, [*BUILTIN_MODELS, *PACKAGED_MODELS], "builtin model")
        for key in ("revision", "gguf_file", "tokenizer"):
            if getattr(model_spec, key):
                return f"model.{key} does not apply to {model_spec.id}: built-in models are built offline, whole"
        return None

    def load(self, model_spec, config, *, quantization=None) -> LoadedModel:
        name = model_spec.id[len(BUILTIN_PREFIX):]
        directory = builtin_model_dir(name, Path(config.cache_dir))
        return load_pretrained(str(directory), model_spec, config, quantization=quantization,
                               source=f"{model_spec.id} ({BUILTIN_MODELS[name]})")


@hookimpl(trylast=True)
def sft_spec_register_model_loaders(register) -> None:
    register("builtin", BuiltinLoader(), "tiny random models that need no download: " + ", ".join(
        f"builtin:{n}" for n in BUILTIN_MODELS))
