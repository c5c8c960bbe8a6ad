"""Structural labelers for GSM8K-style annotated solutions.

The C4/C5/C6 labels are not human judgements: they are exact rules applied to a worked solution
whose calculator steps are annotated the GSM8K way::

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.
    Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.
    #### 72

* C5 (``c5_pairs``): step_j DEPENDS on step_i when step_j's expression uses, as an operand, a number
  equal to a result step_i computed (the seed's rule, exact arithmetic, no tolerance).
* C4 (``c4_transitions``): step_j is BRIDGING when it uses an operand that is neither a number stated
  in the problem text nor a result of an earlier step, i.e. an implicit constant (60 minutes per
  hour, 100 for a percent, the 2 of a rearranged formula).
* C6 (``answer_type``): the format of a final answer string, decided with sympy.

Decisions (the lead and data users should know them):

* Lines without a ``<<...>>`` annotation are skipped by ``parse_solution``: they carry no expression
  and no checkable result, so they can neither feed nor consume a number under the C5 rule.  For
  C4 the numbers they write are known to later steps (given the raw solution): a result written
  out on a plain line ("40 + 42 + 31 + T = 113 + T") is an earlier result, not an implicit constant.
* A line with several annotations becomes one Step; ``expression``/``result`` are the last
  calculation's (the line's conclusion), ``operands`` and ``values`` cover all of them, and later
  calculations on the line may use earlier ones' results without counting as implicit constants.
* A step's result is the exact value of its expression (``fractions.Fraction``).  The number written
  after ``=`` in the annotation (``stated``) also counts as a result, because GSM8K rounds
  (``<<100/3=33.33>>``) and later steps reuse the rounded value.  When the expression cannot be
  evaluated exactly (irrational power, division by zero, junk) the stated value is the result.
* Signs are operators, not quantities: all number matching is on magnitudes, so ``10-3`` uses the 3
  produced by an earlier ``4-7 = -3`` and the ``5`` of "-5 degrees" in the problem text.
* Problem-text numbers: digits with thousands commas (``1,000``), decimals, ``a/b`` fractions (the
  parts and the value), mixed numbers, LaTeX ``\\frac{a}{b}``, and number words: cardinals
  ("twenty-five", "one hundred"), multiplier words ("twice", "double", "triple", "dozen", "pair")
  and fraction words ("half" gives 1, 2 and 1/2, "two-thirds" gives 1, 2, 3, 1/3 and 2/3).  They are
  stated in the problem, so using them is not bridging.
* Percent: "25%" in the text states 25 only.  A step that writes ``25/100`` or ``0.25`` uses an
  implicit constant (the 100 of "per cent") and is BRIDGING, as the design's "100 for a percent"
  asks.  A step that writes ``25%`` inside its annotation uses 25 (value 1/4): the percent sign
  is written, nothing implicit is introduced.
"""

from __future__ import annotations

import ast
import keyword
import math
import re
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Iterable, Sequence

# ---------------------------------------------------------------------------------------------
# Label constants
# ---------------------------------------------------------------------------------------------

BRIDGING = "BRIDGING"
NOT_BRIDGING = "NOT_BRIDGING"
C4_LABELS = (NOT_BRIDGING, BRIDGING)

DEPENDS = "DEPENDS"
INDEPENDENT = "INDEPENDENT"
C5_LABELS = (INDEPENDENT, DEPENDS)

INTEGER = "INTEGER"
DECIMAL = "DECIMAL"
FRACTION = "FRACTION"
RADICAL = "RADICAL"
SET = "SET"
INTERVAL = "INTERVAL"
EXPRESSION = "EXPRESSION"
OTHER = "OTHER"
ANSWER_TYPES = (INTEGER, DECIMAL, FRACTION, RADICAL, SET, INTERVAL, EXPRESSION, OTHER)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calculation:
    """One ``<<expression=stated>>`` annotation."""

    expression: str
    result: Fraction | None  # exact value of the expression, else the stated value, else None
    stated: Fraction | None  # the value written after "=" (may be rounded)
    operands: tuple[Fraction, ...]  # number literals of the expression, signed as written


@dataclass(frozen=True)
class Step:
    """One annotated solution line.

    ``text`` is what a reader (or a model) sees: the line with its ``<<...>>`` annotations removed.
    """

    text: str
    expression: str
    result: Fraction | None
    operands: tuple[Fraction, ...]
    stated: Fraction | None = None
    calculations: tuple[Calculation, ...] = field(default=(), repr=False)
    source: str = field(default="", repr=False)

    @property
    def values(self) -> frozenset[Fraction]:
        """Every number this step produces (exact and stated results of all its calculations),
        as magnitudes: what a later step may legitimately reuse."""
        out: set[Fraction] = set()
        for calc in self.calculations or (Calculation(self.expression, self.result, self.stated, self.operands),):
            for v in (calc.result, calc.stated):
                if v is not None:
                    out.add(abs(v))
        return frozenset(out)


