"""The search space of a sweep: a tree over the run config, with conditional branches.

A node at a config path (``model.params.bank_size``) is one of:

- a scalar: a fixed value;
- a list of scalars (or ``{choices: [...]}``, which also takes lists as values): a categorical parameter;
- ``{int: [low, high]}`` / ``{float: [low, high]}`` with optional ``step`` and ``log``: a numeric parameter;
- a list of mappings: *alternatives*; one is chosen and only its own parameters are sampled,
  so a bank size exists only in the PatchCore branch and a replay size only under replay
  (the whole ``space`` may be such a list: one branch per method, each with its own backbones);
- any other mapping: nested config keys.

Each sampled parameter becomes one Optuna parameter, named by its config path; parameters
inside an alternative carry the branch label (``model[patchcore].params.bank_size``, or
``space[patchcore].model.params.bank_size`` for whole-config branches) so that two branches
never share a name with different choices.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from cvad.config import set_path

SCALARS = (str, int, float, bool, type(None))
DISTRIBUTION_KEYS = {"int", "float", "choices"}


class SpaceError(ValueError):
    """A search space that cannot be sampled; the message names the node and what is allowed."""


@dataclass(frozen=True)
class Fixed:
    path: str
    value: Any


@dataclass(frozen=True)
class Categorical:
    name: str  # Optuna parameter name
    path: str  # config path it sets
    choices: tuple[Any, ...]

    def encoded(self) -> tuple[Any, ...]:
        """Optuna stores only scalars: list-valued choices travel as JSON text."""
        return tuple(c if isinstance(c, SCALARS) else json.dumps(c) for c in self.choices)

    def decode(self, value: Any) -> Any:
        return self.choices[self.encoded().index(value)]


@dataclass(frozen=True)
class Numeric:
    name: str
    path: str
    kind: str  # "int" or "float"
    low: float
    high: float
    step: float | None
    log: bool

    def grid_values(self) -> Sequence[float]:
        """The steps from low to high; an int range's as a ``range``, so a range of a million seeds holds none."""
        if self.step is None:
            raise SpaceError(
                f"space.{self.path}: the grid sampler needs finite values; "
                f"give '{self.kind}' a 'step' or list the choices"
            )
        if self.kind == "int":
            return range(int(self.low), int(self.high) + 1, int(self.step))
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]


@dataclass(frozen=True)
class Alternatives:
    name: str
    path: str
    labels: tuple[str, ...]
    branches: tuple[Node, ...]


@dataclass(frozen=True)
class Mapping:
    path: str
    children: tuple[Node, ...]


Node = Fixed | Categorical | Numeric | Alternatives | Mapping


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_space(tree: Any, path: str = "", name: str | None = None) -> Node:
    """Parse the ``space`` section of a sweep file.

    ``name`` is the Optuna name of the node at ``path``: the path itself, with branch
    labels inserted inside alternatives.
    """
    name = path if name is None else name
    if isinstance(tree, SCALARS):
        return Fixed(path, tree)
    if isinstance(tree, list):
        if not tree:
            raise SpaceError(f"space.{path}: an empty list has nothing to choose from")
        if all(isinstance(item, dict) for item in tree):
            return parse_alternatives(tree, path, name or "space")
        if any(isinstance(item, dict) for item in tree):
            raise SpaceError(f"space.{path}: mixes mappings (alternatives) and values (choices); use one or the other")
        return Categorical(name, path, tuple(tree))
    if not isinstance(tree, dict):
        raise SpaceError(f"space.{path}: unsupported value {tree!r}")
    if tree.keys() & DISTRIBUTION_KEYS:
        return parse_distribution(tree, path, name)
    return Mapping(path, parse_children(tree, path, name))


def parse_children(tree: dict, path: str, name: str) -> tuple[Node, ...]:
    children = []
    for key, child in tree.items():
        if not isinstance(key, str) or not key or "." in key:
            raise SpaceError(f"space.{path or '<root>'}: keys must be plain config names, got {key!r}")
        children.append(parse_space(child, join(path, key), join(name, key)))
    return tuple(children)


def parse_alternatives(items: list[dict], path: str, name: str) -> Alternatives:
    """Branches are labelled by their ``name`` (or, for whole-config branches, ``model.name``) when unique."""
    names = [item.get("name") for item in items]
    models = [item.get("model", {}).get("name") if isinstance(item.get("model"), dict) else None for item in items]
    for candidates in (names, models):
        if all(isinstance(n, str) for n in candidates) and len(set(candidates)) == len(candidates):
            labels = tuple(candidates)
            break
    else:
        labels = tuple(str(i) for i in range(len(items)))
    branches = tuple(
        Mapping(path, parse_children(item, path, f"{name}[{label}]")) for label, item in zip(labels, items)
    )
    return Alternatives(name, path, labels, branches)


