"""torchdora: DoRA, Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024), for PyTorch.

    >>> import torchdora
    >>> config = torchdora.DoraConfig(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj"])
    >>> torchdora.inject(model, config)          # only adapter parameters stay trainable
    >>> torchdora.save_adapter(model, "out/")    # or format="peft"
    >>> model.save_pretrained("out/")            # transformers models: the adapter only (PEFT + torchdora)
    >>> model = torchdora.load_model("out/")     # base it records + adapter, frozen, in one call
    >>> torchdora.merge_and_unload(model)        # plain modules again, zero inference overhead

VeRA and DVoRA (VeRA's shared random projections, with DoRA's magnitude): ``DoraConfig(r=256, use_vera=True,
use_dora=False)`` and ``DoraConfig(r=256, use_vera=True)``.
"""

from torchdora.adapters import (
    active_adapters,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    list_adapters,
    mixed_batch,
    set_adapter,
    using_adapter,
)
from torchdora.config import DoraConfig
from torchdora.inject import (
    adapter_config,
    adapter_layers,
    clear_cache,
    disable_adapters,
    find_targets,
    inject,
    merge,
    merge_and_unload,
    trainable_parameter_count,
    unload,
    unmerge,
)
from torchdora.hf import load_model
from torchdora.io import load_adapter, read_adapter, save_adapter
from torchdora.layers import (
    AdapterLayer, ConvAdapter, EmbeddingAdapter, Int8LinearAdapter, Linear4bitAdapter, LinearAdapter, VeraAdapter,
    VeraProjection,
)

__version__ = "0.1.0"

__all__ = [
    "DoraConfig",
    "AdapterLayer",
    "LinearAdapter",
    "ConvAdapter",
    "EmbeddingAdapter",
    "Linear4bitAdapter",
    "Int8LinearAdapter",
    "VeraAdapter",
    "VeraProjection",
    "inject",
    "find_targets",
    "adapter_layers",
    "adapter_config",
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
    "disable_adapters",
    "clear_cache",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapter",
    "active_adapters",
    "list_adapters",
    "using_adapter",
    "add_weighted_adapter",
    "mixed_batch",
    "trainable_parameter_count",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "load_model",
]
