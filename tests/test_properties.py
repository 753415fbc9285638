"""Every combination of adapter operations against the definitions: random sequences, float64 references.

Hypothesis draws a layer kind (Linear, transformers Conv1D, Conv2d, Embedding; each model has two adaptable
modules), a seed and a sequence of operations: add an adapter (the first one injects) with a method (DoRA, LoRA,
VeRA, DVoRA, magnitude-only, DoRA with recompute), switch active subsets, merge subsets, unmerge,
merge-and-unload, save and load in both formats, combine adapters with weights, delete one, mixed-adapter batches,
disable the adapters. After every step the model's output is compared with a reference written from the
definitions alone: the test keeps its own copy of the pre-trained weights and of each adapter's tensors, and
builds each layer's weight as

    W' = W + Σ_{applied i} Δ_i,   Δ_i = diag(m_i / ||W + V_i||) (W + V_i) − W   (DoRA, DVoRA, magnitude-only)
                                  Δ_i = V_i                                     (LoRA, VeRA)

with ``V_i = s_i B_i A_i`` (LoRA/DoRA; magnitude-only: 0) or ``Λ_b B Λ_d A`` (VeRA/DVoRA), every norm against
the pre-trained ``W`` (paper eq. 5 per adapter; several active adapters add their updates, docs/adapters.md).
The weighted combination's reference is its definition (``V = Σ w_i V_i``, ``m = ||W|| + Σ w_i (m_i − ||W||)``).
Operations the rules refuse (an active adapter left unmerged beside merged ones, switching while merged, ...) must
raise and leave the model as it was. Everything runs in float64, so the tolerance is rtol 1e-6 on outputs that
go through up to two adapted layers; saving rounds adapter tensors to fp32, which the reference then does too
(after checking the loaded tensors are exactly the rounded ones).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.testing import assert_close

import torchdora
from torchdora import DoraConfig, adapter_layers

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS = ("linear", "conv1d", "conv2d", "embedding")
METHODS = ("dora", "lora", "vera", "dvora", "magnitude_only", "dora_recompute")
OPS = ("add", "add", "set", "merge", "unmerge", "unload_merged", "save_load", "weighted", "delete", "mixed",
       "disable", "forward")
RTOL = 1e-6


def _assert_matches(got: Tensor, want: Tensor) -> None:
    """Relative tolerance 1e-6, elementwise and against the output's scale (an element near 0 carries the round-off
    of its larger terms; a PEFT file loads fp32 adapter tensors, whose products round at ~1e-7)."""
    assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.detach().abs().max()))


# ---- the models: two adaptable modules each, named "0" and "2" ------------------------------------------------
def _make(kind: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)), torch.randn(3, 6)
    elif kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        model, x = nn.Sequential(Conv1D(5, 6), nn.Tanh(), Conv1D(4, 5)), torch.randn(3, 6)
    elif kind == "conv2d":
        model, x = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 1)), torch.randn(2, 2, 4, 4)
    else:
        model, x = nn.Sequential(nn.Embedding(9, 5), nn.Tanh(), nn.Linear(5, 3)), torch.randint(0, 9, (2, 4))
    model = model.double().eval()
    return model, (x.double() if x.is_floating_point() else x)


def _is_linear(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear", "Conv1D")


def _weight_2d(module: nn.Module) -> Tensor:
    """The pre-trained weight as ``(out, in)`` rows, as DoRA normalises it (one norm per output feature)."""
    w = module.weight.detach().clone()
    kind = type(module).__name__
    if kind == "Conv1D":
        return w.T
    if kind == "Embedding":
        return w.T  # (dim, vocabulary): the output feature is the embedding dimension
    return w.reshape(w.shape[0], -1)


def _apply(module: nn.Module, weight_2d: Tensor, x: Tensor) -> Tensor:
    """The module's own operation with weight ``weight_2d`` (plain torch ops, nothing of torchdora)."""
    kind = type(module).__name__
    bias = getattr(module, "bias", None)
    if kind in ("Linear", "Conv1D"):
        return x @ weight_2d.T + bias
    if kind == "Conv2d":
        return F.conv2d(x, weight_2d.reshape(module.weight.shape), bias, padding=module.padding)
    return weight_2d.T[x]