def parse_distribution(tree: dict, path: str, name: str) -> Categorical | Numeric:
    kinds = tree.keys() & DISTRIBUTION_KEYS
    if len(kinds) > 1:
        raise SpaceError(f"space.{path}: give one of 'int', 'float' or 'choices', not {sorted(kinds)}")
    (kind,) = kinds
    extra = set(tree) - {kind, "step", "log"}
    if extra:
        raise SpaceError(f"space.{path}: unknown key(s) {sorted(extra)}; allowed: {kind}, step, log")
    if kind == "choices":
        choices = tree["choices"]
        if set(tree) != {"choices"}:
            raise SpaceError(f"space.{path}: 'choices' takes no step or log")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"space.{path}.choices: give a non-empty list (got {choices!r})")
        return Categorical(name, path, tuple(choices))
    bounds = tree[kind]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(is_number(b) and math.isfinite(b) for b in bounds)):
        raise SpaceError(f"space.{path}.{kind}: give [low, high], two finite numbers (got {bounds!r})")
    low, high = bounds
    if kind == "int" and not all(isinstance(b, int) for b in bounds):
        raise SpaceError(f"space.{path}.int: bounds must be integers (got {bounds!r}); use 'float' for real values")
    if low > high:
        raise SpaceError(f"space.{path}.{kind}: low must not exceed high (got [{low}, {high}])")
    log, step = tree.get("log", False), tree.get("step")
    if not isinstance(log, bool):
        raise SpaceError(f"space.{path}.log: give true or false (got {log!r})")
    if log and low <= 0:
        raise SpaceError(f"space.{path}: a log scale needs low > 0 (got {low})")
    if step is not None:
        check_step(path, kind, low, high, step, log)
    return Numeric(name, path, kind, low, high, step, log)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_step(path: str, kind: str, low: float, high: float, step: Any, log: bool) -> None:
    """A step Optuna takes as given: positive (whole for int), no log scale, and landing on ``high`` from ``low``."""
    if log:
        raise SpaceError(f"space.{path}.step: a log scale takes no step; drop 'step' or 'log: true'")
    if kind == "int" and not (isinstance(step, int) and not isinstance(step, bool) and step > 0):
        raise SpaceError(
            f"space.{path}.step: an int parameter's step must be a positive whole number (got {step!r}); "
            "use 'float' for fractional steps"
        )
    if not (is_number(step) and math.isfinite(step) and step > 0):
        raise SpaceError(f"space.{path}.step: give a positive number (got {step!r})")
    if low == high:
        return
    if kind == "int":
        consistent = (high - low) % step == 0
    else:
        count = (high - low) / step
        consistent = abs(count - round(count)) <= 1e-9 * max(1.0, abs(count))
    if not consistent:
        reachable = low + math.floor((high - low) / step + 1e-9) * step
        shown = reachable if kind == "int" else round(reachable, 12)
        raise SpaceError(
            f"space.{path}: steps of {step} from {low} never land on {high}; make high - low a multiple of the step "
            f"(e.g. [{low}, {shown}]) so that both ends are values the sweep can try"
        )


def sample(node: Node, trial: optuna.trial.BaseTrial, config: dict) -> None:
    """Draw ``node``'s values from ``trial`` (define-by-run) and write them into ``config``."""
    if isinstance(node, Fixed):
        set_path(config, node.path, node.value)
    elif isinstance(node, Categorical):
        set_path(config, node.path, node.decode(trial.suggest_categorical(node.name, node.encoded())))
    elif isinstance(node, Numeric):
        if node.kind == "int":
            step = int(node.step or 1)
            value = trial.suggest_int(node.name, int(node.low), int(node.high), step=step, log=node.log)
        else:
            value = trial.suggest_float(node.name, node.low, node.high, step=node.step, log=node.log)
        set_path(config, node.path, value)
    elif isinstance(node, Alternatives):
        label = trial.suggest_categorical(node.name, node.labels)
        sample(node.branches[node.labels.index(label)], trial, config)
    else:
        for child in node.children:
            sample(child, trial, config)


def range_ends(node: Numeric) -> tuple[Any, ...]:
    """A range's ends (one value when they meet): what validates a range without trying its every value."""
    ends = (node.low, node.high) if node.low != node.high else (node.low,)
    return tuple(int(value) for value in ends) if node.kind == "int" else ends


