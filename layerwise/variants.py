"""The rows of an ablation grid: optimizer variants (``--optimizer``, ``--phi``) and the
adaptation axis (``--adapt``), each checked before any run.

``--phi EXPR`` adds, for every optimizer of the grid whose program defines
``phi`` (LAMB's scaling function, ``trust = phi(||w||) / ||u||``), a
variant ``spec.override("def phi(z) = EXPR")`` labelled ``NAME[phi=EXPR]``.

``--adapt NAME...`` adds the adaptation axis (LANGUAGE.md section 12):
every optimizer of the grid runs once per adaptation, ``NAME`` being an
adaptation preset (``trust``), a ``.lw`` file that starts with
``adaptation NAME``, or ``none`` (the optimizer as it is; the only value
when ``--adapt`` is not given). An adapted cell trains the program
``lw.adapt`` makes of the optimizer and the adaptation (:func:`adapt_spec`),
labelled ``OPTIMIZER+ADAPTATION`` (``adamw+trust``), with the optimizer's
base LR and LR rule: the adaptation is the only change.

A variant remembers where its program came from (``source``: a preset
name or an absolute ``.lw`` path, and ``phi``), so that ``layerwise ablate
--plan`` can write each cell as a command that rebuilds it elsewhere.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Sequence

from .adapt import adapt
from .errors import SpecError
from .optimizer import Optimizer
from .spec import Spec, load, presets
from .train import probe_parameters, resolve_spec

__all__ = ["DEFAULT_OPTIMIZERS", "NONE", "Adaptation", "Variant", "defines", "adapt_spec",
           "make_adaptations", "make_variants", "source_of"]

#: The default grid's optimizers.
DEFAULT_OPTIMIZERS = ("lamb", "lars", "adamw", "sgd")

#: The adaptation axis's value for an optimizer run as it is.
NONE = "none"


def source_of(value) -> str | None:
    """Where a ``--optimizer`` / ``--adapt`` value's program comes from: an absolute
    path for a file that exists, the name for a preset, ``None`` for a :class:`Spec`."""
    if not isinstance(value, (str, os.PathLike)):
        return None
    return os.path.abspath(value) if os.path.isfile(value) else str(value)


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """A value of the grid's adaptation axis: a label and a checked adaptation program.

    ``label`` is the program's name (``trust``), made unique in the grid
    with ``#2``, ``#3`` when two files declare the same name.
    """
    label: str
    spec: Spec
    source: str | None = None


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the grid: a label, a spec, optionally its base LR and LR rule, and
    optionally an adaptation applied to it.

    ``base_lr`` ``None`` means the task's tuned value for ``spec.name``, or
    else the program's default ``lr``; ``lr_rule`` ``None`` means
    :func:`layerwise.train.lr_rule_for`. With an ``adaptation`` the cell
    trains :func:`adapt_spec` of ``spec`` (the same program name, so the
    same tuned base LR and LR rule) and is named ``LABEL+ADAPTATION``.
    ``source`` and ``phi``: where ``spec`` came from (:func:`source_of`) and
    the ``--phi`` expression applied to it, if any.
    """
    label: str
    spec: Spec
    base_lr: float | None = None
    lr_rule: str | None = None
    adaptation: Adaptation | None = None
    source: str | None = None
    phi: str | None = None

    @property
    def adaptation_label(self) -> str:
        """The adaptation's label, or ``"none"``."""
        return NONE if self.adaptation is None else self.adaptation.label

    @property
    def name(self) -> str:
        """The cell's name: ``label``, or ``label+adaptation`` for an adapted variant."""
        return self.label if self.adaptation is None else f"{self.label}+{self.adaptation.label}"

    def train_spec(self) -> Spec:
        """The program this variant trains: ``spec``, adapted if it has an adaptation.

        Raises:
            SpecError, ValueError: the adaptation cannot be applied to ``spec``
                (see :func:`adapt_spec`).
        """
        return self.spec if self.adaptation is None else adapt_spec(self.spec,
                                                                     self.adaptation.spec)


