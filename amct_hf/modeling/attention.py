"""Route every attention layer's key and value states to an observer.

Installed through transformers' supported extension points: an attention function
registered with ``AttentionInterface`` (delegating to the model's original
implementation) together with the original's mask function under the same name in
``AttentionMaskInterface`` (without it a custom name silently gets no mask), then
``model.set_attn_implementation``. State is held per model, never on a class.

Record keys follow :mod:`amct_hf.naming`.
"""
from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..errors import InvalidArgumentError, UnpatchableModelError
from ..naming import kv_record_keys
from ..settings.options import TAPS

__all__ = ["KVCalibrationHooks", "KVStatesComplete", "kv_calibration", "kv_transform", "Observe",
           "key_value_names", "TAPS"]

Observe = Callable[[str, torch.Tensor], object]  # (record key, [tokens, channels])
_PREFIX = "amct_hf_kv_"
_STATES: weakref.WeakKeyDictionary[nn.Module, _ModelState] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class KVStatesComplete(Exception):
    """Raised out of the model's forward by hooks made with ``stop_when_complete=True`` once
    every attention layer has handed over its key/value states: the rest of the forward
    (the last layer's attention and MLP, the final norm, the logits) is not needed."""


def key_value_names(path: str, module: nn.Module) -> tuple[str, str]:
    """The record keys of the attention module ``module`` at ``path``."""
    return kv_record_keys(path, hasattr(module, "k_proj") and hasattr(module, "v_proj"))


def _original_attention(module: nn.Module, impl: str):
    if impl == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise UnpatchableModelError(
                f"{type(module).__name__} runs 'eager' attention but its module defines no "
                "eager_attention_forward to delegate to")
        return fn
    from transformers import AttentionInterface
    return AttentionInterface()[impl]


def _routed_attention(module, query, key, value, attention_mask, *args, **kwargs):
    state: _ModelState = module.__dict__["_amct_hf_kv_state"]
    if state.transform is not None:
        path = state.paths.get(id(module), type(module).__name__)
        k_name, v_name = key_value_names(path, module)
        key, value = state.transform(k_name, key), state.transform(v_name, value)
        transform_query = getattr(state.transform, "query", None)
        if transform_query is not None:  # e.g. an engine that also quantizes the query
            query = transform_query(path, query)
    else:
        state.observe_attention(module, query, key, value)
    original = state.originals.get(type(module))
    if original is None:
        original = state.originals[type(module)] = _original_attention(module, state.original_impl)
    return original(module, query, key, value, attention_mask, *args, **kwargs)


def _register(original_impl: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    name = _PREFIX + original_impl
    if original_impl not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise UnpatchableModelError(
            f"attention implementation {original_impl!r} has no mask function to delegate to")
    AttentionInterface.register(name, _routed_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original_impl])
    return name


