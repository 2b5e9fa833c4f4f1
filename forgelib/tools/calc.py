"""A safe calculator for the model's tool calls: ``calculator("821*92")`` is ``"75532"``.

**Why a hand-written calculator.** The expression comes from a model's output, i.e. from arbitrary text. Python's
``eval`` (even on a "cleaned" string or through ``ast``) executes or builds far more than arithmetic, and even
plain arithmetic such as ``9**9**9`` runs for minutes and fills memory. The calculator here has its own tokenizer
(ASCII digits, ``+ - * / // % **``, parentheses, whitespace: every other character is refused) and a Pratt
parser with an explicit depth counter; numbers are exact ``Fraction`` values, so ``0.1+0.2`` is ``0.3``. It runs
twice over the tokens: the first pass only checks the syntax and the nesting (it computes nothing), the second
computes. Each bound is a module constant:

* ``MAX_LENGTH`` = 200 characters, checked before anything else (so a megabyte of ``(`` costs nothing);
* ``MAX_DEPTH`` = 32 nested levels (parentheses, unary signs, chains of ``**``) -- parse recursion depth;
* ``MAX_EXPONENT`` = 64: ``|exponent|`` of ``**``; with right associativity ``9**9**9`` is ``9**387420489``
  and is refused at once;
* ``MAX_DIGITS`` = 1000 digits for the numerator and the denominator of every intermediate result. A power's
  size is *estimated before* it is computed (digits ~ |exponent| x log10(base), from bit lengths), so
  ``(10**60)**60`` is refused without being computed; a product is checked from its factors' sizes first;
* ``TIME_LIMIT_S`` = 50 ms of wall time, checked at every parse step and every operation (a safety net:
  the other bounds already keep every input far below it).

Results: an integer when the value is one (``"75532"``, also ``6/3`` -> ``"2"``), else a plain decimal rounded
to ``SIGNIFICANT_DIGITS`` = 10 significant digits without trailing zeros (``1/3`` -> ``"0.3333333333"``). A
non-integer exponent goes through a float power, as in Python (``2**0.5`` -> ``"1.414213562"``). Semantics
follow Python: ``**`` is right-associative and binds tighter than a unary sign on its left (``-2**2`` is -4,
``2**-1`` is 0.5), ``//`` and ``%`` floor (``-7//2`` is -4, ``7%-3`` is -2). Every problem -- a name, a call,
an attribute, a string, a comma, a bracket, a non-ASCII digit, ``1e308``, division by zero, a bound -- gives a
string ``"error: <what>"``; the calculator never raises for a string input.

Pure Python (the standard library only): no torch, no model.
"""
from __future__ import annotations

import decimal
import math
import time
from fractions import Fraction

__all__ = ["ERROR_PREFIX", "MAX_DEPTH", "MAX_DIGITS", "MAX_EXPONENT", "MAX_LENGTH", "SIGNIFICANT_DIGITS",
           "TIME_LIMIT_S", "calculator"]

# --- calculator bounds (see the module docstring) ---------------------------------------------------------
MAX_LENGTH = 200          # characters of the whole expression
MAX_DEPTH = 32            # nested parse levels: parentheses, unary signs, right operands of **
MAX_EXPONENT = 64         # |exponent| of **
MAX_DIGITS = 1000         # digits of the numerator and of the denominator of any intermediate result
TIME_LIMIT_S = 0.05       # wall time of one evaluation, checked inside the parse/evaluation loop
SIGNIFICANT_DIGITS = 10   # of a non-integer result

ERROR_PREFIX = "error: "
_LOG10_2 = math.log10(2)
_DIGITS = frozenset("0123456789")  # ASCII only: str.isdigit() would also accept e.g. Arabic-Indic digits
_SPACES = frozenset(" \t\r\n")
_SYMBOLS = ("**", "//", "+", "-", "*", "/", "%", "(", ")")  # two-character operators first
# infix operator -> (left binding power, right binding power): higher binds tighter; right < left makes ** right-
# associative. A unary sign parses its operand at _PREFIX_BP: ** (7) still binds inside it (-2**2 = -(2**2)),
# * (3) does not (-2*3 = (-2)*3).
_INFIX = {"+": (1, 2), "-": (1, 2), "*": (3, 4), "/": (3, 4), "//": (3, 4), "%": (3, 4), "**": (8, 7)}
_PREFIX_BP = 5