def union(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    point: dict[str, Any] = {}
    for part in parts:
        point.update(part)
    return point


class Grid(Sequence):
    """Every point of the (conditional) product, as Optuna parameter dicts, without holding them.

    Its size is counted (alternatives add up, nested keys multiply) and point ``i`` is decoded from ``i``
    in mixed radix, so a grid of a million points costs nothing until a point is asked for. The order is
    that of nested loops over a mapping's keys (the last one fastest), one branch after another.
    ``ends``: numeric ranges take only their ends (the corners that validate a space sampled otherwise).
    """

    def __init__(self, node: Node, ends: bool = False) -> None:
        self.node, self.ends = node, ends
        self.values: dict[int, Sequence] = {}  # id(parameter node) -> its values
        self.sizes: dict[int, int] = {}  # id(node) -> how many points it has
        self.size = self.count(node)

    def count(self, node: Node) -> int:
        if id(node) not in self.sizes:
            if isinstance(node, (Categorical, Numeric)):
                self.values[id(node)] = self.values_of(node)
                size = len(self.values[id(node)])
            elif isinstance(node, Alternatives):
                size = sum(self.count(branch) for branch in node.branches)
            elif isinstance(node, Mapping):
                size = math.prod(self.count(child) for child in node.children)
            else:
                size = 1
            self.sizes[id(node)] = size
        return self.sizes[id(node)]

    def values_of(self, node: Categorical | Numeric) -> Sequence:
        if isinstance(node, Categorical):
            return node.encoded()
        return range_ends(node) if self.ends else node.grid_values()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.size <= index < self.size:
            raise IndexError(f"grid point {index} of {self.size}")
        return self.point(self.node, index % self.size)

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same points, as the list of points it stands for would be."""
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def point(self, node: Node, index: int) -> dict[str, Any]:
        if isinstance(node, (Categorical, Numeric)):
            return {node.name: self.values[id(node)][index]}
        if isinstance(node, Alternatives):
            for label, branch in zip(node.labels, node.branches):
                if index < self.sizes[id(branch)]:
                    return {node.name: label, **self.point(branch, index)}
                index -= self.sizes[id(branch)]
        if not isinstance(node, Mapping):
            return {}
        parts = []
        for child in reversed(node.children):  # the last key is the lowest digit
            index, digit = divmod(index, self.sizes[id(child)])
            parts.append(self.point(child, digit))
        return union(reversed(parts))


def covering(node: Node, joint: str, ends: bool) -> list[dict[str, Any]]:
    """A few points in which every branch and every value of every parameter (a range: its ends) appear at least once.

    A mapping's keys are zipped, the shorter lists cycling, instead of multiplied: each branch's shape is
    validated once, not at every combination. The config section ``joint`` is multiplied out (its whole
    ``Grid``, ranges at their ``ends`` or not), so every combination of its values is among the points.
    """
    if node.path == joint or node.path.startswith(f"{joint}."):
        return list(Grid(node, ends))
    if isinstance(node, Numeric):
        return [{node.name: value} for value in range_ends(node)]
    if isinstance(node, Alternatives):
        return [
            {node.name: label, **point}
            for label, branch in zip(node.labels, node.branches)
            for point in covering(branch, joint, ends)
        ]
    if isinstance(node, Mapping):
        parts = [covering(child, joint, ends) for child in node.children]
        width = max((len(part) for part in parts), default=1)
        return [union(part[k % len(part)] for part in parts) for k in range(width)]
    return list(Grid(node))


def shuffled(size: int, seed: int) -> Iterator[int]:
    """0 .. size-1 in a seeded random order, lazily: a Fisher-Yates shuffle that keeps only the entries it moved.

    Each prefix is the same whatever is taken after it, so a larger budget on --resume extends the same draw.
    """
    rng = random.Random(seed)
    moved: dict[int, int] = {}
    for i in range(size):
        j = rng.randrange(i, size)
        drawn = moved.pop(j, j)
        if j != i:
            moved[j] = moved.pop(i, i)
        yield drawn


def describe_space(node: Node, indent: str = "") -> list[str]:
    """The space as indented lines: each parameter's choices or range, each alternative's branch under it."""
    if isinstance(node, Categorical):
        return [f"{indent}{node.name}: one of {list(node.choices)}"]
    if isinstance(node, Numeric):
        scale = "log " if node.log else ""
        step = f" step {node.step}" if node.step else ""
        return [f"{indent}{node.name}: {scale}{node.kind} in [{node.low}, {node.high}]{step}"]
    if isinstance(node, Alternatives):
        lines = [f"{indent}{node.name}: one of {list(node.labels)}"]
        for label, branch in zip(node.labels, node.branches):
            inner = describe_space(branch, indent + "    ")
            if inner:
                lines += [f"{indent}  if {label}:", *inner]
        return lines
    if isinstance(node, Mapping):
        return [line for child in node.children for line in describe_space(child, indent)]
    return []