_ANNOTATION = re.compile(r"<<(.*?)>>")
_FINAL = re.compile(r"^\s*####\s*(.*?)\s*$")


def parse_solution(answer: str) -> list[Step]:
    """One Step per annotated line of a GSM8K-style solution, in order.

    The ``#### answer`` line ends the solution; lines without a ``<<...>>`` annotation are skipped
    (see the module docstring for why).
    """
    steps: list[Step] = []
    for line in answer.splitlines():
        if _FINAL.match(line):
            break
        annotations = _ANNOTATION.findall(line)
        if not annotations:
            continue
        calcs = tuple(_parse_annotation(a) for a in annotations)
        last = calcs[-1]
        text = " ".join(_ANNOTATION.sub("", line).split())
        steps.append(
            Step(
                text=text,
                expression="; ".join(c.expression for c in calcs),
                result=last.result,
                operands=tuple(op for c in calcs for op in c.operands),
                stated=last.stated,
                calculations=calcs,
                source=line,
            )
        )
    return steps


def final_answer(answer: str) -> str | None:
    """The text after ``####`` (GSM8K's final answer), or None when the solution has none."""
    for line in answer.splitlines():
        m = _FINAL.match(line)
        if m:
            return m.group(1)
    return None


def _parse_annotation(body: str) -> Calculation:
    # The expression is left of the last "=": "a=b=c" is rare but the last value is the result.
    if "=" in body:
        expr, stated_text = body.rsplit("=", 1)
    else:
        expr, stated_text = body, ""
    expr = expr.strip()
    value, operands = evaluate(expr)
    stated, _ = evaluate(stated_text) if stated_text.strip() else (None, ())
    return Calculation(expression=expr, result=value if value is not None else stated, stated=stated, operands=operands)


# ---------------------------------------------------------------------------------------------
# Exact, safe evaluation of calculator expressions
# ---------------------------------------------------------------------------------------------

# A number literal, optionally followed by "%": thousands commas, decimals, leading-dot decimals.
_LITERAL = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(\s*%)?")
_MAX_EXPONENT = 64


@lru_cache(maxsize=65536)
def evaluate(expression: str) -> tuple[Fraction | None, tuple[Fraction, ...]]:
    """Exact value and number literals of a calculator expression, without ``eval``.

    Literals are swapped for placeholder names before ``ast.parse`` so that ``0.1`` stays exactly
    1/10 (never a float), ``1,000`` is one literal, and ``25%`` is the literal 25 with value 1/4.
    Returns ``(None, literals)`` when the value is not a rational number or cannot be computed.
    """
    text = expression.strip().replace("$", "").replace("\u2212", "-")
    text = text.replace("\u00d7", "*").replace("\u00f7", "/").replace("^", "**")
    literals: list[tuple[Fraction, Fraction]] = []  # (literal as written, its value)

    def _sub(m: re.Match) -> str:
        written = Fraction(m.group(1).replace(",", ""))
        value = written / 100 if m.group(2) else written
        literals.append((written, value))
        return f" _n{len(literals) - 1} "

    text = _LITERAL.sub(_sub, text)
    # Calculator habits: "3x4" / "3 x 4" for a product, "2(3+4)" for implicit multiplication.
    text = re.sub(r"(?<=[\w)])\s*[xX]\s*(?=[\w(])", "*", text)
    text = re.sub(r"(?<=[\w)])\s*\(", "*(", text)
    text = re.sub(r"\)\s*(?=_n)", ")*", text)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None, tuple(w for w, _ in literals)

    signs: dict[int, int] = {}
    try:
        value = _eval_node(tree.body, literals, signs)
    except (ZeroDivisionError, OverflowError, ValueError, KeyError, TypeError, _NotRational):
        value = None
    operands = tuple(w * signs.get(i, 1) for i, (w, _) in enumerate(literals))
    return value, operands


class _NotRational(Exception):
    pass


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: Fraction(a // b),
    ast.Mod: lambda a, b: a % b,
}


