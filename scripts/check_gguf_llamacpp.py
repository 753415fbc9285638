"""Check ``torchdora merge --format gguf`` with llama.cpp itself: greedy tokens of the GGUF file under llama.cpp equal
the merged model's under PyTorch, for a fixed set of chat prompts (docs/serving.md records a run).

Needs ``pip install 'torchdora[gguf-check]'`` (llama-cpp-python, which builds llama.cpp from source). Not part of the
test suite: the build takes tens of minutes. The two sides get the same prompt token ids (the Hugging Face
tokenizer's), so a difference is the model's; the script also reports whether llama.cpp's own tokenizer, reading the
GGUF metadata, produces the same prompt ids.

Per prompt it reports the evidence a verdict needs: how many greedy tokens agree, the first position where they
differ, both sides' top-2 logit margin there (a near tie, one that the two implementations' rounding can flip, has a
margin below the logit difference), and the largest |logit difference| over the positions whose context is still
shared. llama.cpp runs twice per file: with its default f16 KV cache (what ``llama-cli`` and Ollama use) and with an
f32 cache (``type_k = type_v = f32``), which separates the file's weights from the cache's rounding.

    python scripts/check_gguf_llamacpp.py --adapter runs/main/adapter --outtypes f32,f16,q8_0

Without ``--adapter`` (and no ``runs/main/adapter``) it first trains a small one: ``torchdora train --steps 10``.
Exit status 0 when every prompt matches for f32 with the f32 cache, or differs only at a near tie (PyTorch's
margin there below the largest logit difference measured on the shared prefix); other outtypes are reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    "Is this review positive or negative? 'A moving, funny and beautifully acted film.'",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "List three colours.",
    "Summarise: the plot is thin but the actors save it.",
    "Translate to French: good morning.",
]
CACHES = {"f16": 1, "f32": 0}  # KV cache -> GGML_TYPE_F16 / GGML_TYPE_F32 (ggml.h's enum values)


def greedy_torch_logits(model, ids: list[int], n: int, eos: int | None) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation by argmax of the full forward (no cache: the plainest reference), with the last
    position's logits at every step (``logits[j]`` is the distribution token ``j`` was taken from)."""
    out, logits = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            row = model(torch.tensor([out])).logits[0, -1].double().numpy()
            logits.append(row)
            token = int(row.argmax())
            out.append(token)
            if token == eos:
                break
    return out[len(ids):], logits


def greedy_torch(model, ids: list[int], n: int, eos: int | None) -> list[int]:
    """The greedy tokens of :func:`greedy_torch_logits`."""
    return greedy_torch_logits(model, ids, n, eos)[0]


def greedy_llamacpp(llm, ids: list[int], n: int, eos: int | None) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation in llama.cpp: evaluate, take the argmax of the last position's logits, feed it back."""
    llm.reset()
    llm.eval(ids)
    out, logits = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        logits.append(row)
        token = int(row.argmax())
        out.append(token)
        if token == eos:
            break
        llm.eval([token])
    return out, logits


def top2_margin(row: np.ndarray) -> dict:
    """The two largest logits' token ids and their difference (how far the argmax is from a tie)."""
    first, second = np.argsort(row)[::-1][:2]
    return {"top2": [int(first), int(second)], "margin": float(row[first] - row[second])}


