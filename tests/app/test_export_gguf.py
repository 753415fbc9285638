"""``torchdora merge --format gguf``: the GGUF file read back by transformers' GGUF loader (an independent reader,
which undoes the rotary permutation itself) gives the merged model's logits, per outtype.

Each outtype is checked twice: exactly (fp32 round-off) against the merged model with its matrices rounded the way
the outtype stores them (by plain code here: f16/bf16 casts, q8_0 blocks of 32 with scale max|x|/127), and loosely
against the unrounded merged model, with the tolerance stated per outtype.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import torchdora
from conftest import perturb_adapters
from test_train import one_thread  # noqa: F401 (autouse fixture)
from torchdora.app import cli
from torchdora.app.export.gguf import permute_rotary_rows

TEXTS = ["the film was good and fun", "a boring dull movie, 123 minutes", "Is this review positive? Answer:"]
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
#: max |logit difference| / max |logit| against the unrounded merged model (random weights of scale 0.2, 2 blocks)
LOOSE = {"f32": 1e-6, "f16": 5e-3, "bf16": 4e-2, "q8_0": 1e-1}


def _bpe_tokenizer():
    """A GPT-2-style byte-level BPE (SmolLM2's kind) trained on a few sentences, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHAT
    return tokenizer


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """A tiny Llama (GQA 4/2 heads, head dim 16, untied head) with a BPE tokenizer, a perturbed DoRA adapter on it,
    and the merged model as the reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    model = LlamaForCausalLM.from_pretrained(root / "model")
    torchdora.inject(model, torchdora.DoraConfig(r=4, alpha=8, target_modules="all-linear"))
    perturb_adapters(model, seed=2)
    torchdora.save_adapter(model, root / "adapter", base_model_name_or_path=str(root / "model"))
    return root / "model", root / "adapter", torchdora.merge_and_unload(model).eval()


def _q8_0_round_trip(w: torch.Tensor) -> torch.Tensor:
    """q8_0 by its definition (ggml's reference quantizer): blocks of 32 along a row, d = max|x|/127 in fp32,
    q = round-half-away(x · (1/d)) in int8, and d stored as f16: the value read back is q · f16(d)."""
    blocks = w.reshape(-1, 32).float()
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    scaled = blocks * torch.where(d > 0, 1 / d, 0)
    q = scaled.sign() * (scaled.abs() + 0.5).floor()
    return (q * d.half().float()).reshape(w.shape)


ROUND = {"f32": lambda w: w, "f16": lambda w: w.half().float(), "bf16": lambda w: w.bfloat16().float(),
         "q8_0": _q8_0_round_trip}


def _rounded_copy(merged: torch.nn.Module, outtype: str, model_dir: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    copy = LlamaForCausalLM.from_pretrained(model_dir).eval()
    copy.load_state_dict(merged.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            if p.dim() == 2:  # matrices take the outtype; 1-D norms stay f32
                p.copy_(ROUND[outtype](p))
    return copy


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_transformers_reads_back_the_merged_model(merged_run, tmp_path, outtype):
    from transformers import AutoModelForCausalLM

    model_dir, adapter, merged = merged_run
    out = tmp_path / f"merged-{outtype}.gguf"
    assert cli.main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--output", str(out),
                     "--format", "gguf", "--outtype", outtype]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, expected = back(ids).logits, merged(ids).logits
        rounded = _rounded_copy(merged, outtype, model_dir)(ids).logits
    # the same weights (after the outtype's rounding) in the same fp32 model: fp32 round-off of the forward
    assert_close(got, rounded, rtol=1e-5, atol=1e-5)
    assert (got - expected).abs().max() <= LOOSE[outtype] * expected.abs().max()
    assert merged.config.tie_word_embeddings is back.config.tie_word_embeddings is False


def test_tokenizer_and_chat_template_travel_in_the_file(merged_run, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    model_dir, adapter, _ = merged_run
    out = tmp_path / "merged.gguf"
    assert cli.main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--output", str(out),
                     "--format", "gguf"]) == 0
    from torchdora.files import default_mode

    assert out.stat().st_mode & 0o777 == default_mode()  # not the temporary file's private 0600
    reader = gguf.GGUFReader(out)
    fields = {name: reader.fields[name].contents() for name in (
        "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.chat_template", "general.file_type", "tokenizer.ggml.add_bos_token")}
    assert fields == {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                      "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                      "tokenizer.chat_template": CHAT, "general.file_type": 1,  # 1: mostly f16, the default
                      "tokenizer.ggml.add_bos_token": False}  # as the tokenizer: it adds no BOS
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [int(gguf.TokenType.CONTROL)] * 3 and set(types[3:]) == {int(gguf.TokenType.NORMAL)}
    original, back = _bpe_tokenizer(), AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in TEXTS:
        assert back(text, add_special_tokens=False)["input_ids"] == original(text)["input_ids"]


def test_rotary_permutation_pairs_i_with_i_plus_half():
    n_head, d = 3, 8
    w = torch.arange(n_head * d, dtype=torch.float32)[:, None].repeat(1, 2)  # row k holds k
    got = permute_rotary_rows(w, n_head)[:, 0].long().tolist()
    # GGUF row h·d + 2i + j is Hugging Face row h·d + j·d/2 + i
    assert got == [h * d + j * d // 2 + i for h in range(n_head) for i in range(d // 2) for j in range(2)]


def test_bad_input_is_one_line(merged_run, tiny_gpt2, tmp_path, capsys):
    model_dir, adapter, _ = merged_run
    gpt2_dir, gpt2_adapter = tmp_path / "gpt2", tmp_path / "gpt2-adapter"
    tiny_gpt2.save_pretrained(gpt2_dir)
    torchdora.inject(tiny_gpt2, torchdora.DoraConfig(r=2, target_modules=["c_attn"]))
    torchdora.save_adapter(tiny_gpt2, gpt2_adapter)
    (tmp_path / "exists.gguf").write_bytes(b"")
    base = ["merge", "--model", str(model_dir), "--adapter", str(adapter), "--format", "gguf"]
    cases = [
        (["merge", "--model", str(gpt2_dir), "--adapter", str(gpt2_adapter), "--format", "gguf", "--output",
          str(tmp_path / "g.gguf")], "GGUF export supports the Llama architecture (Llama, SmolLM2, the embedded "
                                     "default), not GPT2LMHeadModel (model_type 'gpt2')"),
        ([*base, "--outtype", "q4_k", "--output", str(tmp_path / "a.gguf")],
         "unknown --outtype 'q4_k'; choose one of f32, f16, bf16, q8_0"),
        ([*base, "--output", str(tmp_path / "exists.gguf")], "already exists; choose another folder or pass --overwrite"),
        ([*base[:-2], "--outtype", "f16", "--output", str(tmp_path / "b")], "add --format gguf, or drop it"),
        ([*base, "--dtype", "float16", "--output", str(tmp_path / "c.gguf")], "a GGUF file takes --outtype"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        code = cli.main(argv)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, lines)
    assert not (tmp_path / "a.gguf").exists() and (tmp_path / "exists.gguf").read_bytes() == b""