def _eval_node(node: ast.AST, literals: list[tuple[Fraction, Fraction]], signs: dict[int, int]) -> Fraction:
    if isinstance(node, ast.Name) and node.id.startswith("_n"):
        return literals[int(node.id[2:])][1]
    if isinstance(node, ast.BinOp):
        left = _eval_node(node.left, literals, signs)
        right = _eval_node(node.right, literals, signs)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise _NotRational(type(node.op).__name__)
        return op(left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Name):
            # "-5" written as a literal: remember the sign for the operand list.
            signs[int(node.operand.id[2:])] = -1
        value = _eval_node(node.operand, literals, signs)
        return -value if isinstance(node.op, ast.USub) else value
    raise _NotRational(type(node).__name__)


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    """Exact power; fractional exponents only when the root is exact (``25**0.5`` is 5)."""
    if abs(exponent) > _MAX_EXPONENT:
        raise _NotRational("exponent too large")
    if exponent.denominator == 1:
        # Refuse results too big to be a calculator step (and too slow to compute safely).
        if max(base.numerator.bit_length(), base.denominator.bit_length()) * abs(int(exponent)) > 100_000:
            raise _NotRational("result too large")
        return base ** int(exponent)
    if base < 0:
        raise _NotRational("root of a negative number")
    n = exponent.denominator
    num, den = _exact_root(base.numerator, n), _exact_root(base.denominator, n)
    if num is None or den is None:
        raise _NotRational("irrational root")
    return Fraction(num, den) ** exponent.numerator


def _exact_root(value: int, n: int) -> int | None:
    """The integer n-th root of value when there is one."""
    if value < 0 or n > _MAX_EXPONENT:
        return None
    if value < 2**1000:
        guess = round(value ** (1.0 / n))  # float is close enough; the candidates below check it
    elif n == 2:
        guess = math.isqrt(value)
    else:
        return None
    for r in (guess - 1, guess, guess + 1):
        if r >= 0 and r**n == value:
            return r
    return None


# ---------------------------------------------------------------------------------------------
# Numbers stated in a problem text
# ---------------------------------------------------------------------------------------------

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
# Words that state a multiplier: "twice as many" states the 2 that the step multiplies by.
_MULTIPLIERS = {
    "twice": 2, "double": 2, "doubled": 2, "doubles": 2, "triple": 3, "tripled": 3, "triples": 3, "thrice": 3,
    "quadruple": 4, "quadrupled": 4, "dozen": 12, "dozens": 12, "pair": 2, "pairs": 2,
}  # fmt: skip
# Fraction words state their denominator and the unit fraction ("half": 2 and 1/2).  "second" is
# left out (a unit of time far more often than 1/2), and "quarter" is 1/4, not 25 cents.
_FRACTION_WORDS = {
    "half": 2, "halves": 2, "third": 3, "thirds": 3, "quarter": 4, "quarters": 4, "fourth": 4, "fourths": 4,
    "fifth": 5, "fifths": 5, "sixth": 6, "sixths": 6, "seventh": 7, "sevenths": 7, "eighth": 8, "eighths": 8,
    "ninth": 9, "ninths": 9, "tenth": 10, "tenths": 10,
}  # fmt: skip

_TEXT_FRACTION = re.compile(r"(?<![\d.])(\d+)\s*/\s*(\d+)(?![\d.])")
_MIXED_NUMBER = re.compile(r"(?<![\d.])(\d+)\s+(\d+)\s*/\s*(\d+)(?![\d.])")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_WORD = re.compile(r"[a-z]+")


@lru_cache(maxsize=16384)
def numbers_in_text(text: str) -> frozenset[Fraction]:
    """Magnitudes of every number a problem text states, in digits or in words."""
    found: set[Fraction] = set()
    for m in _LITERAL.finditer(text):
        found.add(Fraction(m.group(1).replace(",", "")))
    for m in _TEXT_FRACTION.finditer(text):
        if int(m.group(2)):
            found.add(Fraction(int(m.group(1)), int(m.group(2))))
    for m in _LATEX_FRACTION.finditer(text):
        found.update({Fraction(int(m.group(1))), Fraction(int(m.group(2)))})
        if int(m.group(2)):
            found.add(Fraction(int(m.group(1)), int(m.group(2))))
    for m in _MIXED_NUMBER.finditer(text):
        if int(m.group(3)):
            found.add(int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3))))
    found.update(_word_numbers(text.lower()))
    return frozenset(found)


def _cardinal_kind(word: str) -> str | None:
    if word in _UNITS:
        return "unit" if _UNITS[word] < 10 else "teen"
    if word in _TENS:
        return "tens"
    if word in _SCALES:
        return "scale"
    return None


# Which cardinal word may follow which inside one number: "twenty five", "one hundred and five",
# "three thousand two hundred"; "five one" or "twenty thirty" start a new number.
_FOLLOWS = {
    None: {"unit", "teen", "tens", "scale"},
    "unit": {"scale"},
    "teen": {"scale"},
    "tens": {"unit", "scale"},
    "scale": {"unit", "teen", "tens", "scale"},
    "and": {"unit", "teen", "tens"},
}