class _CalcError(Exception):
    """A refused expression; its message follows "error: " in the calculator's answer."""


# A token: (kind, value, position); kind is "num" (value a Fraction) or one of _SYMBOLS (value None).
_Token = tuple[str, "Fraction | None", int]


def _tokenize(expr: str) -> list[_Token]:
    """Split `expr` into numbers and operator symbols; anything else is refused, naming what and where."""
    tokens: list[_Token] = []
    i, n = 0, len(expr)
    while i < n:
        ch = expr[i]
        if ch in _SPACES:
            i += 1
            continue
        if ch == "." and i + 1 < n and (expr[i + 1].isalpha() or expr[i + 1] == "_"):
            j = i + 1
            while j < n and (expr[j].isalnum() or expr[j] == "_"):
                j += 1
            raise _CalcError(f"attributes are not allowed ({expr[i:j]!r} at position {i})")
        if ch in _DIGITS or ch == ".":
            j = i
            while j < n and expr[j] in _DIGITS:
                j += 1
            whole, frac = expr[i:j], ""
            if j < n and expr[j] == ".":
                k = j + 1
                while k < n and expr[k] in _DIGITS:
                    k += 1
                frac, j = expr[j + 1:k], k
            # a literal must not run on into letters, digits of other scripts, '_' or a second '.'
            # (1e308, 0x10, 1_000, 1.2.3, 1٣)
            if (not whole and not frac) or (j < n and (expr[j].isalnum() or expr[j] in "._")):
                end = j
                while end < n and (expr[end].isalnum() or expr[end] in "._"):
                    end += 1
                raise _CalcError(f"malformed number {expr[i:max(end, i + 1)]!r} at position {i} (only plain "
                                 f"decimals such as 12 or 3.25)")
            tokens.append(("num", Fraction(int(whole + frac or "0"), 10 ** len(frac)), i))
            i = j
            continue
        if ch.isalpha() or ch == "_":
            j = i
            while j < n and (expr[j].isalnum() or expr[j] == "_"):
                j += 1
            raise _CalcError(f"names are not allowed ({expr[i:j]!r} at position {i})")
        symbol = next((s for s in _SYMBOLS if expr.startswith(s, i)), None)
        if symbol is None:
            raise _CalcError(f"unsupported character {ch!r} at position {i} (allowed: digits, '.', "
                             f"+ - * / // % **, parentheses, spaces)")
        tokens.append((symbol, None, i))
        i += len(symbol)
    return tokens


def _size(value: Fraction) -> int:
    """An upper estimate of the digits of the larger of numerator and denominator."""
    bits = max(abs(value.numerator).bit_length(), value.denominator.bit_length())
    return int(bits * _LOG10_2) + 1


