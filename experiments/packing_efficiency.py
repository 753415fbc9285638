"""How much of a batch is real tokens, with and without ``--packing``, on the default data (no model run).

Tokenizes the Rotten Tomatoes train split (seed 0) with the embedded SmolLM2 tokenizer, walks it in the training
order (EpochSampler, epoch 0) in batches of 8, and counts real tokens against the padded batch size. Counts, not
timings: the same on any machine. ``python experiments/packing_efficiency.py``
"""

from __future__ import annotations

from transformers import AutoTokenizer

from torchdora.app.assets import resolve_model
from torchdora.app.data import load_dataset, pack_examples, tokenize_examples
from torchdora.app.train.run import EpochSampler

BATCH = 8


def real_token_share(rows: list[dict[str, list[int]]]) -> tuple[int, int]:
    """(real tokens, tokens of the right-padded batches) over one epoch in training order."""
    order = list(EpochSampler(len(rows), seed=0))
    real = padded = 0
    for start in range(0, len(order), BATCH):
        lengths = [len(rows[i]["input_ids"]) for i in order[start : start + BATCH]]
        real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
    return real, padded


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    train = load_dataset(None, seed=0).train
    print("| max_length | packing | rows | batches of 8 | real tokens / batch tokens |")
    print("|---|---|---|---|---|")
    for max_length in (96, 256, 512):
        items = tokenize_examples(tokenizer, train, max_length)
        for packing, rows in (("off", items), ("on", pack_examples(items, max_length))):
            real, padded = real_token_share(rows)
            print(f"| {max_length} | {packing} | {len(rows)} | {-(-len(rows) // BATCH)} | "
                  f"{real} / {padded} = {100 * real / padded:.1f} % |")


if __name__ == "__main__":
    main()
