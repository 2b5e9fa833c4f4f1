"""`logic`: boolean expressions over T/F (`(T&F)|~T=` -> `F`) and number comparisons (`37<52=` -> `T`)."""
from __future__ import annotations

import random

from forgelib.data.base import register_family

# A boolean tree: a bool leaf, or (op, left, right); a negated node is ("~", child, None).
Tree = object


def _tree(rng: random.Random, leaves: int) -> Tree:
    """A random tree with `leaves` leaves; each node is negated with probability 0.25."""
    if leaves == 1:
        node: Tree = rng.random() < 0.5
    else:
        left = rng.randint(1, leaves - 1)
        node = (rng.choice("&|"), _tree(rng, left), _tree(rng, leaves - left))
    return ("~", node, None) if rng.random() < 0.25 else node


def _render(node: Tree, top: bool = True) -> str:
    if isinstance(node, bool):
        return "T" if node else "F"
    op, left, right = node
    if op == "~":
        return "~" + _render(left, top=False)
    text = f"{_render(left, top=False)}{op}{_render(right, top=False)}"
    return text if top else f"({text})"


def tree_value(node: Tree) -> bool:
    """The truth value of a boolean tree (``forgelib.curriculum.verify`` re-solves parsed prompts with it)."""
    if isinstance(node, bool):
        return node
    op, left, right = node
    if op == "~":
        return not tree_value(left)
    return (tree_value(left) and tree_value(right)) if op == "&" else (tree_value(left) or tree_value(right))


def tree_steps(node: Tree, out: list[str]) -> bool:
    """Evaluate ``node`` bottom-up, appending one worked step per operation (``T&F=F``, ``~F=T``): each step
    applies one operator to values already known, the last step gives the answer."""
    if isinstance(node, bool):
        return node
    op, left, right = node
    a = tree_steps(left, out)
    if op == "~":
        value = not a
        out.append(f"~{'T' if a else 'F'}={'T' if value else 'F'}")
        return value
    b = tree_steps(right, out)
    value = (a and b) if op == "&" else (a or b)
    out.append(f"{'T' if a else 'F'}{op}{'T' if b else 'F'}={'T' if value else 'F'}")
    return value


def _comparison(rng: random.Random, level: int) -> tuple[str, bool, list[str] | None]:
    """`a<b` with larger numbers by level; from level 5 the left side is a sum (worked: the sum, then the
    comparison)."""
    top = 99 if level <= 2 or 5 <= level <= 7 else 999
    op = rng.choice("<>")
    if level <= 4:
        a, b = rng.randint(0, top), rng.randint(0, top)
        left_text, left = str(a), a
    else:
        x, y, b = rng.randint(0, top), rng.randint(0, top), rng.randint(0, 2 * top)
        left_text, left = f"{x}+{y}", x + y
    return f"{left_text}{op}{b}", (left < b) if op == "<" else (left > b), (
        [f"{left_text}={left}", f"{left}{op}{b}={'T' if ((left < b) if op == '<' else (left > b)) else 'F'}"]
        if level > 4 else None)


@register_family("logic", "boolean expressions over T/F with & | ~ (more operands by level) and comparisons")
def make_logic(rng: random.Random, level: int):
    """40% comparisons, 60% boolean trees with 2 + (level-1)//2 leaves; worked steps evaluate a tree one
    operator at a time (innermost first)."""
    if rng.random() < 0.4:
        text, value, steps = _comparison(rng, level)
        kind = "compare"
    else:
        tree = _tree(rng, 2 + (level - 1) // 2)
        text, value, kind = _render(tree), tree_value(tree), "boolean"
        steps = []
        tree_steps(tree, steps)
        steps = steps or None  # a lone negated leaf cannot occur (two leaves at least); kept for safety
    return f"{text}=", "T" if value else "F", steps, {"kind": kind}