class _Parser:
    """Pratt parser over the tokens. With `compute=False` it only checks syntax and nesting (values are None);
    with `compute=True` it also evaluates, checking every bound as it goes."""

    def __init__(self, tokens: list[_Token], compute: bool, deadline: float):
        self.tokens, self.compute, self.deadline = tokens, compute, deadline
        self.pos = 0
        self.depth = 0

    def parse(self) -> Fraction | None:
        value = self.expression(0)
        if self.pos < len(self.tokens):
            raise _CalcError(f"unexpected {self._describe(self.tokens[self.pos])}")
        return value

    @staticmethod
    def _describe(token: _Token) -> str:
        kind, _, at = token
        return f"number at position {at}" if kind == "num" else f"{kind!r} at position {at}"

    def _check_time(self) -> None:
        if time.perf_counter() > self.deadline:
            raise _CalcError(f"time limit of {TIME_LIMIT_S * 1000:g} ms exceeded")

    def expression(self, min_bp: int) -> Fraction | None:
        """An expression whose infix operators all bind at least `min_bp` (the core of a Pratt parser)."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _CalcError(f"nesting deeper than {MAX_DEPTH} levels")
        self._check_time()
        if self.pos >= len(self.tokens):
            raise _CalcError("unexpected end of expression")
        kind, value, at = self.tokens[self.pos]
        self.pos += 1
        if kind == "num":
            left = value
        elif kind == "(":
            left = self.expression(0)
            if self.pos >= len(self.tokens) or self.tokens[self.pos][0] != ")":
                raise _CalcError(f"'(' at position {at} is never closed")
            self.pos += 1
        elif kind in ("+", "-"):
            operand = self.expression(_PREFIX_BP)
            left = -operand if (self.compute and kind == "-") else operand
        else:
            raise _CalcError(f"unexpected {kind!r} at position {at}")
        while self.pos < len(self.tokens):
            token = self.tokens[self.pos]
            if token[0] == ")":
                break
            if token[0] not in _INFIX:  # a number or '(' right after a value: 2 3, 2(3)
                raise _CalcError(f"unexpected {self._describe(token)} (an operator was expected)")
            left_bp, right_bp = _INFIX[token[0]]
            if left_bp < min_bp:
                break
            self.pos += 1
            right = self.expression(right_bp)
            left = self._apply(token[0], left, right) if self.compute else None
        self.depth -= 1
        return left

    def _apply(self, op: str, a: Fraction, b: Fraction) -> Fraction:
        """One operation, refusing zero divisors and oversized results (powers and products before computing)."""
        self._check_time()
        if op == "+":
            result = a + b
        elif op == "-":
            result = a - b
        elif op == "*":
            if _size(a) + _size(b) > MAX_DIGITS + 2:
                raise _CalcError(f"result too large (more than {MAX_DIGITS} digits)")
            result = a * b
        elif op in ("/", "//", "%"):
            if b == 0:
                raise _CalcError("division by zero" if op == "/" else f"{op!r} by zero")
            result = a / b if op == "/" else Fraction(a // b) if op == "//" else a % b
        else:
            result = self._power(a, b)
        if _size(result) > MAX_DIGITS:
            raise _CalcError(f"result too large (more than {MAX_DIGITS} digits)")
        return result

    def _power(self, base: Fraction, exponent: Fraction) -> Fraction:
        """base ** exponent: exact for an integer exponent, a float power otherwise (as Python)."""
        if abs(exponent) > MAX_EXPONENT:
            raise _CalcError(f"exponent out of range (|exponent| <= {MAX_EXPONENT})")
        if base == 0 and exponent < 0:
            raise _CalcError("division by zero (zero to a negative power)")
        if exponent.denominator == 1:
            # estimated digits of the result, before computing it
            if abs(exponent) * _size(base) > MAX_DIGITS + MAX_EXPONENT:
                raise _CalcError(f"result too large (more than {MAX_DIGITS} digits)")
            return base ** exponent.numerator
        if base < 0:
            raise _CalcError("fractional power of a negative number")
        try:
            value = math.pow(float(base), float(exponent))
        except OverflowError:
            raise _CalcError("result too large for a fractional power") from None
        if not math.isfinite(value):
            raise _CalcError("result too large for a fractional power")
        return Fraction(value)


def _format(value: Fraction) -> str:
    """An integer as such; anything else as a plain decimal of SIGNIFICANT_DIGITS digits, trailing zeros cut."""
    if value.denominator == 1:
        return str(value.numerator)
    with decimal.localcontext() as ctx:
        ctx.prec, ctx.rounding = SIGNIFICANT_DIGITS, decimal.ROUND_HALF_EVEN
        text = format(decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def calculator(expr: str) -> str:
    """Evaluate an arithmetic expression safely: the value as text, or ``"error: <what went wrong>"``.

    Integers and decimals, ``+ - * / // % **``, unary signs, parentheses and whitespace; Python's precedence,
    associativity and floor semantics; exact arithmetic. Never evaluates code and never raises for a string
    (a non-string raises TypeError). See the module docstring for the bounds.
    """
    if not isinstance(expr, str):
        raise TypeError(f"calculator takes a str, got {type(expr).__name__}")
    if len(expr) > MAX_LENGTH:
        return f"{ERROR_PREFIX}expression too long ({len(expr)} characters > {MAX_LENGTH})"
    deadline = time.perf_counter() + TIME_LIMIT_S
    try:
        tokens = _tokenize(expr)
        if not tokens:
            raise _CalcError("empty expression")
        _Parser(tokens, compute=False, deadline=deadline).parse()  # syntax and nesting only
        return _format(_Parser(tokens, compute=True, deadline=deadline).parse())
    except _CalcError as err:
        return f"{ERROR_PREFIX}{err}"
    except Exception as err:  # a safety net: no input string may make the calculator raise
        return f"{ERROR_PREFIX}cannot evaluate ({type(err).__name__})"