# ---- the reference ---------------------------------------------------------------------------------------------
@dataclass
class Terms:
    """One adapter on one module, from the definitions: the direction update ``V`` and the magnitude (or None)."""

    update: Tensor  # (out, in)
    magnitude: Tensor | None


@dataclass
class Reference:
    modules: dict[str, nn.Module]  # the plain modules ("0", "2"), their weights as pre-trained
    weights: dict[str, Tensor]
    adapters: dict[str, dict[str, Terms]] = field(default_factory=dict)  # name -> module -> terms
    methods: dict[str, str] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)

    def delta(self, module: str, name: str) -> Tensor:
        w, t = self.weights[module], self.adapters[name][module]
        if t.magnitude is None:
            return t.update
        v = w + t.update
        return (t.magnitude / torch.linalg.vector_norm(v, dim=1))[:, None] * v - w

    def weight(self, module: str, names: list[str]) -> Tensor:
        w = self.weights[module].clone()
        for name in names:
            if module in self.adapters[name]:
                w = w + self.delta(module, name)
        return w

    def output(self, model_modules: list[nn.Module], x: Tensor, names: list[str]) -> Tensor:
        h = x
        for i, module in enumerate(model_modules):
            key = str(i)
            if key in self.modules:
                h = _apply(self.modules[key], self.weight(key, names), h)
            else:
                h = module(h)
        return h


def _terms(layer: nn.Module, name: str, method: str) -> Terms:
    """Read adapter ``name``'s tensors off ``layer`` (its parameters and VeRA's frozen pair) as the definition."""
    with layer.using(name):
        params = {k: v.detach().double() for k, v in layer.adapter_parameters().items()}  # PEFT files: fp32
        if method in ("vera", "dvora"):
            out, inp = layer.out_features, layer.in_features
            a = layer.vera_projection.vera_A[:, :inp].double()
            b = layer.vera_projection.vera_B[:out, :].double()
            update = (params["vera_lambda_b"][:, None] * b) @ (params["vera_lambda_d"][:, None] * a)
        elif "lora_A" in params:
            r = params["lora_A"].shape[0]
            update = layer.scaling * params["lora_B"].reshape(-1, r) @ params["lora_A"].reshape(r, -1)
        else:
            update = torch.zeros_like(_weight_2d(layer.base))
        return Terms(update, params.get("magnitude"))


