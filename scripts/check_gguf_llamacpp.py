"""Check ``torchdora merge --format gguf`` with llama.cpp itself: greedy tokens of the GGUF file under llama.cpp equal
the merged model's under PyTorch, for a fixed set of chat prompts (docs/serving.md records a run).

Needs ``pip install 'torchdora[gguf-check]'`` (llama-cpp-python, which builds llama.cpp from source). Not part of the
test suite: the build takes tens of minutes. The two sides get the same prompt token ids (the Hugging Face
tokenizer's), so a difference is the model's; the script also reports whether llama.cpp's own tokenizer, reading the
GGUF metadata, produces the same prompt ids.

    python scripts/check_gguf_llamacpp.py --adapter runs/main/adapter --outtypes f32,f16,q8_0

Without ``--adapter`` (and no ``runs/main/adapter``) it first trains a small one: ``torchdora train --steps 10``.
Exit status 0 when every prompt matches for f32 and f16; q8_0 is reported (its rounding may flip a near tie).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PROMPTS = [
    "Is this review positive or negative? 'A moving, funny and beautifully acted film.'",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "List three colours.",
    "Summarise: the plot is thin but the actors save it.",
    "Translate to French: good morning.",
]
MUST_MATCH = ("f32", "f16")


def greedy_torch(model, ids: list[int], n: int, eos: int | None) -> list[int]:
    """Greedy continuation by argmax of the full forward (no cache: the plainest reference)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([out])).logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
    return out[len(ids):]


def greedy_llamacpp(llm, ids: list[int], n: int, eos: int | None) -> list[int]:
    """Greedy continuation in llama.cpp: evaluate, take the argmax of the last position's logits, feed it back."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == eos:
            break
        llm.eval([token])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default="runs/main/adapter")
    p.add_argument("--outtypes", default="f32,f16,q8_0")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens per prompt")
    p.add_argument("--work", default="runs/gguf-check", help="folder for the GGUF files and the result JSON")
    p.add_argument("--reuse", action="store_true", help="use merged-<outtype>.gguf files already in --work")
    args = p.parse_args(argv)

    try:
        from llama_cpp import Llama
    except ImportError:
        print("needs llama-cpp-python: pip install 'torchdora[gguf-check]'", file=sys.stderr)
        return 2
    import torchdora
    from torchdora.app import cli
    from torchdora.app.assets import load_model_and_tokenizer, model_for_adapter

    work = Path(args.work)
    adapter = Path(args.adapter)
    if not adapter.is_dir():
        print(f"no adapter at {adapter}: training a small one (torchdora train --steps 10)", flush=True)
        if cli.main(["train", "--steps", "10", "--output-dir", str(work / "train"), "--max-eval", "8",
                     "--eval-every", "0"]) != 0:
            return 1
        adapter = work / "train" / "adapter"

    outtypes = args.outtypes.split(",")
    sizes, seconds = {}, {}
    for outtype in outtypes:
        path = work / f"merged-{outtype}.gguf"
        start = time.perf_counter()
        if args.reuse and path.is_file():
            sizes[outtype], seconds[outtype] = path.stat().st_size, None
            continue
        if cli.main(["merge", "--adapter", str(adapter), "--format", "gguf", "--outtype", outtype,
                     "--output", str(path), "--overwrite"]) != 0:
            return 1
        seconds[outtype] = round(time.perf_counter() - start, 1)
        sizes[outtype] = path.stat().st_size

    model, tokenizer = load_model_and_tokenizer(model_for_adapter(None, str(adapter)))
    model = torchdora.merge_and_unload(torchdora.load_model(str(adapter), base=model))
    eos = tokenizer.eos_token_id
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False) for text in PROMPTS]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    reference = [greedy_torch(model, ids, args.tokens, eos) for ids in prompt_ids]

    result = {"adapter": str(adapter), "tokens": args.tokens, "prompts": PROMPTS, "outtypes": {}}
    ok = True
    for outtype in outtypes:
        llm = Llama(model_path=str(work / f"merged-{outtype}.gguf"), n_ctx=512, n_threads=2, verbose=False,
                    logits_all=True)  # without it llama-cpp-python leaves `scores` unfilled (it samples in C)
        same_prompt_ids = [llm.tokenize(text.encode(), add_bos=False, special=True) == ids
                           for text, ids in zip(prompts, prompt_ids)]
        got = [greedy_llamacpp(llm, ids, args.tokens, eos) for ids in prompt_ids]
        equal = [g == r for g, r in zip(got, reference)]
        first_diff = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), None) for g, r in zip(got, reference)]
        result["outtypes"][outtype] = {
            "file_bytes": sizes[outtype], "merge_seconds": seconds[outtype], "greedy_equal": equal,
            "first_difference_at": first_diff, "llamacpp_tokenizer_equal": same_prompt_ids,
            "llamacpp_text": [tokenizer.decode(g) for g in got],
        }
        print(f"{outtype:>5}: {sum(equal)}/{len(equal)} prompts give the same {args.tokens} greedy tokens; "
              f"llama.cpp's tokenizer gives the same prompt ids for {sum(same_prompt_ids)}/{len(prompts)}; "
              f"{sizes[outtype] / 2**20:.1f} MiB")
        ok &= outtype not in MUST_MATCH or all(equal)
        del llm
    result["torch_text"] = [tokenizer.decode(r) for r in reference]
    (work / "llamacpp_check.json").write_text(json.dumps(result, indent=2))
    print(f"written {work / 'llamacpp_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