def _word_numbers(text: str) -> set[Fraction]:
    found: set[Fraction] = set()
    words = _WORD.findall(text)
    i = 0
    while i < len(words):
        word = words[i]
        if word in _MULTIPLIERS:
            found.add(Fraction(_MULTIPLIERS[word]))
        if word in _FRACTION_WORDS:
            d = _FRACTION_WORDS[word]
            found.update({Fraction(1), Fraction(d), Fraction(1, d)})  # "half" writes 1/2: both parts are stated
        if _cardinal_kind(word) is None:
            i += 1
            continue
        # A run of cardinal words read the usual way: current accumulates below a thousand,
        # total collects thousands/millions.
        total, current, last, j = 0, 0, None, i
        while j < len(words):
            w = words[j]
            kind = _cardinal_kind(w)
            if w == "and" and last == "scale" and j + 1 < len(words) and _cardinal_kind(words[j + 1]) in _FOLLOWS["and"]:
                last, j = "and", j + 1
                continue
            if kind is None or kind not in _FOLLOWS[last]:
                break
            if kind == "scale":
                scale = _SCALES[w]
                if scale >= 1000:
                    total, current = (total + max(current, 1)) * scale, 0
                else:
                    current = max(current, 1) * scale
            else:
                current += _UNITS.get(w, 0) + _TENS.get(w, 0)
            found.add(Fraction(_UNITS.get(w, 0) + _TENS.get(w, 0) or _SCALES.get(w, 0)))
            last, j = kind, j + 1
        value = total + current
        found.add(Fraction(value))
        nxt = words[j] if j < len(words) else ""
        if nxt in _FRACTION_WORDS and value:  # "two thirds", "three-quarters"
            found.add(Fraction(value, _FRACTION_WORDS[nxt]))
        elif nxt == "and" and words[j + 1 : j + 3] == ["a", "half"]:  # "one and a half"
            found.add(value + Fraction(1, 2))
        i = j
    return found


# ---------------------------------------------------------------------------------------------
# C5: dependency pairs
# ---------------------------------------------------------------------------------------------


def _as_steps(steps: str | Sequence[Step]) -> list[Step]:
    return parse_solution(steps) if isinstance(steps, str) else list(steps)


def depends(step_i: Step, step_j: Step) -> bool:
    """The seed's rule: step_j uses, as an operand, a number equal to a result of step_i."""
    produced = step_i.values
    return any(abs(op) in produced for op in step_j.operands)


def c5_pairs(problem: str, steps: str | Sequence[Step]) -> list[dict]:
    """Every ordered pair i < j of annotated steps, labelled DEPENDS / INDEPENDENT.

    ``steps`` is a parsed list or the raw annotated solution.  ``problem`` is not needed by the rule
    (the result-operand match is self-contained) and is accepted for symmetry with ``c4_transitions``.
    A coincidence counts: if step_i's result equals a number the problem also states, and step_j
    uses that number, the pair is DEPENDS -- the rule is exact, not a guess at intent.
    """
    del problem
    parsed = _as_steps(steps)
    out: list[dict] = []
    for j in range(len(parsed)):
        for i in range(j):
            out.append(
                {
                    "i": i,
                    "j": j,
                    "step_i": parsed[i].text,
                    "step_j": parsed[j].text,
                    "label": DEPENDS if depends(parsed[i], parsed[j]) else INDEPENDENT,
                }
            )
    out.sort(key=lambda r: (r["i"], r["j"]))
    return out


# ---------------------------------------------------------------------------------------------
# C4: bridging transitions
# ---------------------------------------------------------------------------------------------


def implicit_operands(problem: str, steps: str | Sequence[Step], *, always_known: Iterable = ()) -> list[list[Fraction]]:
    """For each step, the operands (magnitudes) that come neither from the problem text nor from
    an earlier result: the implicit constants that make a step BRIDGING.

    ``always_known`` lets a caller exempt constants (e.g. ``{1, 2}``); the default exempts none.
    Given the raw solution, numbers written on earlier lines without annotations are known too.
    """
    known: set[Fraction] = set(numbers_in_text(problem)) | {abs(Fraction(k)) for k in always_known}
    written = _plain_line_numbers(steps) if isinstance(steps, str) else None
    out: list[list[Fraction]] = []
    for n, step in enumerate(_as_steps(steps)):
        if written is not None:
            known.update(written[n])
        missing: list[Fraction] = []
        calcs = step.calculations or (Calculation(step.expression, step.result, step.stated, step.operands),)
        for calc in calcs:
            missing.extend(abs(op) for op in calc.operands if abs(op) not in known)
            # Later calculations on the same line may use this one's result.
            known.update(abs(v) for v in (calc.result, calc.stated) if v is not None)
        out.append(missing)
    return out


