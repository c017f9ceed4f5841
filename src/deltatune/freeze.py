"""Freezing (which parameters train) and counting trainable parameters (:class:`TrainableSummary`)."""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch.nn as nn
from rich.console import Console
from rich.table import Table

from .delta_layer import get_records, logical_param_name
from .errors import AdapterNotFoundError, DeltaConfigError
from .methods import REGISTRY, get_method, method_names
from .methods.base import param_adapter_name
from .validation import check_str_list, check_type

__all__ = ["TrainableSummary", "freeze_delta", "trainable_summary"]


def _matches(name: str, pattern: str) -> bool:
    logical = logical_param_name(name)
    return any(fnmatch.fnmatchcase(n, pattern) for n in (name, logical))


def freeze_delta(
    model: nn.Module,
    mode: str | Sequence[str],
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    adapter_name: str | Sequence[str] | None = None,
    _reset: bool = True,
) -> nn.Module:
    """Freeze everything except the delta parameters of method ``mode``.

    Args:
        model: a model with a delta method applied.
        mode: a registered method name (``"lora"``, ...) or a list of them.
        include: wildcard patterns over parameter names to freeze as well (even delta parameters).
        exclude: wildcard patterns over parameter names to exclude from freezing, i.e. keep
            trainable (``exclude=["*classifier*"]`` keeps a head trainable).
        adapter_name: restrict to these adapters' delta parameters (default: all of ``mode``).

    Each pattern must match at least one parameter, and no parameter may match both lists.
    Also trained: the adapters' ``modules_to_save`` copies and their bias choice (LoRA ``bias``).
    """
    check_type("model", model, nn.Module, "a torch.nn.Module")
    modes = check_str_list("mode", mode)
    known = method_names()
    for m in modes:
        if m not in known:
            raise DeltaConfigError(f"mode must be one of {known}, got {m!r}")
    includes = check_str_list("include", include, allow_none=True) or []
    excludes = check_str_list("exclude", exclude, allow_none=True) or []
    adapters = [adapter_name] if isinstance(adapter_name, str) else (list(adapter_name) if adapter_name else None)
    if adapters is not None:
        on_model = {a: r.method for a, r in get_records(model).items()}
        absent = [a for a in adapters if on_model.get(a) not in modes]
        if absent:
            raise AdapterNotFoundError(
                f"adapter_name {absent if len(absent) > 1 else absent[0]!r} is not a {modes} adapter on the model; "
                f"adapters on the model: {on_model or 'none'}"
            )
    params = OrderedDict(model.named_parameters())
    for label, pats in (("include", includes), ("exclude", excludes)):
        for p in pats:
            if not any(_matches(n, p) for n in params):
                raise DeltaConfigError(
                    f"{label} pattern {p!r} matches no parameter; parameter names look like "
                    f"{[logical_param_name(n) for n in list(params)[:3]]}"
                )
    both = [n for n in params if any(_matches(n, p) for p in includes) and any(_matches(n, p) for p in excludes)]
    if both:
        raise DeltaConfigError(f"parameters {both[:5]} match both include and exclude; a parameter can only be in one")

    records = get_records(model)
    train: set[str] = set()
    found_delta = False
    for m in modes:
        method = get_method(m)
        for n in params:
            if method.is_delta_param(n):
                found_delta = True
                if adapters is None or param_adapter_name(n, method.delta_prefixes) in adapters:
                    train.add(n)
        for aname, rec in records.items():
            if rec.method != m or (adapters is not None and aname not in adapters):
                continue
            train.update(method.extra_trainable(model, rec.config, aname))
            train.update(n for n in params if f".modules_to_save.{aname}." in f".{n}")
    unapplied = [m for m in modes if get_method(m).delta_prefixes == () and not any(r.method == m for r in records.values())]
    if unapplied:
        # e.g. "bitfit" wraps nothing, so without a record it would silently train nothing; MindPet's
        # freeze_delta(model, "bitfit") instead trains every bias: deltatune.compat.mindpet.freeze_delta does that
        raise DeltaConfigError(
            f"mode {unapplied[0]!r}: the model has no {unapplied[0]!r} adapter, so nothing would train; apply a "
            f"{unapplied[0]!r} config first, or use deltatune.compat.mindpet.freeze_delta to train every bias "
            f"as MindPet does (adapters on the model: {sorted(records) or 'none'})"
        )
    if not found_delta and not any(get_method(m).delta_prefixes == () for m in modes):
        raise DeltaConfigError(
            f"the model has no {modes} parameters; apply a {modes[0]!r} config first (adapters on the model: "
            f"{sorted(records) or 'none'})"
        )
    for n, p in params.items():
        if any(_matches(n, pat) for pat in includes):
            want = False
        elif any(_matches(n, pat) for pat in excludes):
            want = True
        else:
            want = n in train
        if _reset or want:
            p.requires_grad_(want)
    return model


@dataclass
class TrainableSummary:
    """Trainable vs total parameter counts, overall and per module."""

    trainable: int
    total: int
    rows: list[tuple[str, int, int]] = field(default_factory=list)  # (module, trainable, total)

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        width = max([len("module")] + [len(r[0]) for r in self.rows])
        lines = [f"{'module':<{width}}  {'trainable':>12}  {'total':>12}"]
        lines.append("-" * len(lines[0]))
        for name, t, tot in self.rows:
            lines.append(f"{name:<{width}}  {t:>12,}  {tot:>12,}")
        lines.append("-" * len(lines[0]))
        lines.append(
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"
        )
        return "\n".join(lines)

    def print(self, max_rows: int | None = None) -> None:
        """Print the table with rich; ``max_rows`` shortens long tables."""
        table = Table(title="trainable parameters")
        table.add_column("module")
        table.add_column("trainable", justify="right")
        table.add_column("total", justify="right")
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        for name, t, tot in rows:
            table.add_row(name, f"{t:,}", f"{tot:,}")
        if len(rows) < len(self.rows):
            table.add_row(f"... {len(self.rows) - len(rows)} more modules", "", "")
        table.add_row("[b]all[/b]", f"[b]{self.trainable:,}[/b]", f"[b]{self.total:,}[/b] ({self.percent:.4f}%)")
        Console().print(table)


def _delta_containers() -> tuple[str, ...]:
    prefixes: list[str] = ["modules_to_save"]
    for name in REGISTRY:
        try:
            prefixes += get_method(name).delta_prefixes
        except ImportError:  # pragma: no cover - a method whose optional dependency is missing
            continue
    return tuple(prefixes)


def _row_name(logical: str, containers: tuple[str, ...]) -> str:
    """The module a parameter is counted under: the adapted module for delta parameters
    (``...q_proj`` for ``...q_proj.lora_A.default.weight``), else the parameter's own module."""
    parts = logical.split(".")
    for i, part in enumerate(parts):
        if part.startswith(containers) and i > 0:
            return ".".join(parts[:i])
    return ".".join(parts[:-1]) or parts[0]


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable and total parameters (shared parameters once); rows list modules with trainable ones."""
    check_type("model", model, nn.Module, "a torch.nn.Module")
    containers = _delta_containers()
    seen: set[int] = set()
    trainable = total = 0
    per: OrderedDict[str, list[int]] = OrderedDict()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        module = _row_name(logical_param_name(name), containers)
        row = per.setdefault(module, [0, 0])
        row[1] += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            row[0] += p.numel()
    rows = [(m, t, tot) for m, (t, tot) in per.items() if t]
    return TrainableSummary(trainable, total, rows)