def compare(torch_run: tuple[list[int], list[np.ndarray]], llama_run: tuple[list[int], list[np.ndarray]]) -> dict:
    """One prompt's evidence: agreeing tokens, first difference, margins there, logit differences on shared context.

    The logits of step ``j`` on both sides come from the same context as long as tokens ``0..j-1`` agree, so steps
    ``0..first_difference`` (inclusive) are compared.
    """
    (ref, ref_logits), (got, got_logits) = torch_run, llama_run
    first = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    shared = min(len(ref_logits), len(got_logits)) if first is None else first + 1
    diffs = [np.abs(ref_logits[j] - got_logits[j]) for j in range(shared)]
    result = {
        "equal": ref == got, "matching_tokens": len(ref) if first is None else first, "first_difference_at": first,
        "max_abs_logit_diff": float(max(d.max() for d in diffs)),
        "max_rel_logit_diff": float(max(d.max() / np.abs(ref_logits[j]).max() for j, d in enumerate(diffs))),
        "min_torch_margin_on_shared": float(min(top2_margin(ref_logits[j])["margin"] for j in range(shared))),
    }
    if first is not None:
        result["torch_at_difference"] = top2_margin(ref_logits[first])
        result["llamacpp_at_difference"] = top2_margin(got_logits[first])
        result["near_tie"] = result["torch_at_difference"]["margin"] <= result["max_abs_logit_diff"]
    return result


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
    model = torchdora.merge_and_unload(torchdora.load_model(str(adapter), base=model)).float().eval()
    eos = tokenizer.eos_token_id
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False) for text in PROMPTS]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    reference = [greedy_torch_logits(model, ids, args.tokens, eos) for ids in prompt_ids]

    result = {"adapter": str(adapter), "tokens": args.tokens, "prompts": PROMPTS,
              "torch_text": [tokenizer.decode(r[0]) for r in reference], "runs": {}}
    ok = True
    for outtype in outtypes:
        for cache, ggml_type in CACHES.items():
            llm = Llama(model_path=str(work / f"merged-{outtype}.gguf"), n_ctx=512, n_threads=2, verbose=False,
                        logits_all=True,  # without it llama-cpp-python leaves `scores` unfilled (it samples in C)
                        type_k=ggml_type, type_v=ggml_type)
            same_prompt_ids = [llm.tokenize(text.encode(), add_bos=False, special=True) == ids
                               for text, ids in zip(prompts, prompt_ids)]
            runs = [greedy_llamacpp(llm, ids, args.tokens, eos) for ids in prompt_ids]
            per_prompt = [compare(r, g) for r, g in zip(reference, runs)]
            for entry, run in zip(per_prompt, runs):
                entry["llamacpp_text"] = tokenizer.decode(run[0])
            key = f"{outtype} file, {cache} KV cache"
            result["runs"][key] = {"outtype": outtype, "kv_cache": cache, "file_bytes": sizes[outtype],
                                   "merge_seconds": seconds[outtype], "llamacpp_tokenizer_equal": same_prompt_ids,
                                   "prompts": per_prompt}
            equal = sum(e["equal"] for e in per_prompt)
            print(f"{key}: {equal}/{len(per_prompt)} prompts give the same {args.tokens} greedy tokens; "
                  f"llama.cpp's tokenizer gives the same prompt ids for {sum(same_prompt_ids)}/{len(prompts)}; "
                  f"{sizes[outtype] / 2**20:.1f} MiB", flush=True)
            for i, e in enumerate(per_prompt):
                line = (f"  prompt {i}: {e['matching_tokens']}/{len(reference[i][0])} tokens equal, max |logit diff| "
                        f"on shared context {e['max_abs_logit_diff']:.3g} (rel {e['max_rel_logit_diff']:.2g})")
                if not e["equal"]:
                    t, g = e["torch_at_difference"], e["llamacpp_at_difference"]
                    line += (f"; first difference at {e['first_difference_at']}: torch top-2 {t['top2']} margin "
                             f"{t['margin']:.3g}, llama.cpp top-2 {g['top2']} margin {g['margin']:.3g}"
                             f"{' (near tie)' if e['near_tie'] else ''}")
                print(line, flush=True)
            if outtype == "f32" and cache == "f32":
                ok &= all(e["equal"] or e["near_tie"] for e in per_prompt)
            del llm
    (work / "llamacpp_check.json").write_text(json.dumps(result, indent=2))
    print(f"written {work / 'llamacpp_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