def defines(spec: Spec, name: str) -> bool:
    """Whether the program (with its parents) declares ``def NAME``.

    Reads ``Spec._declarations``: the checked program has its defs inlined.
    """
    decls = getattr(spec, "_declarations", None)
    return decls is not None and name in decls.defs


def adapt_spec(spec: Spec, adaptation: Spec | str) -> Spec:
    """The program ``lw.adapt`` makes of optimizer ``spec`` and ``adaptation``.

    ``lw.adapt(lw.Optimizer(params, spec), adaptation)`` with the
    adaptation's default hypers, as a spec that ``lw.Optimizer`` (and so
    :func:`layerwise.train.train`) accepts; its name is ``spec.name``.

    Raises:
        FileNotFoundError, SpecError: ``adaptation`` is missing or does not check.
        SpecError: it clashes with ``spec`` (a hyper or state of both), or ``spec``
            has no ``lr``.
        ValueError: ``adaptation`` is an optimizer, not an adaptation.
    """
    base = Optimizer(probe_parameters(), spec, compile=False)
    return adapt(base, adaptation, compile=False).spec


def _adaptation_presets() -> list[str]:
    """The shipped presets that are adaptations (for error messages)."""
    names = []
    for name in presets():
        try:
            if load(name).program.kind == "adaptation":
                names.append(name)
        except (SpecError, OSError):
            continue
    return names


def make_adaptations(names: Iterable[str | Spec | Adaptation | None] | None
                     ) -> list[Adaptation | None]:
    """The grid's adaptation axis from ``--adapt`` values, checked before any run.

    Each value is ``"none"`` or ``None`` (no adaptation: ``None`` in the
    result), an adaptation preset name, a path to a ``.lw`` file that starts
    with ``adaptation NAME``, a :class:`Spec` of one, or an
    :class:`Adaptation`. ``names`` empty or ``None``: ``[None]`` (the grid
    without the axis).

    Raises:
        ValueError: a value given twice, a name that is neither ``none``,
            a preset nor a file, or an optimizer program given as an
            adaptation; the message names the value.
        SpecError: an adaptation file that does not check.
    """
    out: list[Adaptation | None] = []
    seen: set = set()
    used: set[str] = set()
    for value in (list(names) if names else [NONE]):
        key = NONE if value is None or value == NONE else value
        if isinstance(key, Adaptation):
            key = key.spec
        if key in seen:
            raise ValueError(f"--adapt '{_text(key)}' is given twice")
        seen.add(key)
        if key == NONE:
            out.append(None)
            continue
        if isinstance(value, Adaptation):
            spec, label = value.spec, value.label
        else:
            try:
                spec = value if isinstance(value, Spec) else load(value)
            except FileNotFoundError:
                raise ValueError(
                    f"--adapt '{value}' is neither 'none', an adaptation preset "
                    f"({', '.join(_adaptation_presets()) or 'none shipped'}) nor a file"
                ) from None
            label = spec.name
        if spec.program.kind != "adaptation":
            raise ValueError(
                f"--adapt '{_text(value)}': '{spec.name}' is an optimizer, not an adaptation "
                f"(a program that starts with 'adaptation NAME'); adaptation presets: "
                f"{', '.join(_adaptation_presets()) or 'none shipped'}")
        unique, n = label, 1
        while unique in used or unique == NONE:
            n += 1
            unique = f"{label}#{n}"
        used.add(unique)
        out.append(Adaptation(unique, spec, value.source if isinstance(value, Adaptation)
                              else source_of(value)))
    return out


def _text(value) -> str:
    if isinstance(value, Adaptation):
        return value.label
    return value.name if isinstance(value, Spec) else str(value)


