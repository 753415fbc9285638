"""What each ``--outtype`` of ``torchdora merge --format gguf`` costs on a real adapter: file size, merge+write time,
and how far transformers' GGUF reader (an independent reader of the file) lands from the merged PyTorch model.

For each outtype the merged model is written with the command itself, read back with
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``, and compared on a fixed set of chat prompts:
the largest |logit difference| relative to the largest |logit|, and whether the greedy next tokens (``--tokens`` of
them, by plain argmax without a cache) are the same. Also records the size of the merged Hugging Face folder
(``--format hf``) for comparison. Writes a CSV (docs/data/) and prints it.

    python experiments/gguf_outtypes.py --adapter runs/main/adapter
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from check_gguf_llamacpp import PROMPTS, greedy_torch  # noqa: E402  (the same prompts and greedy reference)

from torchdora.files import atomic_write_bytes  # noqa: E402

COLUMNS = ["format", "outtype", "file_bytes", "merge_seconds", "read_seconds", "max_abs_logit_diff",
           "max_rel_logit_diff", "greedy_equal", "prompts"]


def write_csv(rows: list[dict], out: str) -> str:
    """The rows as CSV at ``out`` (atomically, after every outtype, so an interrupted run keeps what it measured)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue().encode())
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default="runs/main/adapter")
    p.add_argument("--outtypes", nargs="+", default=["f32", "f16", "bf16", "q8_0"])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--work", default="runs/gguf-outtypes")
    p.add_argument("--out", default="docs/data/gguf_outtypes.csv")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    import torchdora
    from torchdora.app import cli
    from torchdora.app.assets import load_model_and_tokenizer, model_for_adapter

    work = Path(args.work)
    model, tokenizer = load_model_and_tokenizer(model_for_adapter(None, args.adapter))
    merged = torchdora.merge_and_unload(torchdora.load_model(args.adapter, base=model))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=False) for t in PROMPTS]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts]
    eos = tokenizer.eos_token_id
    reference = [greedy_torch(merged, i, args.tokens, eos) for i in ids]
    with torch.no_grad():
        ref_logits = [merged(torch.tensor([i])).logits[0] for i in ids]

    rows = []
    start = time.perf_counter()
    assert cli.main(["merge", "--adapter", args.adapter, "--output", str(work / "hf"), "--overwrite"]) == 0
    hf_bytes = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
    rows.append({"format": "hf folder", "outtype": "float32", "file_bytes": hf_bytes,
                 "merge_seconds": round(time.perf_counter() - start, 1)})
    for outtype in args.outtypes:
        path = work / f"merged-{outtype}.gguf"
        start = time.perf_counter()
        assert cli.main(["merge", "--adapter", args.adapter, "--format", "gguf", "--outtype", outtype,
                         "--output", str(path), "--overwrite"]) == 0
        seconds = round(time.perf_counter() - start, 1)
        start = time.perf_counter()  # weights and config only: the model loader does not rebuild the tokenizer
        back = AutoModelForCausalLM.from_pretrained(work, gguf_file=path.name, dtype=torch.float32).eval()
        read_seconds = round(time.perf_counter() - start, 1)
        with torch.no_grad():
            diffs = [(back(torch.tensor([i])).logits[0] - r).abs().max() for i, r in zip(ids, ref_logits)]
        rel = max(float(d / r.abs().max()) for d, r in zip(diffs, ref_logits))
        equal = sum(greedy_torch(back, i, args.tokens, eos) == r for i, r in zip(ids, reference))
        rows.append({"format": "gguf", "outtype": outtype, "file_bytes": path.stat().st_size, "merge_seconds": seconds,
                     "read_seconds": read_seconds, "max_abs_logit_diff": f"{float(max(diffs)):.3g}",
                     "max_rel_logit_diff": f"{rel:.3g}", "greedy_equal": equal, "prompts": len(ids)})
        print(rows[-1], flush=True)
        write_csv(rows, args.out)
        del back

    print(write_csv(rows, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
