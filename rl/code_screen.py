"""Is this text code? Two checks over untrusted answers, shared by the parent's pre-screen and the worker's hook.

Several scorers hand an answer to Python's builtin evaluator or to sympy's `parse_expr`, which compiles and runs
it with sympy's namespace and the builtins; sympy functions also re-parse string arguments the same way (a `sin` of
a string that holds code runs that code). So an answer is treated as a program, and a program may only be
arithmetic over literals, symbols and a fixed set of mathematical functions:

- `code_risk(answer)`: the parent's pre-screen, before an answer is sent to any scorer. True for anything that could
  run code: '__', a Python parse with a node outside the whitelist (attributes, lambdas, comprehensions, f-strings,
  keyword arguments, walrus), a call of a name outside `SAFE_CALLS`, a bare name that is a builtin or a callable or
  module outside the whitelist, or a string constant whose content itself parses as more than a name or literal
  (checked recursively); a lone word is allowed (it evaluates to an object and runs nothing). Text that is not Python
  (sympy's transformations accept '3!' and more) is refused if it calls any name outside `SAFE_CALLS` or calls an
  expression (')('). The answer is NFKC-normalised
  first, as Python does with identifiers, so fullwidth or other look-alike letters spell the names they look like.
- `source_refusal(source)` / `code_refusal(code)`: the worker's audit hook runs these on every `compile` and `exec`
  (rl/sandbox_policy.py), whatever scorer or library asked for it. The same whitelist over the syntax tree, or over
  a code object's names, so code that slipped past the pre-screen (or a scorer that evaluates some other text) still
  cannot call anything outside it; strings are data here, and a string that a sympy function re-parses is checked
  again when it is compiled.
"""

from __future__ import annotations

import ast
import builtins
import re
import sys
import unicodedata

__all__ = ["SAFE_CALLS", "SAFE_NAMES", "code_refusal", "code_risk", "prepare", "source_refusal"]

# Callables an answer may name. Each takes numbers, symbols or expressions and runs nothing it is given.
SAFE_CALLS = frozenset({
    "abs", "min", "max", "round", "sqrt", "cbrt", "root", "exp", "log", "ln", "sin", "cos", "tan", "cot", "sec", "csc",
    "asin", "acos", "atan", "atan2", "acot", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "Abs", "Min", "Max",
    "Rational", "Integer", "Float", "Symbol", "Function", "Matrix", "factorial", "binomial", "gamma", "floor",
    "ceiling", "Mod", "gcd", "lcm", "re", "im", "conjugate", "sign", "Add", "Mul", "Pow", "Eq", "Interval",
    "FiniteSet", "Tuple", "UnevaluatedExpr"})
SAFE_NAMES = SAFE_CALLS | {"pi", "E", "I", "oo", "zoo", "nan", "True", "False", "None"}

_SYMPY_STAR_IMPORT = "from sympy import *"  # sympy's parse_expr runs exactly this to fill its namespace
_NODES = (ast.Expression, ast.Module, ast.Expr, ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp, ast.BoolOp,
          ast.Compare, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Subscript, ast.Slice, ast.Call, ast.operator,
          ast.unaryop, ast.boolop, ast.cmpop)
_IDENT_CALL = re.compile(r"([^\W\d]\w{0,63})\(")
_EXPR_CALL = re.compile(r"[)\]}'\"]\(")
_DANGEROUS: frozenset | None = None


def _dangerous_names() -> frozenset:
    """Bare names an answer may not use: builtins, loaded top-level modules, and sympy's callables, outside the
    whitelist. Computed once, from what is loaded then (the worker calls it before sealing)."""
    global _DANGEROUS
    if _DANGEROUS is None:
        names = set(dir(builtins)) | {m.split(".")[0] for m in list(sys.modules)} | set(sys.stdlib_module_names)
        sympy = sys.modules.get("sympy")
        if sympy is not None:
            names |= {k for k, v in vars(sympy).items() if callable(v) or type(v).__name__ == "module"}
        _DANGEROUS = frozenset(names - SAFE_NAMES)
    return _DANGEROUS