def make_variants(optimizers: Iterable[str | Spec], phis: Sequence[str] = (),
                  base_lrs: dict[str, float] | None = None,
                  lr_rule: str | None = None,
                  adaptations: Iterable[str | Spec | Adaptation | None] | None = None
                  ) -> list[Variant]:
    """The grid's rows: each optimizer, then each ``phi`` variant of each that defines
    ``phi``; each of them once per adaptation.

    ``optimizers`` are preset names, ``.lw`` paths or specs; labels are the
    program names (made unique with ``#2``, ``#3``). ``adaptations`` are
    the values of ``--adapt`` (:func:`make_adaptations`; default: none
    only, the grid without the axis); the rows of one optimizer are
    adjacent, in the order of ``adaptations``. ``base_lrs`` maps a cell
    name (``adamw+trust``), a label or a program name to a base LR (in
    that order of precedence).

    Raises:
        FileNotFoundError, SpecError: a SPEC that is missing or does not
            check, or a ``phi`` expression that does not check.
        ValueError: an optimizer SPEC that is an adaptation; ``phis`` given
            but no optimizer defines ``phi``; a ``base_lrs`` key that names
            no row; a bad adaptation (:func:`make_adaptations`); an
            adaptation that cannot be applied to an optimizer of the grid
            (every such pair named).
    """
    base_lrs = dict(base_lrs or {})
    adapts = make_adaptations(adaptations)
    plain: list[Variant] = []
    used: set[str] = set()

    def add(label: str, spec: Spec, source: str | None, phi: str | None = None) -> None:
        unique, n = label, 1
        while unique in used:
            n += 1
            unique = f"{label}#{n}"
        used.add(unique)
        plain.append(Variant(unique, spec, None, lr_rule, source=source, phi=phi))

    optimizers = list(optimizers)
    specs = [resolve_spec(o) for o in optimizers]
    for o, spec in zip(optimizers, specs):
        if spec.program.kind == "adaptation":
            raise ValueError(f"--optimizer '{_text(o)}': '{spec.name}' is an adaptation, not an "
                             f"optimizer: give it with --adapt {spec.name}")
        add(spec.name, spec, source_of(o))
    bases = list(plain)
    for expr in phis:
        expr = " ".join(expr.split())
        targets = [v for v in bases if defines(v.spec, "phi")]
        if not targets:
            raise ValueError(f"--phi '{expr}': no optimizer of the grid defines phi "
                             f"(e.g. lamb); grid: {', '.join(v.label for v in bases)}")
        for v in targets:
            try:
                spec = v.spec.override(f"def phi(z) = {expr}", filename=f"<--phi {expr}>")
            except SpecError as err:
                raise ValueError(f"--phi '{expr}' for {v.label}: {err.message}") from None
            add(f"{v.label}[phi={expr}]", spec, v.source, expr)
    variants = [dataclasses.replace(v, adaptation=a) for v in plain for a in adapts]
    clashes = []
    for v in variants:
        if v.adaptation is not None:
            try:
                v.train_spec()
            except (SpecError, ValueError) as err:
                message = err.message if isinstance(err, SpecError) else str(err)
                clashes.append(f"{v.adaptation.label} cannot be applied to {v.label}: {message}")
    if clashes:
        raise ValueError(f"--adapt {'; '.join(clashes)} (leave the optimizer out of "
                         "--optimizer or the adaptation out of --adapt)")
    variants = [dataclasses.replace(v, base_lr=base_lrs.get(
        v.name, base_lrs.get(v.label, base_lrs.get(v.spec.name)))) for v in variants]
    known = {v.name for v in variants} | {v.label for v in variants} | {v.spec.name
                                                                         for v in variants}
    unknown = [k for k in base_lrs if k not in known]
    if unknown:
        raise ValueError(f"--base-lr names no optimizer of the grid: {', '.join(unknown)}; "
                         f"grid: {', '.join(v.name for v in variants)}")
    return variants