def _plain_line_numbers(answer: str) -> list[frozenset[Fraction]]:
    """For each annotated line (a Step), the numbers of the unannotated lines since the previous one."""
    out: list[frozenset[Fraction]] = []
    pending: set[Fraction] = set()
    for line in answer.splitlines():
        if _FINAL.match(line):
            break
        if _ANNOTATION.search(line):
            out.append(frozenset(pending))
            pending = set()
        else:
            pending.update(numbers_in_text(line))
    return out


def c4_transitions(problem: str, steps: str | Sequence[Step], *, always_known: Iterable = ()) -> list[dict]:
    """One record per step j: ``step_i`` is the previous step's text (``""`` before the first),
    ``earlier_steps`` every step before j (the results the rule counts as known), ``label`` is
    BRIDGING when step j uses an implicit constant (see ``implicit_operands``)."""
    parsed = _as_steps(steps)
    missing = implicit_operands(problem, steps, always_known=always_known)
    return [
        {
            "i": j - 1 if j else None,  # no earlier step before the first one
            "j": j,
            "step_i": parsed[j - 1].text if j else "",
            "earlier_steps": " ".join(s.text for s in parsed[:j]),
            "step_j": step.text,
            "label": BRIDGING if missing[j] else NOT_BRIDGING,
        }
        for j, step in enumerate(parsed)
    ]


def record_fields(row: dict) -> dict:
    """A ``c4_transitions`` / ``c5_pairs`` row as record fields: its texts and label, without the
    step indices (the one place that says which of a rule's fields a record file carries)."""
    return {k: v for k, v in row.items() if k not in ("i", "j")}


# ---------------------------------------------------------------------------------------------
# C6: answer type
# ---------------------------------------------------------------------------------------------
#
# Decisions:
# * The type is that of the VALUE, except that decimals are a written choice: "0.5" is DECIMAL and
#   "1/2" is FRACTION; "4/2" and "\sqrt{4}" are INTEGER (they are the integer 2, unreduced);
#   "\sqrt{8}" is RADICAL; "2.0" is DECIMAL (written with a decimal point).
# * Units, currency and percent signs are decoration: "50%" is INTEGER, "12.5%" DECIMAL,
#   "$3.75" DECIMAL, "45^\circ" INTEGER, "5 cm" INTEGER.
# * pi (and any symbol) makes an EXPRESSION: "3\pi" is an answer left in terms of a symbol.
# * "(1, 2)" is a tuple -> SET; "[0, 1]", "[0, 1)", "(-\infty, 3]" and unions are INTERVAL; a pair in
#   round brackets becomes INTERVAL only with an infinite end.  "3 \pm \sqrt{2}" is a SET of two.
# * "x \le 3" and "-1 < x \le 4" are INTERVAL (a solution set written as an inequality).
# * A lone capital letter (a multiple-choice pick), words, ratios "3:4" -> OTHER.
# * Plain integers, decimals, a/b, \frac{a}{b} and k\sqrt{m} are typed without sympy (same result,
#   much cheaper); everything else goes through sympy's parser with only whitelisted names.

_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "theta", "lambda", "mu", "nu", "rho", "sigma", "tau",
    "phi", "omega", "psi", "chi", "eta", "zeta", "kappa", "xi",
}  # fmt: skip
_FUNCS = {"sqrt", "root", "pi", "oo"}
_DROP_COMMANDS = {"text", "textbf", "textit", "mbox", "mathrm", "operatorname", "textrm", "hbox"}
_UNWRAP_COMMANDS = {"boxed", "fbox", "mathbf", "mathit", "displaystyle", "mathbb", "bm", "pmb"}
_SIMPLE_COMMANDS = {
    "cdot": "*", "times": "*", "ast": "*", "div": "/", "pi": " pi ", "infty": " oo ", "infinity": " oo ",
    "pm": "\u00b1", "mp": "\u00b1", "cup": "\u222a", "emptyset": "{}", "varnothing": "{}", "circ": "",
    "left": "", "right": "", "big": "", "Big": "", "bigl": "", "bigr": "", "quad": " ", "qquad": " ",
    "dots": "", "ldots": "", "cdots": "", "degree": "", "%": "", "$": "", "{": "{", "}": "}", ",": " ",
    "!": "", ";": " ", ":": " ", " ": " ", "le": "<=", "leq": "<=", "ge": ">=", "geq": ">=", "lt": "<", "gt": ">",
    "ne": "!=", "neq": "!=",
}  # fmt: skip