def _perturb(model: nn.Module, name: str, rng: random.Random) -> None:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    with torch.no_grad(), torchdora.using_adapter(model, name):
        for layer in adapter_layers(model).values():
            for p in layer.adapter_parameters().values():
                p.add_(0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _config(method: str, targets: tuple[str, ...], rng: random.Random) -> DoraConfig:
    r = rng.choice([1, 2, 3])
    common = dict(r=r, alpha=float(rng.choice([1, 2, 4])), target_modules=targets, dtype="float64")
    if method in ("vera", "dvora"):
        return DoraConfig(r=r, target_modules=targets, dtype="float64", use_vera=True, use_dora=method == "dvora",
                          projection_prng_key=rng.randrange(1000), d_initial=0.5)
    if method == "lora":
        return DoraConfig(use_dora=False, **common)
    if method == "magnitude_only":
        return DoraConfig(magnitude_only_modules=targets[:1], **common)
    if method == "dora_recompute":
        return DoraConfig(recompute_modules=targets, **common)
    return DoraConfig(**common)


class Run:
    """The model under test beside its reference; each operation changes both, then the outputs are compared."""

    def __init__(self, kind: str, seed: int) -> None:
        self.kind, self.rng = kind, random.Random(seed)
        self.model, self.x = _make(kind)
        self.ref = Reference({k: copy.deepcopy(self.model[int(k)]) for k in ("0", "2")},
                             {k: _weight_2d(self.model[int(k)]) for k in ("0", "2")})
        self.count = 0

    # -- checks
    def _modules(self) -> list[nn.Module]:
        return list(self.model)

    def check(self, names: list[str] | None = None) -> None:
        with torch.no_grad():
            got = self.model(self.x)
            want = self.ref.output(self._modules(), self.x, self.ref.active if names is None else names)
        _assert_matches(got, want)

    def refused(self, call, *errors: type[BaseException]) -> None:
        with pytest.raises(errors or (ValueError, RuntimeError)):
            call()

    # -- operations
    def add(self) -> None:
        method = self.rng.choice(METHODS)
        vera_held = {m for n, t in self.ref.adapters.items() if self.ref.methods[n] in ("vera", "dvora") for m in t}
        held = {m for t in self.ref.adapters.values() for m in t}
        free = [m for m in ("0", "2") if m not in (held if method in ("vera", "dvora") else vera_held)]
        if method in ("vera", "dvora", "dora_recompute"):
            free = [m for m in free if _is_linear(self.ref.modules[m])]
        if not free or self.ref.merged:
            return
        targets = tuple(sorted(self.rng.sample(free, self.rng.randint(1, len(free)))))
        name = f"a{self.count}"
        self.count += 1
        first = not self.ref.adapters
        torchdora.add_adapter(self.model, name, _config(method, targets, self.rng))
        _perturb(self.model, name, self.rng)
        layers = adapter_layers(self.model)
        self.ref.adapters[name] = {m: _terms(layers[m], name, method) for m in targets}
        self.ref.methods[name] = method
        if first:
            self.ref.active = [name]
        note(f"add {name}: {method} on {targets}")

    def set(self, at_least: int = 0) -> None:
        if not self.ref.adapters:
            return
        names = self.rng.sample(list(self.ref.adapters), self.rng.randint(at_least, len(self.ref.adapters)))
        if self.ref.merged and set(names) != set(self.ref.merged):
            self.refused(lambda: torchdora.set_adapter(self.model, names), RuntimeError)
            return
        torchdora.set_adapter(self.model, names)
        self.ref.active = names
        note(f"set {names}")

    def merge(self) -> None:
        if not self.ref.adapters:
            return
        if self.rng.random() < 0.5:
            names = None
            ok = not self.ref.merged
            want = list(self.ref.active)
        else:
            pool = [n for n in self.ref.adapters if n not in self.ref.merged]
            names = self.rng.sample(pool, self.rng.randint(0, len(pool))) if pool else []
            left = [n for n in self.ref.active if n not in names and n not in self.ref.merged]
            ok, want = not left, names
        note(f"merge {names}")
        if not ok:
            self.refused(lambda: torchdora.merge(self.model, names))
            return
        torchdora.merge(self.model, names)
        self.ref.merged += [n for n in want if n not in self.ref.merged]
        self.ref.active += [n for n in want if n not in self.ref.active]

    def unmerge(self) -> None:
        if not self.ref.adapters:
            return
        note("unmerge")
        if not self.ref.merged:
            self.refused(lambda: torchdora.unmerge(self.model), RuntimeError)
            return
        torchdora.unmerge(self.model)
        self.ref.merged = []
        for name, layer in adapter_layers(self.model).items():
            _assert_matches(_weight_2d(layer.base), self.ref.weights[name])

    def unload_merged(self) -> None:
        if not self.ref.adapters:
            return
        note("merge_and_unload")
        applied = self.ref.merged or self.ref.active
        self.ref.weights = {m: self.ref.weight(m, applied) for m in self.ref.weights}
        for key, module in self.ref.modules.items():  # the merged weights are the new pre-trained ones
            with torch.no_grad():
                w = self.ref.weights[key]
                module.weight.copy_(w.T if type(module).__name__ in ("Conv1D", "Embedding")
                                    else w.reshape(module.weight.shape))
        torchdora.merge_and_unload(self.model)
        assert not any(isinstance(m, torchdora.AdapterLayer) for m in self.model.modules())
        self.ref.adapters, self.ref.methods, self.ref.active, self.ref.merged = {}, {}, [], []

    def save_load(self, tmp_path) -> None:
        if not self.ref.adapters:
            return
        peft_ok = all(m in ("dora", "lora", "vera", "dora_recompute", "lora_w") for m in self.ref.methods.values())
        fmt = "peft" if peft_ok and self.rng.random() < 0.5 else "torchdora"
        folder = tmp_path / f"save{self.count}"
        self.count += 1
        note(f"save/load {fmt}")
        if self.ref.merged:
            self.refused(lambda: torchdora.save_adapter(self.model, folder, format=fmt), RuntimeError)
            return
        torchdora.save_adapter(self.model, folder, format=fmt)
        fresh, _ = _make(self.kind)
        with torch.no_grad():
            for key, module in self.ref.modules.items():
                fresh[int(key)].load_state_dict(module.state_dict())
        for name in self.ref.adapters:
            torchdora.load_adapter(fresh, folder if name == "default" else folder / name, adapter_name=name)
        torchdora.set_adapter(fresh, self.ref.active)
        layers = adapter_layers(fresh)
        for name, per_module in self.ref.adapters.items():
            for module, terms in per_module.items():
                loaded = _terms(layers[module], name, self.ref.methods.get(name, "dora"))
                # saved in fp32: the loaded tensors are the reference's to fp32 round-off (2**-24 relative)
                if terms.magnitude is not None:
                    assert_close(loaded.magnitude, terms.magnitude, rtol=1e-6, atol=0)
                assert_close(loaded.update, terms.update, rtol=1e-6, atol=1e-7)
                per_module[module] = loaded
        self.model = fresh

    def weighted(self) -> None:
        pool = [n for n, m in self.ref.methods.items() if m not in ("vera", "dvora")]
        if not pool or self.ref.merged:
            return
        names = self.rng.sample(pool, self.rng.randint(1, len(pool)))
        if len({self.ref.methods[n] in ("lora", "lora_w") for n in names}) != 1:
            self.refused(lambda: torchdora.add_weighted_adapter(self.model, names, [1.0] * len(names), "w"),
                         ValueError)
            return
        weights = [round(self.rng.uniform(-1, 1.5), 3) for _ in names]
        name = f"w{self.count}"
        self.count += 1
        note(f"weighted {name} = {list(zip(names, weights))}")
        torchdora.add_weighted_adapter(self.model, names, weights, name)
        dora = self.ref.methods[names[0]] not in ("lora", "lora_w")
        per_module = {}
        for module in {m for n in names for m in self.ref.adapters[n]}:
            w = self.ref.weights[module]
            parts = [(wt, self.ref.adapters[n][module]) for n, wt in zip(names, weights)
                     if module in self.ref.adapters[n]]
            update = sum(wt * t.update for wt, t in parts)
            magnitude = None
            if dora:
                norm = torch.linalg.vector_norm(w, dim=1)
                magnitude = norm + sum(wt * (t.magnitude - norm) for wt, t in parts)
            per_module[module] = Terms(update, magnitude)
        self.ref.adapters[name] = per_module
        self.ref.methods[name] = "dora_w" if dora else "lora_w"

    def delete(self) -> None:
        if not self.ref.adapters:
            return
        name = self.rng.choice(list(self.ref.adapters))
        note(f"delete {name}")
        if name in self.ref.merged:
            self.refused(lambda: torchdora.delete_adapter(self.model, name), RuntimeError)
            return
        torchdora.delete_adapter(self.model, name)
        del self.ref.adapters[name], self.ref.methods[name]
        active = [n for n in self.ref.active if n != name]
        self.ref.active = active or list(self.ref.adapters)[:1]

    def mixed(self) -> None:
        if not self.ref.adapters:
            return
        rows = [self.rng.choice([None, *self.ref.adapters]) for _ in range(self.x.shape[0])]
        note(f"mixed batch {rows}")
        if self.ref.merged:
            self.refused(lambda: torchdora.mixed_batch(self.model, rows).__enter__(), RuntimeError)
            return
        with torch.no_grad(), torchdora.mixed_batch(self.model, rows):
            got = self.model(self.x)
        for i, name in enumerate(rows):
            want = self.ref.output(self._modules(), self.x[i:i + 1], [] if name is None else [name])
            _assert_matches(got[i:i + 1], want)

    def disable(self) -> None:
        if not self.ref.adapters:
            return
        note("disable")
        if self.ref.merged:
            self.refused(lambda: torchdora.disable_adapter(self.model).__enter__(), RuntimeError)
            return
        with torchdora.disable_adapter(self.model):
            self.check(names=[])


@settings(max_examples=int(__import__('os').environ.get('TORCHDORA_PROPERTY_EXAMPLES', 220)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1), adapters=st.integers(1, 3),
       ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=9))
def test_every_operation_sequence_matches_the_definitions(kind, seed, adapters, ops, tmp_path_factory):
    note(f"kind={kind} seed={seed} adapters={adapters} ops={ops}")
    run = Run(kind, seed)
    for _ in range(adapters):
        run.add()
    run.set(at_least=min(2, len(run.ref.adapters)))
    run.check()
    for op in ops:
        if op == "save_load":
            run.save_load(tmp_path_factory.mktemp("p"))
        elif op != "forward":
            getattr(run, op)()
        run.check()
