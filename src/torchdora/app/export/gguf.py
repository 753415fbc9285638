"""A merged Llama-architecture model as one GGUF file (llama.cpp, Ollama, LM Studio): ``torchdora merge --format gguf``.

The file holds what llama.cpp needs to run the model with nothing beside it: the hyper-parameters under ``llama.*``,
the weights under GGUF's tensor names (``gguf.TensorNameMap``), the tokenizer (``tokenizer.ggml.*``: tokens, token
types, BPE merges, special ids) and the chat template. Weights are written in ``outtype``: ``f32``, ``f16``, ``bf16``
or ``q8_0`` (blocks of 32 int8 values with one f16 scale, through ``gguf.quants``); 1-D tensors (the RMSNorm weights)
stay f32 as llama.cpp's own converter keeps them, and a matrix whose rows are not whole q8_0 blocks falls back to f16.

Two layout rules of GGUF's Llama differ from Hugging Face's (llama.cpp's ``convert_hf_to_gguf.py`` is the reference
converter; this module is written from the formats, not from its code):

* the rotary embedding rotates adjacent pairs ``(2i, 2i+1)`` of each head, where Hugging Face's rotates
  ``(i, i + d/2)``, so the rows of ``q_proj`` and ``k_proj`` are permuted per head (:func:`permute_rotary_rows`);
* GGUF stores a matrix's shape fastest-dimension first: ``(out, in)`` reads as ``[in, out]``; the bytes are the same.

The tokenizer is written as what it is: a GPT-2-style byte-level BPE (SmolLM2, the embedded default) becomes
``tokenizer.ggml.model = gpt2`` with the pre-tokenizer name llama.cpp knows it by; other kinds are refused by name.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["OUTTYPES", "GGUFTensor", "check_gguf_export", "check_gguf_options", "permute_rotary_rows", "gguf_pre_tokenizer",
           "vocab_for_gguf", "gguf_tensors", "write_gguf"]

#: --outtype -> (gguf.GGMLQuantizationType name of the matrices, gguf.LlamaFileType name recorded in the file)
OUTTYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}
#: Hugging Face architectures GGUF's ``llama`` expresses exactly (the same blocks, RMSNorm, SwiGLU, rotary)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
_Q8_0_BLOCK = 32  # values per q8_0 block: a row must be a whole number of blocks


def check_gguf_export(config: PretrainedConfig, outtype: str) -> None:
    """Refuse, before any weight is loaded, what this exporter cannot write faithfully.

    Raises:
        ValueError: an unknown ``outtype``, an architecture other than Llama, or a Llama variant GGUF's ``llama``
            would run differently (rope scaling, biases).
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if getattr(config, "model_type", None) != "llama" or architecture not in (None, *SUPPORTED_ARCHITECTURES):
        raise ValueError(
            f"GGUF export supports the Llama architecture (Llama, SmolLM2, the embedded default), not "
            f"{architecture or type(config).__name__} (model_type {getattr(config, 'model_type', None)!r}); merge to a folder "
            "(--format hf) and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"GGUF export does not write rope scaling ({rope.get('rope_type', rope.get('type'))!r}) "
                         "yet; merge to a folder (--format hf) and convert it with llama.cpp's convert_hf_to_gguf.py")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("GGUF export does not write Llama attention/MLP biases yet; merge to a folder (--format hf)")


def check_gguf_options(model: str | os.PathLike, outtype: str | None, dtype: str | None = None) -> None:
    """``torchdora merge --format gguf``'s options against the base model folder or hub name ``model``, before
    its weights load (:func:`check_gguf_export`); ``dtype`` (``--dtype``) belongs to the folder format."""
    from transformers import AutoConfig

    if dtype is not None:
        raise ValueError("--dtype sets the weights of a merged folder; a GGUF file takes --outtype "
                         f"({', '.join(OUTTYPES)})")
    check_gguf_export(AutoConfig.from_pretrained(model), outtype or "f16")


def permute_rotary_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a ``q_proj``/``k_proj`` weight ``(n_head·d, in)`` reordered from Hugging Face's rotary layout (each
    head's dimension ``i`` rotates with ``i + d/2``) to GGUF's (``2i`` with ``2i+1``): within each head, row
    ``h·d + 2i + j`` of the result is row ``h·d + j·d/2 + i`` of ``weight`` (``j`` in {0, 1})."""
    rows = weight.shape[0]
    d = rows // n_head
    return weight.reshape(n_head, 2, d // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)  # (H, d/2, 2, in)


def gguf_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """The name llama.cpp gives the pre-tokenizer of a byte-level BPE ``tokenizer.json`` (``tokenizer.ggml.pre``).

    ``gpt-2``: GPT-2's regex split (ByteLevel with ``use_regex``, no prefix space); ``smollm``: the same after
    splitting every digit (SmolLM/SmolLM2's original tokenizer).
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def gpt2_regex(step: dict[str, Any]) -> bool:
        return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")

    if len(steps) == 1 and gpt2_regex(steps[0]):
        return "gpt-2"
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and gpt2_regex(steps[1])):
        return "smollm"
    raise ValueError(f"GGUF export knows the GPT-2 and SmolLM byte-level pre-tokenizers, not {json.dumps(pre)}; "
                     "merge to a folder (--format hf) and convert it with llama.cpp's convert_hf_to_gguf.py")