def _skip_spaces(s: str, i: int) -> int:
    while i < len(s) and s[i] == " ":
        i += 1
    return i


def _group(s: str, i: int) -> tuple[str, int]:
    """The argument starting at s[i]: a balanced ``{...}`` group, a ``\\command``, or one char."""
    i = _skip_spaces(s, i)
    if i >= len(s):
        raise ValueError("missing argument")
    if s[i] == "{":
        depth = 0
        for k in range(i, len(s)):
            if s[k] == "{" and (k == 0 or s[k - 1] != "\\"):
                depth += 1
            elif s[k] == "}" and s[k - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return s[i + 1 : k], k + 1
        raise ValueError("unbalanced braces")
    if s[i] == "\\":
        m = re.match(r"\\[A-Za-z]+", s[i:])
        if m:
            return m.group(0), i + len(m.group(0))
    return s[i], i + 1


def _script(s: str, i: int) -> tuple[str, int]:
    """The argument of ``^``/``_``: a brace group as in LaTeX, but in plain-text answers a whole
    number (``10^10``), a signed number (``x^-1``) or a parenthesised group (``2^(1/2)``)."""
    j = _skip_spaces(s, i)
    m = re.match(r"-?\d+(?:\.\d+)?", s[j:])
    if m:
        return m.group(0), j + len(m.group(0))
    if j < len(s) and s[j] == "(":
        depth = 0
        for k in range(j, len(s)):
            depth += {"(": 1, ")": -1}.get(s[k], 0)
            if depth == 0:
                return s[j : k + 1], k + 1
        raise ValueError("unbalanced parentheses")
    return _group(s, j)


def _latex_to_plain(s: str) -> str:
    """Rewrite the LaTeX an answer key uses into sympy-parsable text (recursive over arguments)."""
    out: list[str] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            m = re.match(r"\\([A-Za-z]+|.)", s[i:])
            name = m.group(1) if m else ""
            i += len(m.group(0)) if m else 1
            if name in ("frac", "dfrac", "tfrac", "cfrac"):
                num, i = _group(s, i)
                den, i = _group(s, i)
                out.append(f"(({_latex_to_plain(num)})/({_latex_to_plain(den)}))")
            elif name == "sqrt":
                j = _skip_spaces(s, i)
                index = None
                if j < len(s) and s[j] == "[":
                    close = s.index("]", j)
                    index, i = s[j + 1 : close], close + 1
                arg, i = _group(s, i)
                inner = _latex_to_plain(arg)
                out.append(f"sqrt({inner})" if index is None else f"root({inner},{_latex_to_plain(index)})")
            elif name in _DROP_COMMANDS:
                arg, i = _group(s, i)
                # Keep word-like content ("and"/"or" separate set members, units are dropped later).
                out.append(f" {arg} ")
            elif name in _UNWRAP_COMMANDS:
                arg, i = _group(s, i)
                out.append(_latex_to_plain(arg))
            elif name in _SIMPLE_COMMANDS:
                out.append(_SIMPLE_COMMANDS[name])
            elif name in _GREEK:
                out.append(f" {name} ")
            else:
                out.append(f" {name} ")  # unknown command: keep its name; words make OTHER later
        elif ch in "^_":
            arg, i = _script(s, i + 1)
            plain = _latex_to_plain(arg).strip()
            if ch == "_":
                out.append(plain)  # subscripts become part of the name: x_1 -> x1
            elif plain in ("", "circ", "o"):
                pass  # degrees
            else:
                out.append(f"**({plain})")
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _normalise_answer(answer: str) -> str:
    s = answer.strip()
    s = re.sub(r"^####\s*", "", s)
    s = s.replace("\u2212", "-").replace("\u2013", "-").replace("\u00d7", "*").replace("\u00f7", "/")
    s = s.replace("\u03c0", r"\pi ").replace("\u221e", r"\infty ").replace("\u00b0", "").replace("\u00b1", r"\pm ")
    s = re.sub(r"\u221a\s*(\d+|[A-Za-z]|\([^()]*\))", r"\\sqrt{\1}", s)
    s = re.sub(r"^\$+|\$+$", "", s.strip())
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s.strip())
    # Mixed number "2\frac{1}{2}" is 2 + 1/2, not 2 * 1/2.
    s = re.sub(r"(\d)\s*\\[dt]?frac\s*\{(\d+)\}\s*\{(\d+)\}", r"(\1+\\frac{\2}{\3})", s)
    s = _latex_to_plain(s)
    s = s.replace("%", "").replace("$", "")
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    return s


_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
_PAIRS = {"(": ")", "[": "]", "{": "}"}


