"""The fine-tuning application around the adapter library: the ``torchdora`` command and what it runs.

- ``cli.py``: the command dispatcher (``torchdora <command>``, ``python -m torchdora``).
- ``train/``: ``torchdora train`` (config and parser, the run, the loop, the run folder's outputs).
- ``data.py``, ``assets.py``: datasets and the embedded offline model.
- ``evaluate.py``, ``generate.py``, ``merging.py``: ``torchdora eval``, ``generate``, ``merge``.
- ``checkpoint.py``: resume checkpoints (safetensors + JSON); ``plotting.py``: the training curve.

The library (``torchdora`` outside ``app/`` and ``analysis/``) never imports this package.
"""