@dataclass(frozen=True)
class GGUFVocab:
    """The ``tokenizer.ggml.*`` arrays: ``tokens[i]`` is token id ``i`` as the tokenizer spells it (byte-level
    characters), ``types[i]`` its ``gguf.TokenType``; ``pre`` the pre-tokenizer's llama.cpp name."""

    pre: str
    tokens: list[str]
    types: list[int]


def vocab_for_gguf(tokenizer: PreTrainedTokenizerBase, n_vocab: int) -> GGUFVocab:
    """Tokens and their types for ``n_vocab`` embedding rows (ids past the tokenizer's are ``[PAD<i>]``, unused).

    Special added tokens (``<|im_start|>``) are CONTROL, other added tokens USER_DEFINED, the rest NORMAL.
    """
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    model = backend.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"GGUF export writes GPT-2-style byte-level BPE tokenizers (SmolLM2, Llama 3), not "
                         f"{type(tokenizer).__name__} ({model.get('type', 'no tokenizer.json')}); merge to a folder "
                         "(--format hf) and convert it with llama.cpp's convert_hf_to_gguf.py")
    pre = gguf_pre_tokenizer(backend)
    size = len(tokenizer)
    if size > n_vocab:
        raise ValueError(f"the tokenizer has {size} tokens but the model only {n_vocab} embedding rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    spelled = tokenizer.convert_ids_to_tokens(list(range(size)))
    for i in range(n_vocab):
        if i >= size or spelled[i] is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(added[i].content)
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(spelled[i])
            types.append(int(gguf.TokenType.NORMAL))
    return GGUFVocab(pre=pre, tokens=tokens, types=types)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as written: its GGUF name, its data (a quantized type's raw bytes per row) and its type name."""

    name: str
    data: np.ndarray
    qtype: str


def _encode(tensor: torch.Tensor, qtype: str) -> np.ndarray:
    import gguf

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if qtype == "F32":
        return data
    if qtype == "F16":
        return data.astype(np.float16)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[qtype])


def gguf_tensors(model: PreTrainedModel, outtype: str) -> list[GGUFTensor]:
    """The state dict of a plain (merged) Llama model under GGUF names, q/k rows permuted, encoded in ``outtype``.

    Raises:
        ValueError: a tensor with no GGUF name (the model has parts GGUF's ``llama`` cannot express).
    """
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    matrix_type = OUTTYPES[outtype][0]
    out = []
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads a missing output.weight as tied to token_embd
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"GGUF's llama has no tensor for {key!r}; merge to a folder (--format hf) instead")
        if key.endswith("q_proj.weight"):
            tensor = permute_rotary_rows(tensor, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            tensor = permute_rotary_rows(tensor, config.num_key_value_heads)
        qtype = "F32" if tensor.dim() == 1 else matrix_type
        if qtype == "Q8_0" and tensor.shape[-1] % _Q8_0_BLOCK:
            qtype = "F16"  # rows of whole q8_0 blocks only (llama.cpp's converter falls back the same way)
        out.append(GGUFTensor(name, _encode(tensor, qtype), qtype))
    return out


def _rope_theta(config: PretrainedConfig) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_hyperparameters(writer: Any, config: PretrainedConfig, name: str, outtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(int(gguf.LlamaFileType[OUTTYPES[outtype][1]]))


def _add_tokenizer(writer: Any, tokenizer: PreTrainedTokenizerBase, n_vocab: int) -> None:
    """Tokens, types, merges, special ids, add-bos/eos flags and the chat template (gguf's ``SpecialVocab`` reads
    the last four from the tokenizer's saved files, as llama.cpp's converter does)."""
    import gguf

    vocab = vocab_for_gguf(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ValueError("the tokenizer has no BPE merges to write; llama.cpp could not tokenize with it")
    # what the tokenizer does, not what a config file may say: llama.cpp adds BOS to a gpt2 vocab unless told not to
    with_specials, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    for kind, at, token_id in (("bos", 0, tokenizer.bos_token_id), ("eos", -1, tokenizer.eos_token_id)):
        special.add_special_token[kind] = token_id is not None and len(with_specials) > len(plain) and (
            with_specials[at] == token_id)
    special.add_to_gguf(writer, quiet=True)


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike,
               outtype: str = "f16", name: str | None = None) -> Path:
    """Write a plain (merged) Llama ``model`` and its ``tokenizer`` as one GGUF file at ``path``, atomically (a
    temporary name in the same folder, then a rename).

    Raises:
        ValueError: see :func:`check_gguf_export`, :func:`vocab_for_gguf` and :func:`gguf_tensors`.
    """
    import gguf

    from torchdora.files import default_mode

    check_gguf_export(model.config, outtype)
    path = Path(path)
    tensors = gguf_tensors(model, outtype)  # every refusal before a byte is written
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _add_hyperparameters(writer, model.config, name or path.stem, outtype)
        _add_tokenizer(writer, tokenizer, model.config.vocab_size)
        for t in tensors:
            raw = None if t.qtype in ("F32", "F16") else gguf.GGMLQuantizationType[t.qtype]
            writer.add_tensor(t.name, t.data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, default_mode())  # mkstemp's 0600 would hide the model from other users of the machine
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
