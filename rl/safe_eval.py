"""A safe evaluator for plain arithmetic written by a model (untrusted input).

Nothing here calls `eval`, `exec` or `compile` on the input. `safe_eval(expr)`:

1. rejects anything that is not a `str` of at most `max_len` (256) characters made only of digits, `+ - * / ( ) .`
   and whitespace (`**` only with `allow_pow=True`, `//` only with `allow_floordiv=True`);
2. parses it with `ast.parse(expr, mode='eval')` (syntax tree only, nothing runs);
3. walks the tree with a whitelist: `Expression`, `BinOp` (`Add`, `Sub`, `Mult`, `Div`, optionally `Pow` and
   `FloorDiv`), `UnaryOp` (`USub`, `UAdd`) and int/float `Constant`s; at most `max_nodes` (64) nodes and
   `max_depth` (32) levels;
4. computes with exact `fractions.Fraction`s (a float literal such as `0.1` is read as the decimal 1/10), so
   `1/3*3 == 1` exactly; every literal and intermediate result must satisfy |x| <= `max_abs` (1e12); a power needs an
   integer exponent with |exponent| <= `max_exp` (8) and a result within `max_abs`; every denominator must also be
   at most `max_abs` squared, and a power whose result could not be is refused before it is computed, so time
   stays bounded on nested powers of small values; division by zero gives None.

It returns the value as a `Fraction`, or None for anything rejected, and never raises (every exception, including
`RecursionError` and `MemoryError`, becomes None). `numbers_used(expr)` lists the numeric literals of an expression
that `safe_eval` accepts, in source order (ints as `int`, decimals as `float`); Countdown uses it for the "each number
exactly once" rule.
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

__all__ = ["MAX_ABS", "MAX_DEPTH", "MAX_EXP", "MAX_LEN", "MAX_NODES", "numbers_used", "safe_eval"]

MAX_LEN = 256
MAX_NODES = 64
MAX_DEPTH = 32
MAX_ABS = 10 ** 12
MAX_EXP = 8

_CHARS = re.compile(r"[0-9+\-*/().\s]*")  # fullmatch; '**' and '//' are further gated below

_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


class _Reject(Exception):
    """The expression is outside the accepted language or its bounds."""


def _parse(expr, max_len: int, allow_pow: bool, allow_floordiv: bool, max_nodes: int, max_depth: int):
    """The checked syntax tree of `expr`, or raise `_Reject`."""
    if not isinstance(expr, str) or len(expr) > max_len or not _CHARS.fullmatch(expr):
        raise _Reject
    if not allow_pow and "**" in expr:
        raise _Reject
    if not allow_floordiv and "//" in expr:
        raise _Reject
    tree = ast.parse(expr.strip(), mode="eval")  # SyntaxError / RecursionError / MemoryError are caught by callers
    ops = _BINOPS + ((ast.Pow,) if allow_pow else ()) + ((ast.FloorDiv,) if allow_floordiv else ())
    count = 0
    stack = [(tree, 1)]
    while stack:  # iterative: the depth check cannot itself overflow the stack
        node, depth = stack.pop()
        count += 1
        if count > max_nodes or depth > max_depth:
            raise _Reject
        if isinstance(node, ast.Expression):
            stack.append((node.body, depth + 1))
        elif isinstance(node, ast.BinOp):
            if not isinstance(node.op, ops):
                raise _Reject
            stack.append((node.left, depth + 1))
            stack.append((node.right, depth + 1))
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd)):
                raise _Reject
            stack.append((node.operand, depth + 1))
        elif isinstance(node, ast.Constant):
            if type(node.value) not in (int, float):  # bool is a subclass of int: excluded by `type(...) in`
                raise _Reject
        else:
            raise _Reject
    return tree


def _literal(value, max_abs) -> Fraction:
    if type(value) is int:
        if abs(value) > max_abs:
            raise _Reject
        return Fraction(value)
    if not math.isfinite(value) or abs(value) > max_abs:
        raise _Reject
    return Fraction(repr(value))  # the decimal as written (shortest repr), not the binary float


def _check(x: Fraction, max_abs) -> Fraction:
    # A bound on the denominator too: |x| alone lets nested powers of small values grow a denominator of millions of
    # bits ((0.1**8)**8... takes seconds in C code no timer interrupts).
    if abs(x) > max_abs or x.denominator > max_abs * max_abs:
        raise _Reject
    return x


def _power(base: Fraction, exp: Fraction, max_abs, max_exp) -> Fraction:
    if exp.denominator != 1 or abs(exp) > max_exp:
        raise _Reject
    e = int(exp)
    if base == 0:
        if e < 0:
            raise _Reject  # 0 ** negative: division by zero
        return Fraction(1) if e == 0 else Fraction(0)
    # Bound before computing: the result's numerator and denominator have about bits * |e| bits, and must end within
    # max_abs * max_abs (the denominator bound), so a power that cannot is refused without being computed.
    bits = max(base.numerator.bit_length(), base.denominator.bit_length()) - 1
    if bits * abs(e) > int(max_abs).bit_length() * 4:
        raise _Reject
    return _check(base ** e, max_abs)


def _value(node, max_abs, max_exp) -> Fraction:
    if isinstance(node, ast.Expression):
        return _value(node.body, max_abs, max_exp)
    if isinstance(node, ast.Constant):
        return _literal(node.value, max_abs)
    if isinstance(node, ast.UnaryOp):
        v = _value(node.operand, max_abs, max_exp)
        return -v if isinstance(node.op, ast.USub) else v
    a = _value(node.left, max_abs, max_exp)
    b = _value(node.right, max_abs, max_exp)
    op = node.op
    if isinstance(op, ast.Add):
        return _check(a + b, max_abs)
    if isinstance(op, ast.Sub):
        return _check(a - b, max_abs)
    if isinstance(op, ast.Mult):
        return _check(a * b, max_abs)
    if isinstance(op, ast.Div):
        if b == 0:
            raise _Reject
        return _check(a / b, max_abs)
    if isinstance(op, ast.FloorDiv):
        if b == 0:
            raise _Reject
        return _check(Fraction(a // b), max_abs)
    if isinstance(op, ast.Pow):
        return _power(a, b, max_abs, max_exp)
    raise _Reject


def safe_eval(expr, *, allow_pow: bool = False, allow_floordiv: bool = False, max_len: int = MAX_LEN,
              max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH, max_abs: float = MAX_ABS,
              max_exp: int = MAX_EXP) -> Fraction | None:
    """The exact value of the arithmetic expression `expr` as a `Fraction`, or None if it is rejected (see the module
    docstring for the language and bounds). Never raises."""
    try:
        tree = _parse(expr, max_len, allow_pow, allow_floordiv, max_nodes, max_depth)
        return _value(tree, max_abs, max_exp)
    except Exception:  # _Reject, SyntaxError, ValueError, RecursionError, MemoryError, ZeroDivisionError, ...
        return None


def numbers_used(expr, *, allow_pow: bool = False, allow_floordiv: bool = False, max_len: int = MAX_LEN,
                 max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> list[int | float]:
    """The numeric literals of `expr` in source order (ints as `int`, decimals as `float`; a sign is an operator,
    so '-3' uses 3). [] for an expression outside the language that `safe_eval` accepts. Never raises."""
    try:
        tree = _parse(expr, max_len, allow_pow, allow_floordiv, max_nodes, max_depth)
        consts = [n for n in ast.walk(tree) if isinstance(n, ast.Constant)]
        consts.sort(key=lambda n: (n.lineno, n.col_offset))
        return [n.value for n in consts]
    except Exception:
        return []