def _split_top(s: str, sep: str) -> list[str]:
    """Split on ``sep`` outside any brackets."""
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(s[start:k])
            start = k + 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _wrapped(s: str) -> bool:
    """True when the first bracket of s closes at its very end (``(1,2)`` but not ``(1)+(2)``)."""
    depth = 0
    for k, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0 and k != len(s) - 1:
                return False
    return True


@lru_cache(maxsize=65536)
def answer_type(answer: str) -> str:
    """The answer's type: one of ``ANSWER_TYPES`` (decisions documented above)."""
    try:
        s = _normalise_answer(answer)
    except ValueError:
        return OTHER
    if not s or len(s) > 300:
        return OTHER
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = re.sub(r"\s+(?:and|or)\s+", ",", s)
    return _structure_type(s)


_INEQUALITY = re.compile(r"^(?:(.+?)\s*(?:<=|<)\s*)?[A-Za-z]\s*(?:<=|>=|<|>)\s*(.+)$")


def _structure_type(s: str) -> str:
    m = _INEQUALITY.match(s)
    if m and "," not in s:  # "x <= 3", "-1 < x <= 4": a solution set written as an inequality
        ends = [e for e in m.groups() if e is not None]
        return INTERVAL if all(_scalar_type(e) not in (OTHER, SET) or _is_infinite(e) for e in ends) else OTHER
    if "\u222a" in s:  # a union of intervals
        parts = [p for p in s.split("\u222a")]
        return INTERVAL if all(_structure_type(p.strip()) == INTERVAL for p in parts) else OTHER
    if s in ("{}", "{ }"):
        return SET
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}" and _wrapped(s):
        inner = _split_top(s[1:-1], ",")
        if s[0] == "{":
            return SET if all(_scalar_type(p) != OTHER for p in inner) else OTHER
        if len(inner) == 2 and all(_scalar_type(p) != OTHER or _is_infinite(p) for p in inner):
            if s[0] == "[" or s[-1] == "]" or any(_is_infinite(p) for p in inner):
                return INTERVAL
            return SET  # "(1, 2)": a pair of values
        if len(inner) >= 2:
            return SET if all(_scalar_type(p) != OTHER for p in inner) else OTHER
    parts = _split_top(s, ",")
    if len(parts) > 1:
        return SET if all(_structure_type(p) not in (OTHER,) for p in parts if p) and all(parts) else OTHER
    if "\u00b1" in s:
        return SET if _scalar_type(s.replace("\u00b1", "+")) != OTHER else OTHER
    return _scalar_type(s)


def _is_infinite(s: str) -> bool:
    return s.replace(" ", "") in ("oo", "-oo", "+oo")


_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_ALLOWED_CHARS = re.compile(r"^[0-9A-Za-z+\-*/().,\s]*$")
_TRAILING_UNITS = re.compile(r"^(.*?[\d)])\s+([A-Za-z]{2,}\.?(?:\s+[A-Za-z]+\.?)*)$")


_FAST_INT = re.compile(r"-?\d+")
_FAST_DEC = re.compile(r"-?\d*\.\d+")
_FAST_FRAC = re.compile(r"(-?)(?:(\d+)\s*/\s*(\d+)|\(\((\d+)\)/\((\d+)\)\))")
_FAST_ROOT = re.compile(r"-?(\d*)\s*\*?\s*sqrt\((\d+)\)")


def _fast_scalar_type(s: str) -> str | None:
    """The common shapes (integers, decimals, a/b, \\frac{a}{b}, k\\sqrt{m}) without sympy: same
    answers as the general path, a hundred times cheaper.  None: not a common shape."""
    if _FAST_INT.fullmatch(s):
        return INTEGER
    if _FAST_DEC.fullmatch(s):
        return DECIMAL
    m = _FAST_FRAC.fullmatch(s)
    if m:
        num, den = int(m.group(2) or m.group(4)), int(m.group(3) or m.group(5))
        if den == 0:
            return OTHER
        return INTEGER if num % den == 0 else FRACTION
    m = _FAST_ROOT.fullmatch(s)
    if m:
        coef, radicand = int(m.group(1) or 1), int(m.group(2))
        if coef == 0 or radicand == 0:
            return INTEGER
        return INTEGER if math.isqrt(radicand) ** 2 == radicand else RADICAL
    return None


