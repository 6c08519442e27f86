"""Adapters: where to hook in a given model (wiring only; the maths lives in the observers).

Generic helpers shared by every adapter: unwrap the wrappers training puts around a model
(DDP, FSDP, ``torch.compile``, PEFT) and name modules without wrapper prefixes.
``monitor.pruning.adapters.cogvla`` holds the CogVLA adapters and facade.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

WRAPPER_SEGMENTS = ("module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module",
                    "_orig_mod")
_MODULE_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/DataParallel/FSDP (``.module``), ``torch.compile``
    (``._orig_mod``) and PEFT (``PeftModel.base_model`` -> ``LoraModel.model``) wrappers.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for _ in range(16):  # wrappers nest a few levels at most
        inner = _inner(model)
        if inner is None or inner is model:
            return model
        model = inner
    return model


def _inner(model: torch.nn.Module) -> torch.nn.Module | None:
    name = type(model).__name__
    wrapped = getattr(model, "module", None)
    if name in _MODULE_WRAPPERS and isinstance(wrapped, torch.nn.Module):
        return wrapped
    compiled = getattr(model, "_orig_mod", None)
    if isinstance(compiled, torch.nn.Module):
        return compiled
    if hasattr(model, "peft_config"):  # PeftModel -> LoraModel -> the model itself
        for attr in ("base_model", "model"):
            inner = getattr(model, attr, None)
            if isinstance(inner, torch.nn.Module) and inner is not model:
                return inner
    return None


def clean_name(name: str) -> str:
    """A ``named_modules()`` path without wrapper segments (``module.``, PEFT's
    ``base_model.model.``, FSDP's ``_fsdp_wrapped_module.`` ...)."""
    parts = name.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] in WRAPPER_SEGMENTS:
            i += 1
        elif parts[i] == "base_model" and i + 1 < len(parts) and parts[i + 1] == "model":
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def path_of(root: torch.nn.Module, module: torch.nn.Module) -> str | None:
    """``module``'s wrapper-free path under ``root`` (None if it is not inside)."""
    return paths_of(root, [module])[0]


def paths_of(root: torch.nn.Module, modules: Sequence[torch.nn.Module]) -> list[str | None]:
    """:func:`path_of` for each of ``modules``, in one walk of ``root``'s tree."""
    wanted = {id(m) for m in modules}  # the modules are alive (held by ``modules``)
    found: dict[int, str] = {}
    for name, m in root.named_modules():
        if id(m) in wanted and id(m) not in found:
            found[id(m)] = clean_name(name)
            if len(found) == len(wanted):
                break
    return [found.get(id(m)) for m in modules]


def get_path(root: object, path: str) -> object | None:
    """``root.a.b[3].c`` for ``"a.b.3.c"``, or None where a part is missing."""
    obj = root
    for part in path.split("."):
        if part.isdigit():
            try:
                obj = obj[int(part)]  # type: ignore[index]
            except (IndexError, TypeError, KeyError):
                return None
        else:
            obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