def _name_refusal(name: str) -> str | None:
    if "__" in name:
        return f"dunder name {name!r}"
    if name not in SAFE_NAMES and name in _dangerous_names():
        return f"name {name!r}"
    return None


def _tree_refusal(tree: ast.AST, *, strings: bool, evaluate_kw: bool = False, depth: int = 0) -> str | None:
    """Why `tree` is more than arithmetic over literals, symbols and `SAFE_CALLS`; None if it is not. With
    `evaluate_kw`, the one keyword sympy's evaluate=False transform adds (`evaluate=<constant>`) is allowed."""
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword):
            if evaluate_kw and node.arg == "evaluate" and isinstance(node.value, ast.Constant):
                continue
            return f"keyword argument {node.arg!r}"
        if not isinstance(node, _NODES):
            return f"syntax {type(node).__name__}"
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in SAFE_CALLS):
                return "call of " + (node.func.id if isinstance(node.func, ast.Name) else "an expression")
        elif isinstance(node, ast.Name):
            why = _name_refusal(node.id)
            if why:
                return why
        elif isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
            if "__" in text:
                return "dunder in a string"
            if strings and (depth > 8 or _string_is_code(text, depth)):
                return "code in a string"
    return None


def _string_is_code(text: str, depth: int) -> bool:
    """A string constant is code when its content parses as Python that is more than one name or literal."""
    try:
        inner = ast.parse(unicodedata.normalize("NFKC", text).strip(), mode="eval")
    except Exception:
        return bool(_IDENT_CALL.search(text) or _EXPR_CALL.search(text))  # e.g. sympy-only syntax such as '3!'
    if isinstance(inner.body, (ast.Name, ast.Constant)):
        return False
    return _tree_refusal(inner, strings=True, depth=depth + 1) is not None or any(
        isinstance(n, (ast.Call, ast.Subscript)) for n in ast.walk(inner))


def code_risk(answer: str) -> bool:
    """True if `answer` could run code when a scorer evaluates it as Python or through sympy (see the module
    docstring). Free text such as 'option (A)' is refused when it is not valid Python."""
    if not isinstance(answer, str):
        return True
    answer = unicodedata.normalize("NFKC", answer)
    if "__" in answer:
        return True
    try:
        tree = ast.parse(answer.strip(), mode="eval")
    except Exception:
        tree = None
    except BaseException:  # RecursionError / MemoryError on pathological nesting
        return True
    if tree is not None:
        if isinstance(tree.body, ast.Name):  # one bare word evaluates to an object, runs nothing
            return False
        try:
            return _tree_refusal(tree, strings=True) is not None
        except RecursionError:
            return True
    t = re.sub(r"[\s\\]+", "", re.sub(r"#[^\n]*", "", answer))
    if _EXPR_CALL.search(t):
        return True
    return any(m.group(1) not in SAFE_CALLS for m in _IDENT_CALL.finditer(t))


def source_refusal(source) -> str | None:
    """Why the audit hook refuses to compile `source` (str, bytes or an AST); None to allow. Called inside the hook,
    so parsing here raises a nested 'compile' event that the hook lets through."""
    if isinstance(source, (bytes, bytearray)):
        source = bytes(source).decode("utf-8", "replace")
    if isinstance(source, str):
        if source.strip() == _SYMPY_STAR_IMPORT:
            return None
        try:
            source = ast.parse(source)
        except Exception as e:
            return f"unparsable source ({type(e).__name__})"
    if not isinstance(source, ast.AST):
        return f"source of type {type(source).__name__}"
    return _tree_refusal(source, strings=False, evaluate_kw=True)


_STAR_CODE = compile(_SYMPY_STAR_IMPORT, "<string>", "exec")


def prepare() -> None:
    """Compute the name lists from the modules loaded now; the worker calls this after its imports, before sealing."""
    _dangerous_names()


def code_refusal(code) -> str | None:
    """Why the audit hook refuses to execute the code object `code`; None to allow. Every global or attribute name
    it uses must pass the bare-name rule, and it may define no functions, classes or comprehensions."""
    if code == _STAR_CODE:
        return None
    for const in code.co_consts:
        if type(const).__name__ == "code":
            return "nested code object"
    for name in code.co_names:
        why = _name_refusal(name)
        if why:
            return why
    return None