@lru_cache(maxsize=65536)
def _scalar_type(s: str) -> str:
    s = s.strip()
    # "x = 3" -> "3" (an answer that names the variable it solves for).
    s = re.sub(r"^[A-Za-z][A-Za-z0-9]*\s*=\s*(?=.)", "", s)
    fast = _fast_scalar_type(s)
    if fast is not None:
        return fast
    m = _TRAILING_UNITS.match(s)
    if m and not ({w.lower() for w in re.findall(r"[A-Za-z]+", m.group(2))} & (_FUNCS | _GREEK)):
        s = m.group(1)  # "5 cm", "12 dollars"
    if re.fullmatch(r"\(?[A-Z]\)?", s):
        return OTHER  # multiple-choice letter
    s = s.replace("**", "^")
    if not _ALLOWED_CHARS.match(s.replace("^", "")):
        return OTHER
    if re.search(r"[A-Za-z]\s*\.|\.\s*[A-Za-z]|\.\.", s):
        return OTHER  # attribute access or stray dots: never hand that to the parser
    pieces: list[str] = []
    pos = 0
    for m in _IDENT.finditer(s):
        name = m.group(0)
        pieces.append(s[pos : m.start()])
        pos = m.end()
        letters = re.sub(r"\d+$", "", name)
        if name in _FUNCS or name.lower() in _GREEK or len(letters) == 1:
            pieces.append(f" {name} ")
        elif len(name) <= 3 and name.isalpha() and not keyword.iskeyword(name):
            pieces.append(" " + "*".join(name) + " ")  # "xy" is x*y
        else:
            return OTHER  # a word: "Monday", "yes"
    pieces.append(s[pos:])
    expr_text = "".join(pieces).replace("^", "**")
    has_decimal = bool(re.search(r"\d*\.\d+|\d+\.(?!\d)", expr_text))
    value = _sympy_value(expr_text)
    if value is None:
        return OTHER
    return _classify_value(value, has_decimal)


@lru_cache(maxsize=65536)
def _sympy_value(expr_text: str):
    """Parse with sympy without giving the parser anything but a few whitelisted names."""
    import sympy
    from sympy.parsing.sympy_parser import (
        auto_number,
        auto_symbol,
        implicit_multiplication,
        parse_expr,
        repeated_decimals,
    )

    transformations = (auto_symbol, repeated_decimals, auto_number, implicit_multiplication)
    names = {n for n in _IDENT.findall(expr_text)}
    local_dict = {n: sympy.Symbol(n) for n in names if n not in _FUNCS}
    local_dict.update({"sqrt": sympy.sqrt, "root": sympy.root, "pi": sympy.pi, "oo": sympy.oo})
    global_dict = {
        "__builtins__": {},
        "Integer": sympy.Integer,
        "Float": sympy.Float,
        "Rational": sympy.Rational,
        "Symbol": sympy.Symbol,
        # The unevaluated parse builds Add/Mul/Pow nodes explicitly.
        "Add": sympy.Add,
        "Mul": sympy.Mul,
        "Pow": sympy.Pow,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sympy deprecation chatter on odd input is not our news
        try:
            unevaluated = parse_expr(expr_text, local_dict=local_dict, global_dict=global_dict,
                                     transformations=transformations, evaluate=False)  # fmt: skip
            # Refuse power towers and huge powers before letting sympy evaluate anything.
            if not _powers_are_small(unevaluated):
                return None
            value = parse_expr(expr_text, local_dict=local_dict, global_dict=global_dict,
                               transformations=transformations)  # fmt: skip
        except Exception:  # sympy raises a zoo of types for malformed input; all mean "not an answer"
            return None
    if not isinstance(value, sympy.Basic):
        return None
    return value


def _powers_are_small(expr) -> bool:
    """True when every power in an unevaluated tree has a small numeric exponent and a result of
    modest size, checked innermost first so evaluating an exponent is itself always cheap."""
    import sympy

    for node in sympy.postorder_traversal(expr):
        if not isinstance(node, sympy.Pow):
            continue
        exp = node.exp if node.exp.is_Number else node.exp.doit()
        if exp.free_symbols:
            continue  # x^n: symbolic, never expanded numerically
        if not exp.is_Number or abs(exp) > 1000:
            return False
        base = node.base if node.base.is_Number else node.base.doit()
        if base.is_Number and base != 0 and abs(float(exp)) * abs(math.log10(abs(float(base)) or 1.0)) > 10_000:
            return False
    return True


def _classify_value(value, has_decimal: bool) -> str:
    import sympy

    if value.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
        return OTHER
    if value.free_symbols or value.has(sympy.pi):
        return EXPRESSION
    if any(
        isinstance(p, sympy.Pow) and p.exp.is_Rational and not p.exp.is_Integer and p.base.is_number
        for p in sympy.preorder_traversal(value)
    ):
        return RADICAL
    if has_decimal:
        return DECIMAL if value.is_number and value.is_real else OTHER
    if value.is_Integer:
        return INTEGER
    if value.is_Rational:
        return FRACTION
    return OTHER