class _ModelState:
    def __init__(self, model, observe: Observe, tap: str, transform=None):
        self.model_ref = weakref.ref(model)
        self.observe = observe
        self.transform = transform
        self.tap = tap
        self.depth = 0
        self.original_impl: str | None = None
        self.originals: dict = {}  # attention module class -> original attention function
        self.mask: torch.Tensor | None = None
        self.handles = []
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.seen: dict[str, int] = {}  # record key -> channels, for completeness checks
        self.stop_when_complete = False
        self.emitted = 0                   # hand-overs in the current forward
        self.stop_after: int | None = None  # hand-overs of the first, whole forward

    def forward_started(self) -> None:
        # counted, not named: a module that runs twice per forward (shared blocks) would
        # otherwise stop the forward at its first call
        if self.stop_when_complete and self.stop_after is None and self.emitted:
            self.stop_after = self.emitted
        self.emitted = 0

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, F] -> [tokens, F], dropping padding positions of the current batch."""
        b, s, f = x.shape
        mask = self.mask
        if mask is not None and mask.shape[0] == b and mask.shape[1] >= s:
            return x[mask[:, -s:]]
        return x.reshape(b * s, f)

    def emit(self, name: str, x: torch.Tensor) -> None:
        if x.shape[0]:  # else a batch of padding only
            self.seen[name] = x.shape[-1]
            self.observe(name, x)
        self.emitted += 1
        if self.emitted == self.stop_after:
            raise KVStatesComplete(name)

    def observe_attention(self, module, query, key, value):
        # with a cache the attention sees past + new tokens; the new ones are the last q_len
        q_len = query.shape[-2]
        k_name, v_name = key_value_names(self.paths.get(id(module), type(module).__name__), module)
        for name, states in ((k_name, key), (v_name, value)):
            states = states[..., -q_len:, :]
            b, h, s, d = states.shape
            self.emit(name, self.tokens(states.transpose(1, 2).reshape(b, s, h * d)))


def _capture_mask(state: _ModelState):
    def hook(module, args, kwargs):
        state.forward_started()
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        state.mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    return hook


class KVCalibrationHooks:
    """Context manager: on enter, every attention layer's key/value states (``tap="cache"``:
    after RoPE and any k-norm, as the KV cache stores them, new tokens only; ``tap="proj"``:
    the raw ``k_proj``/``v_proj`` outputs, as AMCT taps them) are passed to
    ``observe(record_key, states[tokens, kv_heads * head_dim])`` with padding removed.
    On exit the model is restored. Entering again for the same model and observer is a
    no-op.

    ``stop_when_complete``: from the second forward on, raise :class:`KVStatesComplete` right
    after as many hand-overs as the first forward made; the caller catches it. The first
    forward runs whole, so the count is learnt, not assumed."""

    def __init__(self, model: nn.Module, observe: Observe, tap: str = "cache", *, transform=None,
                 stop_when_complete: bool = False):
        if transform is not None and tap != "cache":
            raise ValueError("a key/value transform needs tap='cache'")
        self.transform = transform
        if tap not in TAPS:
            raise InvalidArgumentError(f"tap={tap!r} is not supported; use one of {TAPS}")
        if not callable(observe):
            raise TypeError(f"observe must be callable (e.g. a QuantCalibrationOp), got {observe!r}")
        self.model, self.observe, self.tap = model, observe, tap
        self.stop_when_complete = stop_when_complete
        self.state: _ModelState | None = None

    def __enter__(self) -> KVCalibrationHooks:
        with _LOCK:
            state = _STATES.get(self.model)
            if state is not None:
                if (state.observe is not self.observe or state.tap != self.tap
                        or state.stop_when_complete != self.stop_when_complete):
                    raise RuntimeError(
                        f"{type(self.model).__name__} is already being calibrated with another "
                        "observer, tap or stop_when_complete; exit that context first")
                state.depth += 1
                self.state = state
                return self
            state = _ModelState(self.model, self.observe, self.tap, self.transform)
            state.stop_when_complete = self.stop_when_complete
            self._install(state)
            state.depth = 1
            _STATES[self.model] = state
            self.state = state
        return self

    def __exit__(self, *exc) -> None:
        with _LOCK:
            state = self.state
            self.state = None
            if state is None:
                return
            state.depth -= 1
            if state.depth == 0:
                self._uninstall(state)
                _STATES.pop(self.model, None)

    @property
    def seen(self) -> dict:
        """Record keys observed so far, with their channel counts."""
        return dict(self.state.seen) if self.state else {}

    def _install(self, state: _ModelState) -> None:
        model = self.model
        state.handles.append(model.register_forward_pre_hook(_capture_mask(state), with_kwargs=True))
        try:
            if self.tap == "cache":
                self._install_attention(state)
            else:
                self._install_proj(state)
        except BaseException:
            for h in state.handles:
                h.remove()
            raise

    def _install_attention(self, state: _ModelState) -> None:
        model = self.model
        config = getattr(model, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if not hasattr(model, "set_attn_implementation") or not isinstance(impl, str):
            raise UnpatchableModelError(
                f"{type(model).__name__} is not a transformers model with a configurable attention "
                "implementation; tap='cache' cannot route its key/value states")
        state.original_impl = impl
        name = _register(impl)
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise UnpatchableModelError(
                f"{type(model).__name__} does not route its attention through transformers' "
                "AttentionInterface, so its key/value states cannot be tapped after RoPE; "
                "use tap='proj' to calibrate the k_proj/v_proj outputs instead")
        for module in model.modules():
            module.__dict__["_amct_hf_kv_state"] = state

    def _install_proj(self, state: _ModelState) -> None:
        found = 0
        for path, module in self.model.named_modules():
            k, v = getattr(module, "k_proj", None), getattr(module, "v_proj", None)
            if isinstance(k, nn.Module) and isinstance(v, nn.Module):
                for name, proj in ((f"{path}.k_proj", k), (f"{path}.v_proj", v)):
                    state.handles.append(proj.register_forward_hook(self._proj_hook(state, name)))
                found += 1
        if not found:
            raise UnpatchableModelError(
                f"{type(self.model).__name__} has no attention module with k_proj and v_proj "
                "children; tap='proj' needs them (tap='cache' works for fused layouts)")

    @staticmethod
    def _proj_hook(state: _ModelState, name: str):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            state.emit(name, state.tokens(out.reshape(out.shape[0], -1, out.shape[-1])))
        return hook

    def _uninstall(self, state: _ModelState) -> None:
        for h in state.handles:
            h.remove()
        state.handles.clear()
        if state.original_impl is not None:
            self.model.set_attn_implementation(state.original_impl)
            for module in self.model.modules():
                module.__dict__.pop("_amct_hf_kv_state", None)


def kv_calibration(model: nn.Module, observe: Observe, tap: str = "cache") -> KVCalibrationHooks:
    """``with kv_calibration(model, QuantCalibrationOp("kv.txt", params)): model(**batch)``"""
    return KVCalibrationHooks(model, observe, tap)


def _no_observer(name, x):
    return None


def kv_transform(model: nn.Module, transform) -> KVCalibrationHooks:
    """Replace the key/value states every attention layer computes with
    ``transform(record_key, states[B, kv_heads, S, head_dim])`` (e.g. INT8
    quantize-dequantize for evaluation). With a cache, ``states`` holds past and new
    tokens, exactly what the attention reads. A transform with a ``query`` attribute
    also replaces the (post-RoPE) query with ``transform.query(attention_path,
    query[B, heads, S, head_dim])``."""
    if not callable(transform):
        raise TypeError(f"transform must be callable, got {transform!r}")
    return KVCalibrationHooks(model, _no_observer, "cache", transform=transform)
