"""A procedural corpus of math word problems, labelled by the structural rules.

The generator writes problems and GSM8K-style annotated solutions across several domains (money
and percents, rates and time, unit conversions, geometry, algebra, fractions, counting).  It sets
no labels: every C4/C5 label comes from ``c4_transitions`` / ``c5_pairs`` run on the solution it
wrote, and every C6 label from ``answer_type`` on the final answer.  What the generator controls is
the *mix*: how often a solution needs an implicit constant (an hours-to-minutes step, a percent
over 100, the 2 of a perimeter), how often an answer is a fraction, a radical, a set.

Design choices that keep the labels honest:

* Each domain that can need an implicit constant also has twins that do not (a "dozen" or "pairs"
  problem multiplies by a stated 12 or 2, minutes are summed without conversion, a perimeter is
  written l+w+l+w), so unit words and conversion-looking numbers occur in both C4 classes.
* Each non-integer answer type shares its templates with integer answers (a hypotenuse of a
  Pythagorean triple, a fraction that reduces to a whole number, a double root, "the largest
  integer that satisfies ..."), so the C6 label depends on the numbers, not on a keyword.
* The constants a conversion needs (60, 12, 100, 1000, 7, the 2 of a perimeter) are never drawn
  as the template's own numbers, so whether a step is BRIDGING is visible in the step itself
  ("4*60 = 240 minutes").  Other coincidences can still happen; the labeler's verdict stands.
* Determinism: everything is drawn from ``random.Random`` seeded by (seed, task, file index), so
  the same arguments give the same bytes, and files can be built in any order.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from random import Random
from typing import Callable, Iterable, Iterator

from mycelium import storage
from mycelium.data.gsm8k import part_name, to_jsonl
from mycelium.data.structural import (
    answer_type, c4_transitions, c5_pairs, evaluate, final_answer, parse_solution, record_fields,
)

TASKS = ("c4", "c5", "c6")

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoProblem:
    """One generated problem.  ``domain`` names the template (for diagnostics; never written)."""

    question: str
    solution: str  # annotated lines, then "#### answer"
    answer: str
    domain: str


_NAMES = [
    ("Ava", "she", "her"), ("Liam", "he", "his"), ("Maya", "she", "her"), ("Noah", "he", "his"),
    ("Priya", "she", "her"), ("Mateo", "he", "his"), ("Chloe", "she", "her"), ("Kenji", "he", "his"),
    ("Fatima", "she", "her"), ("Oscar", "he", "his"), ("Lena", "she", "her"), ("Diego", "he", "his"),
    ("Grace", "she", "her"), ("Samuel", "he", "his"), ("Amara", "she", "her"), ("Tariq", "he", "his"),
    ("Sofia", "she", "her"), ("Ethan", "he", "his"), ("Mei", "she", "her"), ("Jonah", "he", "his"),
    ("Rosa", "she", "her"), ("Felix", "he", "his"), ("Hana", "she", "her"), ("Marcus", "he", "his"),
    ("Isla", "she", "her"), ("Omar", "he", "his"), ("Nadia", "she", "her"), ("Leo", "he", "his"),
]  # fmt: skip
_GOODS = [
    ("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("sandwich", "sandwiches"),
    ("comic book", "comic books"), ("candle", "candles"), ("mug", "mugs"), ("plant", "plants"),
    ("muffin", "muffins"), ("ticket", "tickets"), ("T-shirt", "T-shirts"), ("bracelet", "bracelets"),
    ("puzzle", "puzzles"), ("bag of chips", "bags of chips"), ("cupcake", "cupcakes"), ("scarf", "scarves"),
]  # fmt: skip
_BIG_ITEMS = ["jacket", "bicycle", "lamp", "backpack", "pair of boots", "guitar", "desk chair", "tent", "watch"]
_ACTIVITIES = ["practices the piano", "reads", "studies Spanish", "plays chess", "swims", "paints", "jogs", "practices yoga"]
_SPORTS = ["soccer", "basketball", "tennis", "swimming", "volleyball", "baseball", "cycling", "running"]
_COLORS = ["red", "blue", "green", "yellow", "white", "black", "purple"]
_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


def _person(r: Random, exclude: Iterable[str] = ()) -> tuple[str, str, str]:
    pool = [p for p in _NAMES if p[0] not in set(exclude)]
    return r.choice(pool)


def _fmt(q: Fraction | int) -> str:
    """How a solution writes a number: 24, 2.5, 0.75, or 7/3 when the decimal does not end."""
    q = Fraction(q)
    if q.denominator == 1:
        return str(q.numerator)
    d = q.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:
        return f"{q.numerator}/{q.denominator}"
    text = f"{float(q):.6f}".rstrip("0").rstrip(".")
    return text


def _money(q: Fraction | int) -> str:
    """How a question states a price: $12 or $3.50."""
    q = Fraction(q)
    return f"${q.numerator}" if q.denominator == 1 else f"${float(q):.2f}"


def _count(r: Random, n: int, p_word: float = 0.25) -> str:
    """A small count, sometimes in words ("three"), which the labeler reads as a stated number."""
    return _WORDS[n] if n in _WORDS and r.random() < p_word else str(n)


def _frac_latex(q: Fraction, r: Random) -> str:
    """A final fraction answer in one of the ways answer keys write it."""
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    a, b = abs(q.numerator), q.denominator
    style = r.random()
    if style < 0.55:
        return rf"{sign}\frac{{{a}}}{{{b}}}"
    if style < 0.7:
        return rf"{sign}\dfrac{{{a}}}{{{b}}}"
    return f"{sign}{a}/{b}"


def _sqrt_parts(n: int) -> tuple[int, int]:
    """n = k*k*m with m square-free."""
    k, m = 1, n
    f = 2
    while f * f <= m:
        while m % (f * f) == 0:
            m //= f * f
            k *= f
        f += 1
    return k, m


def _sqrt_latex(n: int, r: Random) -> str:
    k, m = _sqrt_parts(n)
    if m == 1:
        return str(k)
    root = rf"\sqrt{{{m}}}" if r.random() < 0.85 else f"\u221a{m}"
    return root if k == 1 else f"{k}{root}"


class _Solution:
    """Accumulates solution lines in GSM8K's annotation format."""

    def __init__(self, r: Random):
        self.lines: list[str] = []
        # Display style of products varies per problem, as it does across GSM8K annotators.
        self.times = r.choice(["*", "*", " x ", " * "])

    def calc(self, template: str, expr: str, money: bool = False) -> Fraction:
        """Append ``template`` with ``{}`` replaced by ``expr = <<expr=result>>result``."""
        value, _ = evaluate(expr)
        if value is None:  # a template bug, never data: fail loudly
            raise AssertionError(f"demo expression does not evaluate: {expr!r}")
        shown = expr.replace("*", self.times)
        res = _fmt(value)
        self.lines.append(template.format(f"{shown} = {'$' if money else ''}<<{expr}={res}>>{res}"))
        return value

    def say(self, line: str) -> None:
        self.lines.append(line)

    def done(self, question: str, answer: str, domain: str) -> DemoProblem:
        return DemoProblem(question, "\n".join(self.lines + [f"#### {answer}"]), answer, domain)


def _price(r: Random, cents: bool, lo: int = 1, hi: int = 15) -> Fraction:
    whole = r.randint(lo, hi)
    if not cents:
        return Fraction(whole)
    return whole + Fraction(r.choice([25, 50, 75, 20, 40, 60, 80, 10, 90]), 100)


# ---------------------------------------------------------------------------------------------
# Templates.  Each takes an RNG and returns a DemoProblem.
# ---------------------------------------------------------------------------------------------


def _shopping(r: Random) -> DemoProblem:
    """Two to four independent purchases, a total and maybe change: many INDEPENDENT pairs."""
    name, she, her = _person(r)
    n_items = r.choice([2, 3, 4, 4, 5])
    goods = r.sample(_GOODS, n_items)
    cents = r.random() < 0.35
    counts = [r.randint(2, 9) for _ in goods]
    prices = [_price(r, cents and r.random() < 0.7) for _ in goods]
    total = sum(c * p for c, p in zip(counts, prices))
    bills = [x for x in (20, 50, 100) if x > total]
    use_bill = bool(bills) and r.random() < 0.5
    bill = r.choice(bills) if use_bill else 0
    parts = [f"{_count(r, c)} {gs} for {_money(p)} each" for (g, gs), c, p in zip(goods, counts, prices)]
    listed = ", ".join(parts[:-1]) + f" and {parts[-1]}"
    if r.random() < 0.5:
        q = f"{name} buys {listed}."
    else:
        q = f"At the school fair, {name} buys {listed}."
    q += f" {she.capitalize()} pays with a ${bill} bill. How much change does {she} get?" if use_bill else f" How much does {she} spend in all?"
    s = _Solution(r)
    costs = [s.calc(f"The {gs} cost {{}}.", f"{c}*{_fmt(p)}", money=True) for (g, gs), c, p in zip(goods, counts, prices)]
    t = s.calc(f"{name} spends {{}} in total.", "+".join(_fmt(x) for x in costs), money=True)
    if use_bill:
        t = s.calc(f"{she.capitalize()} gets {{}} in change.", f"{bill}-{_fmt(t)}", money=True)
    return s.done(q, _fmt(t), "shopping")


def _trip(r: Random) -> DemoProblem:
    """A class trip: several per-person costs computed independently, then combined."""
    kids, adults = r.randint(12, 35), r.randint(2, 6)
    bus = r.choice(range(150, 600, 25))
    kid_ticket, adult_ticket = r.randint(4, 15), r.randint(8, 25)
    lunch = r.randint(3, 9)
    place = r.choice(["the zoo", "a science museum", "an aquarium", "a farm", "the planetarium"])
    q = (
        f"A class of {kids} students and {adults} teachers goes to {place}. The bus costs ${bus}. Student tickets cost "
        f"${kid_ticket} each, teacher tickets cost ${adult_ticket} each, and every person gets a ${lunch} lunch. "
        "How much does the trip cost in total?"
    )
    s = _Solution(r)
    st = s.calc("Student tickets cost {}.", f"{kids}*{kid_ticket}", money=True)
    te = s.calc("Teacher tickets cost {}.", f"{adults}*{adult_ticket}", money=True)
    people = s.calc("There are {} people.", f"{kids}+{adults}")
    lunches = s.calc("Lunches cost {}.", f"{_fmt(people)}*{lunch}", money=True)
    tot = s.calc("The trip costs {} in total.", f"{bus}+{_fmt(st)}+{_fmt(te)}+{_fmt(lunches)}", money=True)
    return s.done(q, _fmt(tot), "trip")


def _bake_sale(r: Random) -> DemoProblem:
    """Revenue from several products computed independently, then profit after costs."""
    name, she, her = _person(r)
    products = r.sample(["cookies", "brownies", "cupcakes", "muffins", "lemon bars", "pretzels"], r.choice([3, 4, 4, 5]))
    sold = [r.randint(8, 40) for _ in products]
    prices = [_price(r, r.random() < 0.3, 1, 4) for _ in products]
    supplies = r.randint(10, 60)
    parts = [f"{n} {p} for {_money(c)} each" for p, n, c in zip(products, sold, prices)]
    q = (
        f"At a bake sale, {name} sells " + ", ".join(parts[:-1]) + f" and {parts[-1]}. "
        f"{she.capitalize()} spent ${supplies} on supplies. How much profit does {she} make?"
    )
    s = _Solution(r)
    money = [s.calc(f"The {p} bring in {{}}.", f"{n}*{_fmt(c)}", money=True) for p, n, c in zip(products, sold, prices)]
    tot = s.calc(f"{she.capitalize()} takes in {{}}.", "+".join(_fmt(m) for m in money), money=True)
    profit = s.calc(f"{her.capitalize()} profit is {{}}.", f"{_fmt(tot)}-{supplies}", money=True)
    return s.done(q, _fmt(profit), "bake_sale")


def _compare(r: Random) -> DemoProblem:
    """Parallel chains (one per person) joined by a final difference or total."""
    unit, verb, base = r.choice([("pages", "reads", "read"), ("laps", "swims", "swim"), ("miles", "bikes", "bike"), ("push-ups", "does", "do")])
    people = r.sample(_NAMES, 3 if r.random() < 0.4 else 2)
    plans = [(r.randint(8, 30), r.randint(3, 7), r.randint(5, 40)) for _ in people]
    totals = [a * d + x for a, d, x in plans]
    if len(people) == 2:
        if totals[0] == totals[1]:
            plans[0] = (plans[0][0], plans[0][1], plans[0][2] + 1)
            totals[0] += 1
        if totals[0] < totals[1]:
            people, plans = people[::-1], plans[::-1]
    q = " ".join(
        f"{n} {verb} {a} {unit} a day for {_count(r, d)} days and then {x} {unit} on the weekend."
        for (n, _, _), (a, d, x) in zip(people, plans)
    )
    if len(people) == 2:
        q += f" How many more {unit} does {people[0][0]} {base} than {people[1][0]}?"
    else:
        q += f" How many {unit} do the three of them {base} altogether?"
    s = _Solution(r)
    done = []
    for (n, _, _), (a, d, x) in zip(people, plans):
        week = s.calc(f"On weekdays {n} {verb} {{}} {unit}.", f"{a}*{d}")
        done.append(s.calc(f"In all {n} {verb} {{}} {unit}.", f"{_fmt(week)}+{x}"))
    if len(people) == 2:
        out = s.calc(f"{people[0][0]} {verb} {{}} more {unit}.", f"{_fmt(done[0])}-{_fmt(done[1])}")
    else:
        out = s.calc(f"Together they {base} {{}} {unit}.", "+".join(_fmt(t) for t in done))
    return s.done(q, _fmt(out), "compare")


def _garden_beds(r: Random) -> DemoProblem:
    """Several rectangles measured independently, then summed and priced."""
    name, she, her = _person(r)
    n = r.choice([2, 3])
    dims = [(r.randint(2, 12), r.randint(2, 9)) for _ in range(n)]
    price = r.randint(2, 6)
    beds = ", ".join(f"{l} feet by {w} feet" for l, w in dims[:-1]) + f" and {dims[-1][0]} feet by {dims[-1][1]} feet"
    q = f"{name} has {_count(r, n, 0.5)} rectangular garden beds measuring {beds}. Mulch costs ${price} per square foot. How much will it cost to cover all the beds?"
    s = _Solution(r)
    areas = [s.calc(f"Bed {k + 1} is {{}} square feet.", f"{l}*{w}") for k, (l, w) in enumerate(dims)]
    tot = s.calc("Together they are {} square feet.", "+".join(_fmt(a) for a in areas))
    cost = s.calc("The mulch costs {}.", f"{_fmt(tot)}*{price}", money=True)
    return s.done(q, _fmt(cost), "garden_beds")


def _wages(r: Random) -> DemoProblem:
    name, she, her = _person(r)
    w = _price(r, r.random() < 0.25, 8, 25)
    h1 = r.randint(2, 6) * 2
    h3 = r.randint(2, 9)
    half = r.random() < 0.5
    rel = "half as many hours" if half else "twice as many hours"
    q = (
        f"{name} earns {_money(w)} an hour at {her} job. {she.capitalize()} works {h1} hours on Monday, {rel} on Tuesday, "
        f"and {h3} hours on Wednesday. How much does {she} earn for the three days?"
    )
    s = _Solution(r)
    h2 = s.calc(f"On Tuesday {she} works {{}} hours.", f"{h1}/2" if half else f"{h1}*2")
    tot = s.calc(f"{she.capitalize()} works {{}} hours in all.", f"{h1}+{_fmt(h2)}+{h3}")
    pay = s.calc(f"{she.capitalize()} earns {{}}.", f"{_fmt(tot)}*{_fmt(w)}", money=True)
    return s.done(q, _fmt(pay), "wages")


def _discount(r: Random) -> DemoProblem:
    """BRIDGING: a percent becomes a fraction of the price through an unstated 100."""
    name, she, her = _person(r)
    item = r.choice(_BIG_ITEMS)
    rate = r.choice([10, 15, 20, 25, 30, 40, 50])
    price = r.choice([x for x in range(20, 400, 4) if x != 100])
    tax = r.random() < 0.3
    if tax:
        rate = r.choice([5, 6, 8, 10])
        q = f"A {item} costs {_money(price)} before tax. The sales tax is {rate}%. How much does {name} pay for the {item} including tax?"
    else:
        q = r.choice(
            [
                f"A {item} costs {_money(price)}. The store is having a {rate}% off sale. How much does {name} pay for the {item}?",
                f"{name} wants a {item} that normally costs {_money(price)}. This week it is {rate}% off. What is the sale price?",
            ]
        )
    s = _Solution(r)
    expr = r.choice([f"{price}*{rate}/100", f"{rate}/100*{price}", f"{price}*{_fmt(Fraction(rate, 100))}"])
    if tax:
        t = s.calc("The tax adds {} to the cost.", expr, money=True)
        out = s.calc(f"{name} pays {{}} in total.", f"{price}+{_fmt(t)}", money=True)
    else:
        d = s.calc(r.choice(["The discount is {}.", "The discount takes {} off the cost."]), expr, money=True)
        out = s.calc(f"After the discount, {she} pays {{}}.", f"{price}-{_fmt(d)}", money=True)
    return s.done(q, _fmt(out), "discount")


def _percent_points(r: Random) -> DemoProblem:
    """Percents added as percents (no 100 needed); the "the rest" variant needs the 100."""
    s1, s2, s3 = r.sample(_SPORTS, 3)
    a, b = r.randint(5, 30), r.randint(3, 20)
    s = _Solution(r)
    if r.random() < 0.25:
        q = f"In a survey, {a}% of the students chose {s1}, {b}% chose {s2}, and the rest chose {s3}. What percent of the students chose {s3}?"
        both = s.calc(f"{{}}% chose {s1} or {s2}.", f"{a}+{b}")
        rest = s.calc(f"So {{}}% chose {s3}.", f"100-{_fmt(both)}")
        return s.done(q, _fmt(rest), "percent_points")
    q = f"In a survey, {a}% of the students chose {s1}. {b}% more of the students chose {s2} than {s1}. What percent of the students chose {s1} or {s2}?"
    c = s.calc(f"{{}}% chose {s2}.", f"{a}+{b}")
    d = s.calc(f"{{}}% chose {s1} or {s2}.", f"{a}+{_fmt(c)}")
    return s.done(q, _fmt(d), "percent_points")


def _speed_distance(r: Random) -> DemoProblem:
    name, she, her = _person(r)
    v1, v2 = r.choice(range(30, 75, 5)), r.choice(range(30, 75, 5))
    t1 = r.choice([Fraction(x) for x in (1, 2, 3, 4)] + [Fraction(3, 2), Fraction(5, 2)])
    t2 = Fraction(r.randint(1, 4))
    mode = r.choice(["drives", "rides the bus", "travels by train"])
    q = (
        f"{name} {mode} at {v1} miles per hour for {_fmt(t1)} hours, then at {v2} miles per hour for {_fmt(t2)} hours. "
        + r.choice([f"How many miles does {she} travel in total?", f"How far does {she} go altogether, in miles?"])
    )
    s = _Solution(r)
    d1 = s.calc("First {} miles.", f"{v1}*{_fmt(t1)}")
    d2 = s.calc("Then {} miles.", f"{v2}*{_fmt(t2)}")
    tot = s.calc("In total {} miles.", f"{_fmt(d1)}+{_fmt(d2)}")
    return s.done(q, _fmt(tot), "speed")


def _time_convert(r: Random) -> DemoProblem:
    """Minutes and hours: converting needs the unstated 60; the summing twin needs nothing."""
    name, she, her = _person(r)
    act = r.choice(_ACTIVITIES)
    s = _Solution(r)
    kind = r.random()
    if kind < 0.3:
        m = r.choice([x for x in range(15, 95, 5) if x != 60])  # a stated 60 would hide the conversion
        d = r.choice([x for x in range(2, 15) if (m * x) % 15 == 0] or [12])
        q = f"{name} {act} for {m} minutes every day. How many hours does {she} spend on it in {_count(r, d)} days?"
        tot = s.calc("That is {} minutes.", f"{m}*{d}")
        hrs = s.calc("In hours that is {}.", f"{_fmt(tot)}/60")
        return s.done(q, _fmt(hrs), "time_convert")
    if kind < 0.5:
        h = r.randint(2, 5)
        d = r.randint(2, 9)
        q = f"{name} {act} for {h} hours every day. How many minutes does {she} spend on it in {_count(r, d)} days?"
        if r.random() < 0.5:
            per = s.calc("Each day is {} minutes.", f"{h}*60")
            tot = s.calc("In all {} minutes.", f"{_fmt(per)}*{d}")
        else:
            hrs = s.calc("That is {} hours.", f"{h}*{d}")
            tot = s.calc("That is {} minutes.", f"{_fmt(hrs)}*60")
        return s.done(q, _fmt(tot), "time_convert")
    if kind < 0.6:
        h, m, watched = r.randint(1, 3), r.choice(range(5, 60, 5)), r.choice(range(10, 60, 5))
        q = f"A movie lasts {h} hours and {m} minutes. {name} has watched {watched} minutes of it. How many minutes are left?"
        full = s.calc(f"{h} hours is {{}} minutes.", f"{h}*60")
        total = s.calc("The movie is {} minutes long.", f"{_fmt(full)}+{m}")
        left = s.calc("There are {} minutes left.", f"{_fmt(total)}-{watched}")
        return s.done(q, _fmt(left), "time_convert")
    # Twin: minutes summed as minutes.
    m1, m2, d = r.choice(range(10, 65, 5)), r.choice(range(10, 65, 5)), r.randint(2, 9)
    q = f"{name} {act} for {m1} minutes every morning and {m2} minutes every evening. How many minutes does {she} spend on it in {_count(r, d)} days?"
    day = s.calc("Each day is {} minutes.", f"{m1}+{m2}")
    tot = s.calc("In all {} minutes.", f"{_fmt(day)}*{d}")
    return s.done(q, _fmt(tot), "time_sum")


def _length_convert(r: Random) -> DemoProblem:
    """Feet to inches (12) and meters to centimeters (100) are unstated; the inches twin is not."""
    name, she, her = _person(r)
    s = _Solution(r)
    kind = r.random()
    if kind < 0.35:
        f = r.choice([x for x in range(2, 11) if x != 12])
        c = r.choice([x for x in (2, 3, 4, 6, 8, 9, 16, 18, 24) if (f * 12) % x == 0])
        q = f"{name} has a board that is {f} feet long. {she.capitalize()} cuts it into pieces that are {c} inches long. How many pieces does {she} get?"
        inches = s.calc("In inches the board is {} long.", f"{f}*12")
        n = s.calc(f"{she.capitalize()} gets {{}} pieces.", f"{_fmt(inches)}/{c}")
        return s.done(q, _fmt(n), "length_convert")
    if kind < 0.55:
        m = r.randint(2, 9)
        c = r.choice(range(15, 95, 5))
        q = f"A rope is {m} meters long. {name} cuts off {c} centimeters. How many centimeters of rope are left?"
        cm = s.calc("The rope is {} centimeters long.", f"{m}*100")
        left = s.calc("There are {} centimeters left.", f"{_fmt(cm)}-{c}")
        return s.done(q, _fmt(left), "length_convert")
    n = r.randint(3, 9)
    piece = r.randint(4, 15)
    used = r.randint(2, n - 1)
    q = f"A ribbon is {n * piece} inches long. {name} cuts it into {_count(r, n)} equal pieces and uses {_count(r, used)} of them. How many inches of ribbon did {she} use?"
    each = s.calc("Each piece is {} inches.", f"{n * piece}/{n}")
    u = s.calc(f"{she.capitalize()} used {{}} inches.", f"{_fmt(each)}*{used}")
    return s.done(q, _fmt(u), "length_same_unit")


def _stated_multiplier(r: Random) -> DemoProblem:
    """Looks like a conversion, but "dozen" and "pairs" state their 12 and 2."""
    name, she, her = _person(r)
    s = _Solution(r)
    if r.random() < 0.6:
        d = r.randint(2, 6)
        u, g = r.randint(3, 9), r.randint(2, 6)
        food = r.choice(["a cake", "muffins", "pancakes", "cookies"])
        q = f"{name} buys {_count(r, d)} dozen eggs. {she.capitalize()} uses {u} eggs to make {food} and {g} eggs for breakfast. How many eggs are left?"
        eggs = s.calc(f"{she.capitalize()} buys {{}} eggs.", f"{d}*12")
        used = s.calc(f"{she.capitalize()} uses {{}} eggs.", f"{u}+{g}")
        left = s.calc("There are {} eggs left.", f"{_fmt(eggs)}-{_fmt(used)}")
        return s.done(q, _fmt(left), "dozen")
    p, lost = r.randint(4, 15), r.randint(1, 5)
    thing = r.choice(["socks", "gloves", "shoes"])
    q = f"{name} has {p} pairs of {thing}. {she.capitalize()} loses {lost} {thing}. How many {thing} does {she} have now?"
    tot = s.calc(f"{she.capitalize()} had {{}} {thing}.", f"{p}*2")
    now = s.calc(f"Now {she} has {{}} {thing}.", f"{_fmt(tot)}-{lost}")
    return s.done(q, _fmt(now), "pairs")


def _weeks(r: Random) -> DemoProblem:
    """Weeks to days needs the unstated 7; "N days a week" states it."""
    name, she, her = _person(r)
    s = _Solution(r)
    k = r.randint(2, 6)
    w = r.randint(2, 6)
    thing = r.choice(["walks", "bikes", "runs"])
    if r.random() < 0.5:
        q = f"{name} {thing} {k} miles every day. How many miles does {she} cover in {_count(r, w)} weeks?"
        days = s.calc("In days that is {}.", f"{w}*7")
        miles = s.calc(f"{she.capitalize()} covers {{}} miles.", f"{_fmt(days)}*{k}")
        return s.done(q, _fmt(miles), "weeks_convert")
    dd = r.randint(3, 6)
    q = f"{name} {thing} {k} miles a day, {_count(r, dd)} days a week. How many miles does {she} cover in {_count(r, w)} weeks?"
    week = s.calc("Each week is {} miles.", f"{k}*{dd}")
    miles = s.calc(f"{she.capitalize()} covers {{}} miles.", f"{_fmt(week)}*{w}")
    return s.done(q, _fmt(miles), "weeks_stated")


def _weight(r: Random) -> DemoProblem:
    """Kilograms to grams needs the unstated 1000; the grams twin does not."""
    name, she, her = _person(r)
    s = _Solution(r)
    g = r.choice([125, 200, 250, 500])
    if r.random() < 0.5:
        k = r.randint(2, 5)
        q = f"A bag holds {k} kilograms of flour. Each loaf of bread needs {g} grams of flour. How many loaves can {name} bake with the bag?"
        grams = s.calc("In grams the bag holds {}.", f"{k}*1000")
        n = s.calc(f"{she.capitalize()} can bake {{}} loaves.", f"{_fmt(grams)}/{g}")
        return s.done(q, _fmt(n), "weight_convert")
    n = r.randint(3, 12)
    q = f"A bag holds {g * n} grams of flour. Each loaf of bread needs {g} grams of flour. How many loaves can {name} bake with the bag?"
    loaves = s.calc(f"{she.capitalize()} can bake {{}} loaves.", f"{g * n}/{g}")
    return s.done(q, _fmt(loaves), "weight_same_unit")


def _cents(r: Random) -> DemoProblem:
    """Cents to dollars needs the unstated 100."""
    name, she, her = _person(r)
    n, c = r.randint(3, 12), r.choice(range(15, 95, 5))
    thing = r.choice(["stickers", "pencils", "erasers", "stamps"])
    q = f"{name} buys {n} {thing} that cost {c} cents each. How many dollars does {she} spend?"
    s = _Solution(r)
    tot = s.calc(f"{she.capitalize()} spends {{}} cents.", f"{n}*{c}")
    dollars = s.calc("In dollars that is {}.", f"{_fmt(tot)}/100")
    return s.done(q, _fmt(dollars), "cents")


def _rectangle_area(r: Random) -> DemoProblem:
    name, she, her = _person(r)
    l, w = r.randint(8, 25), r.randint(6, 20)
    c = _price(r, r.random() < 0.3, 2, 9)
    q = f"{name}'s living room is {l} feet long and {w} feet wide. Carpet costs {_money(c)} per square foot. How much will it cost to carpet the room?"
    s = _Solution(r)
    area = s.calc("The room is {} square feet.", f"{l}*{w}")
    cost = s.calc("The carpet costs {}.", f"{_fmt(area)}*{_fmt(c)}", money=True)
    return s.done(q, _fmt(cost), "area")


def _fence(r: Random) -> DemoProblem:
    """Perimeter: "*2" (or "*4" for a square) is an unstated formula constant; l+w+l+w is not."""
    name, she, her = _person(r)
    s = _Solution(r)
    c = r.choice([x for x in range(3, 16) if x != 4])  # keep the square's "*4" unstated
    if r.random() < 0.7:
        l, w = r.randint(10, 40), r.randint(5, 30)
        q = f"A rectangular garden is {l} meters long and {w} meters wide. Fencing costs ${c} per meter. How much will it cost {name} to fence the garden?"
        if r.random() < 0.35:
            half = s.calc("Half the perimeter is {} meters.", f"{l}+{w}")
            per = s.calc("The perimeter is {} meters.", f"{_fmt(half)}*2")
        else:
            per = s.calc("The perimeter is {} meters.", f"{l}+{w}+{l}+{w}")
    else:
        side = r.randint(5, 30)
        q = f"A square garden has sides that are {side} meters long. Fencing costs ${c} per meter. How much will it cost {name} to fence the garden?"
        per = s.calc("The perimeter is {} meters.", f"{side}*4" if r.random() < 0.35 else f"{side}+{side}+{side}+{side}")
    cost = s.calc("The fence costs {}.", f"{_fmt(per)}*{c}", money=True)
    return s.done(q, _fmt(cost), "fence")


def _triangle_area(r: Random) -> DemoProblem:
    """Triangle area halves the product through an unstated 2."""
    b, h = r.randint(3, 20), r.randint(3, 20)
    thing = r.choice(["triangular sail", "triangular flag", "triangular garden bed", "triangle"])
    q = f"A {thing} has a base of {b} feet and a height of {h} feet. What is its area in square feet?"
    s = _Solution(r)
    prod = s.calc("Base times height is {}.", f"{b}*{h}")
    area = s.calc("The area is {} square feet.", f"{_fmt(prod)}/2")
    return s.done(q, _fmt(area), "triangle_area")


def _box_volume(r: Random) -> DemoProblem:
    name, she, her = _person(r)
    l, w, h = r.randint(2, 10), r.randint(2, 8), r.randint(1, 5)
    c = _price(r, r.random() < 0.3, 2, 9)
    q = f"{name} is filling a sandbox that is {l} feet long, {w} feet wide and {h} feet deep. Sand costs {_money(c)} per cubic foot. How much does the sand cost?"
    s = _Solution(r)
    base = s.calc("The base is {} square feet.", f"{l}*{w}")
    vol = s.calc("The sandbox holds {} cubic feet.", f"{_fmt(base)}*{h}")
    cost = s.calc("The sand costs {}.", f"{_fmt(vol)}*{_fmt(c)}", money=True)
    return s.done(q, _fmt(cost), "volume")


_TRIPLES = [(3, 4), (6, 8), (5, 12), (9, 12), (8, 15), (12, 16), (7, 24), (15, 20), (10, 24), (20, 21)]


def _hypotenuse(r: Random) -> DemoProblem:
    """RADICAL unless the legs form a Pythagorean triple."""
    name, she, her = _person(r)
    if r.random() < 0.45:
        a, b = r.choice(_TRIPLES)
        if r.random() < 0.5:
            a, b = b, a
    else:
        a, b = r.randint(1, 12), r.randint(2, 12)
        while math.isqrt(a * a + b * b) ** 2 == a * a + b * b:
            b += 1
    kind = r.randrange(3)
    if kind == 0:
        q = f"A right triangle has legs of length {a} and {b}. What is the length of the hypotenuse?"
    elif kind == 1:
        q = f"The foot of a ladder is {a} feet from a wall, and the top of the ladder touches the wall {b} feet above the ground. How long is the ladder?"
    else:
        q = f"A rectangle is {a} inches wide and {b} inches tall. How long is its diagonal?"
    if r.random() < 0.3:
        q += r.choice([" Give the exact length.", " Express your answer in simplest form."])
    s = _Solution(r)
    sa = s.calc("The first leg squared is {}.", f"{a}*{a}")
    sb = s.calc("The second leg squared is {}.", f"{b}*{b}")
    c2 = s.calc("Their sum is {}.", f"{_fmt(sa)}+{_fmt(sb)}")
    ans = _sqrt_latex(int(c2), r)
    s.say(f"The length is the square root of {_fmt(c2)}, which is {ans}.")
    return s.done(q, ans, "hypotenuse")


def _square_side(r: Random) -> DemoProblem:
    """RADICAL unless the area is a perfect square."""
    n = r.randint(2, 14) ** 2 if r.random() < 0.5 else r.choice([x for x in range(8, 200) if math.isqrt(x) ** 2 != x])
    kind = r.randrange(3)
    if kind == 0:
        q = f"A square has an area of {n} square units. What is the exact length of one side?"
    elif kind == 1:
        q = f"Simplify \\sqrt{{{n}}}."
    else:
        q = f"What is the square root of {n} in simplest form?"
    s = _Solution(r)
    ans = _sqrt_latex(n, r)
    s.say(f"The square root of {n} is {ans}.")
    return s.done(q, ans, "square_root")


def _circle(r: Random) -> DemoProblem:
    """EXPRESSION (in terms of pi) or DECIMAL (with 3.14 stated)."""
    rad = r.randint(2, 12)
    thing = r.choice(["circular rug", "round table", "circular pond", "circle"])
    s = _Solution(r)
    sq = s.calc("The radius squared is {}.", f"{rad}*{rad}")
    if r.random() < 0.55:
        q = f"A {thing} has a radius of {rad} feet. What is its area? Express your answer in terms of \u03c0."
        ans = rf"{_fmt(sq)}\pi"
        s.say(f"The area is {_fmt(sq)}\u03c0 square feet.")
        return s.done(q, ans, "circle_pi")
    q = f"A {thing} has a radius of {rad} feet. What is its area in square feet? Use 3.14 for \u03c0."
    area = s.calc("The area is {} square feet.", f"{_fmt(sq)}*3.14")
    return s.done(q, _fmt(area), "circle_decimal")


def _linear_equation(r: Random) -> DemoProblem:
    """INTEGER or FRACTION, depending on divisibility."""
    name, she, her = _person(r)
    a = r.randint(2, 9)
    if r.random() < 0.6:
        x = Fraction(r.randint(-5, 15))
    else:
        x = Fraction(r.randint(1, 30), a)
    b = r.randint(1, 20)
    c = a * x + b  # an integer either way: x is a whole number or a multiple of 1/a
    ci = int(c)
    if r.random() < 0.5:
        q = f"Solve for x: {a}x + {b} = {ci}."
    else:
        q = f"{name} thinks of a number, multiplies it by {a} and then adds {b}. The result is {ci}. What is the number?"
    if x.denominator != 1 and r.random() < 0.4:
        q += " Express your answer as a common fraction."
    s = _Solution(r)
    d = s.calc("Subtracting gives {}.", f"{ci}-{b}")
    s.calc("Dividing gives {}.", f"{_fmt(d)}/{a}")
    return s.done(q, _frac_latex(x, r), "linear")


def _ages(r: Random) -> DemoProblem:
    (n1, _, _), (n2, _, _) = r.sample(_NAMES, 2)
    s = _Solution(r)
    if r.random() < 0.45:
        # Rearranging "x + (x + d) = s" halves the difference: an unstated 2.
        young = r.randint(5, 40)
        d = r.randint(3, 15)  # a stated 2 would hide the halving
        total = 2 * young + d
        q = f"{n1} is {d} years older than {n2}. The sum of their ages is {total}. How old is {n2}?"
        twice = s.calc(f"Twice {n2}'s age is {{}}.", f"{total}-{d}")
        age = s.calc(f"{n2} is {{}} years old.", f"{_fmt(twice)}/2")
        return s.done(q, _fmt(age), "ages_rearranged")
    (n3, _, _) = _person(r, exclude=(n1, n2))
    a, d = r.randint(4, 20), r.randint(1, 6)
    q = f"{n1} is {a} years old. {n2} is twice as old as {n1}, and {n3} is {d} years younger than {n2}. What is the sum of their ages?"
    b = s.calc(f"{n2} is {{}} years old.", f"{a}*2")
    c = s.calc(f"{n3} is {{}} years old.", f"{_fmt(b)}-{d}")
    t = s.calc("Together they are {} years old.", f"{a}+{_fmt(b)}+{_fmt(c)}")
    return s.done(q, _fmt(t), "ages")


def _consecutive(r: Random) -> DemoProblem:
    """Middle = sum / three (stated), then +1 or -1 (unstated)."""
    m = r.randint(5, 60)
    largest = r.random() < 0.5
    q = f"The sum of three consecutive integers is {3 * m}. What is the {'largest' if largest else 'smallest'} of these integers?"
    s = _Solution(r)
    mid = s.calc("The middle integer is {}.", f"{3 * m}/3")
    out = s.calc(f"The {'largest' if largest else 'smallest'} is {{}}.", f"{_fmt(mid)}+1" if largest else f"{_fmt(mid)}-1")
    return s.done(q, _fmt(out), "consecutive")


def _expression(r: Random) -> DemoProblem:
    """EXPRESSION answers (free variables).  Each setting also comes as "... if x = 5, what is
    ..." (an INTEGER), and "simplify" sometimes collapses to a number, so the words of the setting
    do not give the type away."""
    name, she, her = _person(r)
    s = _Solution(r)
    kind = r.randrange(4)
    value_at = r.random() < 0.3  # the INTEGER twin: same setting, a number substituted
    v = r.randint(2, 12)
    if kind == 0:
        a = r.randint(1, 12)
        q = f"A rectangle has a length of x + {a} and a width of x. "
        if value_at:
            q += f"If x = {v}, what is its perimeter?"
            length = s.calc("The length is {}.", f"{v}+{a}")
            ans = _fmt(s.calc("The perimeter is {}.", f"{_fmt(length)}+{v}+{_fmt(length)}+{v}"))
        else:
            q += r.choice(["Write an expression for its perimeter.", "Find its perimeter in terms of x."])
            ans = f"4x + {2 * a}" if r.random() < 0.5 else f"4x+{2 * a}"
            s.say(f"The perimeter is 2(x + {a}) + 2x = {ans}.")
    elif kind == 1:
        a = r.randint(1, 9)
        (other, _, _) = _person(r, exclude=(name,))
        q = f"{name} has n marbles. {other} has {a} more than twice as many marbles as {name}. "
        if value_at:
            q += f"If n = {v}, how many marbles do they have together?"
            twice = s.calc(f"{other} has {{}} marbles before the extra ones.", f"{v}*2")
            o = s.calc(f"{other} has {{}} marbles.", f"{_fmt(twice)}+{a}")
            ans = _fmt(s.calc("Together they have {} marbles.", f"{v}+{_fmt(o)}"))
        else:
            q += r.choice(["Write an expression for the number of marbles they have together.", "How many marbles do they have together, in terms of n?"])
            ans = f"3n + {a}"
            s.say(f"{other} has 2n + {a}, so together they have n + 2n + {a} = {ans}.")
    elif kind == 2:
        p, a = r.randint(2, 7), r.randint(1, 9)
        qq = p if r.random() < 0.15 else r.choice([w for w in range(1, 7) if w != p])
        coef = p - qq
        if value_at:
            q = f"Evaluate {p}(x + {a}) - {qq}x when x = {v}."
            inner = s.calc("The bracket is {}.", f"{v}+{a}")
            first = s.calc("The first part is {}.", f"{p}*{_fmt(inner)}")
            second = s.calc("The second part is {}.", f"{qq}*{v}")
            ans = _fmt(s.calc("The value is {}.", f"{_fmt(first)}-{_fmt(second)}"))
        else:
            q = f"Simplify the expression {p}(x + {a}) - {qq}x." if r.random() < 0.5 else f"Simplify {p}(x + {a}) - {qq}x."
            term = "x" if coef == 1 else "-x" if coef == -1 else f"{coef}x"
            ans = str(p * a) if coef == 0 else f"{term} + {p * a}"
            s.say(f"Expanding gives {p}x + {p * a} - {qq}x = {ans}.")
    else:
        a, b = r.randint(2, 9), r.randint(1, 4)
        var = r.choice("mdk")
        q = f"A taxi charges ${a} plus ${b} for each mile. "
        if value_at:
            q += f"A ride is {var} miles long. If {var} = {v}, how much does the ride cost, in dollars?"
            per = s.calc("The miles cost {}.", f"{b}*{v}", money=True)
            ans = _fmt(s.calc("The ride costs {}.", f"{a}+{_fmt(per)}", money=True))
        else:
            q += f"Write an expression for the cost, in dollars, of a ride of {var} miles."
            ans = f"{a} + {b}{var}"
            s.say(f"The cost is {ans}.")
    return s.done(q, ans, "expression_value" if value_at else "expression")


def _evaluate(r: Random) -> DemoProblem:
    """An expression evaluated at a point: INTEGER, sharing words with the EXPRESSION problems."""
    a, b, c, v = r.randint(2, 6), r.randint(1, 9), r.randint(1, 20), r.randint(2, 6)
    q = r.choice(
        [
            f"Evaluate the expression {a}x^2 + {b}x - {c} when x = {v}.",
            f"What is the value of {a}x^2 + {b}x - {c} if x = {v}?",
        ]
    )
    s = _Solution(r)
    p = s.calc("The first term is {}.", f"{a}*{v}*{v}")
    m = s.calc("The second term is {}.", f"{b}*{v}")
    t = s.calc("The value is {}.", f"{_fmt(p)}+{_fmt(m)}-{c}")
    return s.done(q, _fmt(t), "evaluate")


def _poly_text(s_: int, p_: int) -> str:
    """x^2 - s x + p = 0 with tidy signs."""
    out = "x^2"
    if s_:
        coef = -s_
        out += f" {'-' if coef < 0 else '+'} {'' if abs(coef) == 1 else abs(coef)}x"
    if p_:
        out += f" {'-' if p_ < 0 else '+'} {abs(p_)}"
    return out + " = 0"


def _set_answer(values: list[int], r: Random) -> str:
    vals = ", ".join(str(v) for v in values)
    style = r.random()
    if style < 0.5:
        return rf"\{{{vals}\}}"
    if style < 0.8:
        return vals
    return ", ".join(f"x = {v}" for v in values)


def _quadratic(r: Random) -> DemoProblem:
    """SET of roots; a double root, or asking for their sum or product, gives an INTEGER."""
    r1 = r.randint(-9, 9)
    r2 = r1 if r.random() < 0.12 else r.choice([v for v in range(-9, 10) if v != r1])
    eq = _poly_text(r1 + r2, r1 * r2)
    s = _Solution(r)
    kind = r.random()
    if kind < 0.2:
        q = f"What is the {'sum' if kind < 0.1 else 'product'} of the solutions of {eq}?"
        s.say(f"The equation factors as (x - {r1})(x - {r2}) = 0.".replace("- -", "+ "))
        ans = str(r1 + r2 if kind < 0.1 else r1 * r2)
        return s.done(q, ans, "quadratic_value")
    q = r.choice([f"Find all solutions of {eq}.", f"Solve {eq}. List all solutions.", f"What are the roots of {eq}?"])
    s.say(f"The equation factors as (x - {r1})(x - {r2}) = 0.".replace("- -", "+ "))
    roots = sorted({r1, r2})
    ans = str(roots[0]) if len(roots) == 1 else _set_answer(roots, r)
    return s.done(q, ans, "quadratic")


def _absolute_value(r: Random) -> DemoProblem:
    """Two solutions, each computed from stated numbers: a SET with an INDEPENDENT pair."""
    a, b = r.randint(-5, 20), r.randint(1, 12)
    s = _Solution(r)
    if r.random() < 0.6:
        sign = "-" if a >= 0 else "+"
        hi = s.calc("One solution is {}.", f"{a}+{b}")
        lo = s.calc("The other solution is {}.", f"{a}-{b}")
        if r.random() < 0.25:  # the INTEGER twin: the same two solutions, combined
            q = f"What is the sum of all solutions of |x {sign} {abs(a)}| = {b}?"
            total = s.calc("Their sum is {}.", f"{_fmt(hi)}+{_fmt(lo)}")
            return s.done(q, _fmt(total), "absolute_value_sum")
        q = r.choice([f"Solve |x {sign} {abs(a)}| = {b}. List all solutions.", f"Find all solutions of |x {sign} {abs(a)}| = {b}."])
        return s.done(q, _set_answer(sorted([int(lo), int(hi)]), r), "absolute_value")
    a = abs(a) + 15
    q = f"A thermostat is set to {a} degrees, and the room temperature always stays within {b} degrees of the setting. What are the lowest and highest possible temperatures?"
    lo = s.calc("The lowest is {} degrees.", f"{a}-{b}")
    hi = s.calc("The highest is {} degrees.", f"{a}+{b}")
    return s.done(q, f"({_fmt(lo)}, {_fmt(hi)})", "absolute_value")


def _multiples(r: Random) -> DemoProblem:
    """SET when several numbers qualify, INTEGER when one does or when the question counts."""
    k = r.randint(3, 9)
    # Plant one to three multiples among non-multiples; a single hit makes an INTEGER answer.
    n_hits = r.choice([1, 2, 2, 3, 3])
    hits = sorted(r.sample([m for m in range(10, 100) if m % k == 0], n_hits))
    others = r.sample([m for m in range(10, 100) if m % k], 6 - n_hits)
    nums = sorted(hits + others)
    listed = ", ".join(map(str, nums[:-1])) + f" and {nums[-1]}"
    s = _Solution(r)
    s.say(f"Checking each number for divisibility by {k}: {', '.join(map(str, hits))}.")
    if r.random() < 0.25:
        q = f"How many of the numbers {listed} are multiples of {k}?"
        return s.done(q, str(len(hits)), "multiples_count")
    q = r.choice([f"Which of the numbers {listed} are multiples of {k}?", f"List the numbers among {listed} that are divisible by {k}."])
    ans = str(hits[0]) if len(hits) == 1 else _set_answer(hits, r)
    return s.done(q, ans, "multiples")


def _inequality(r: Random) -> DemoProblem:
    """INTERVAL answers; "the largest integer" variant is an INTEGER from the same work."""
    a, b = r.randint(2, 7), r.randint(1, 15)
    c = b + r.randint(1, 40)
    s = _Solution(r)
    if r.random() < 0.3:
        lo_c, hi_c = r.randint(-10, 5), r.randint(6, 25)
        k = r.randint(1, 9)
        lo = s.calc("The lower end is {}.", f"{lo_c}-{k}")
        hi = s.calc("The upper end is {}.", f"{hi_c}-{k}")
        if r.random() < 0.3:  # the INTEGER twin: count the integers in the same interval
            q = r.choice(
                [
                    f"How many integers x satisfy {lo_c} \\le x + {k} \\le {hi_c}?",
                    f"The solutions of {lo_c} \\le x + {k} \\le {hi_c} form an interval. How many integers does that interval contain?",
                ]
            )
            s.say(f"The integers from {_fmt(lo)} to {_fmt(hi)} are {int(hi - lo) + 1} numbers.")
            return s.done(q, str(int(hi - lo) + 1), "interval_count")
        q = f"Solve {lo_c} \\le x + {k} \\le {hi_c}." + (" Give your answer in interval notation." if r.random() < 0.15 else "")
        return s.done(q, f"[{_fmt(lo)}, {_fmt(hi)}]", "interval_double")
    op = r.choice(["<", ">", "\\le", "\\ge"])
    d = s.calc("Subtracting gives {}.", f"{c}-{b}")
    bound = s.calc("Dividing gives {}.", f"{_fmt(d)}/{a}")
    if r.random() < 0.3:  # the INTEGER twin: the extreme integer of the same solution set
        if op in ("<", "\\le"):
            word = "largest"
            n = math.floor(bound) if (op == "\\le" or bound.denominator != 1) else int(bound) - 1
        else:
            word = "smallest"
            n = math.ceil(bound) if (op == "\\ge" or bound.denominator != 1) else int(bound) + 1
        q = f"What is the {word} integer x that satisfies the inequality {a}x + {b} {op} {c}?"
        s.say(f"So the {word} integer is {n}.")
        return s.done(q, str(n), "inequality_integer")
    q = r.choice([f"Solve the inequality {a}x + {b} {op} {c}.", f"Find all x with {a}x + {b} {op} {c}."])
    if r.random() < 0.15:
        q += " Express your answer in interval notation."
    e = _frac_latex(bound, r)
    ans = {
        "<": f"(-\\infty, {e})",
        "\\le": f"(-\\infty, {e}]",
        ">": f"({e}, \\infty)",
        "\\ge": f"[{e}, \\infty)",
    }[op]
    return s.done(q, ans, "inequality")


def _slices(n: int) -> str:
    return "1 slice" if n == 1 else f"{n} slices"


def _fraction_of(r: Random) -> DemoProblem:
    """A part of a whole: FRACTION; also asked as a count of slices (INTEGER) or as a decimal."""
    (n1, _, _), (n2, _, _) = r.sample(_NAMES, 2)
    n = r.choice([6, 8, 10, 12, 16])
    a = r.randint(1, n // 2 - 1)
    b = r.randint(1, n - a - 1)
    s = _Solution(r)
    left = r.random() < 0.4
    stem = f"A pizza is cut into {n} equal slices. {n1} eats {_slices(a)} and {n2} eats {_slices(b)}."
    eaten = s.calc("They ate {} slices.", f"{a}+{b}")
    if left:
        part = s.calc("There are {} slices left.", f"{n}-{_fmt(eaten)}")
    else:
        part = eaten
    what = "is left" if left else "did they eat"
    ask = r.random()
    if ask < 0.2:
        q = f"{stem} How many slices {'are left' if left else 'did they eat altogether'}?"
        return s.done(q, _fmt(part), "fraction_count")
    frac = s.calc("That is {} of the pizza.", f"{_fmt(part)}/{n}")
    if ask < 0.4 and n in (8, 10, 16):  # a terminating decimal
        q = f"{stem} What fraction of the pizza {what}? Express your answer as a decimal."
        return s.done(q, _fmt(frac), "fraction_decimal")
    q = f"{stem} What fraction of the pizza {what}?"
    if r.random() < 0.35:
        q += " Express your answer as a common fraction."
    return s.done(q, _frac_latex(frac, r), "fraction_of")


def _probability(r: Random) -> DemoProblem:
    """Probability as a fraction (sometimes a decimal); the same bag also asks for a count."""
    c1, c2, c3 = r.sample(_COLORS, 3)
    x, y, z = r.randint(2, 9), r.randint(2, 9), r.randint(2, 9)
    stem = f"A bag holds {x} {c1} marbles, {y} {c2} marbles and {z} {c3} marbles."
    s = _Solution(r)
    tot = s.calc("There are {} marbles.", f"{x}+{y}+{z}")
    if r.random() < 0.2:
        q = f"{stem} {r.choice(['Two', 'Three'])} more {c3} marbles are added, and one marble is drawn at random. How many marbles were in the bag before any were added?"
        return s.done(q, _fmt(tot), "marble_count")
    good = s.calc(f"{{}} of them are {c1} or {c2}.", f"{x}+{y}")
    p = s.calc("The probability is {}.", f"{_fmt(good)}/{_fmt(tot)}")
    q = f"{stem} One marble is drawn at random. What is the probability that it is {c1} or {c2}?"
    if _fmt(p).count("/") == 0 and r.random() < 0.4:
        q += " Express your answer as a decimal."
        return s.done(q, _fmt(p), "probability_decimal")
    return s.done(q, _frac_latex(p, r), "probability")


def _share(r: Random) -> DemoProblem:
    """p things shared by q people: FRACTION, or INTEGER when q divides p."""
    p, qn = r.randint(2, 15), r.randint(2, 8)
    thing = r.choice(["pizzas", "pies", "loaves of bread", "cakes"])
    q = f"{_count(r, p)} {thing} are shared equally among {_count(r, qn)} friends. How many {thing} does each friend get?"
    q = q[0].upper() + q[1:]
    s = _Solution(r)
    each = s.calc("Each friend gets {}.", f"{p}/{qn}")
    ans = _frac_latex(each, r)
    if each.denominator != 1 and each > 1 and r.random() < 0.25:
        whole = each.numerator // each.denominator
        rem = each - whole
        ans = rf"{whole}\frac{{{rem.numerator}}}{{{rem.denominator}}}"  # a mixed number
    return s.done(q, ans, "share")


def _simplify_fraction(r: Random) -> DemoProblem:
    d = r.randint(2, 12)
    k = r.randint(2, 9)
    num = k * r.randint(1, 12) if r.random() < 0.35 else r.randint(1, 40)
    den = k * d if r.random() >= 0.35 else k
    q = r.choice([f"Simplify {num}/{den}.", f"Write the fraction \\frac{{{num}}}{{{den}}} in lowest terms.", f"Reduce {num}/{den} to simplest form."])
    v = Fraction(num, den)
    s = _Solution(r)
    s.say(f"Dividing the top and bottom by their greatest common factor gives {_fmt(v) if v.denominator == 1 else f'{v.numerator}/{v.denominator}'}.")
    return s.done(q, _frac_latex(v, r), "simplify_fraction")


def _average(r: Random) -> DemoProblem:
    """The count is stated ("four tests") or left to be counted (an unstated constant)."""
    name, she, her = _person(r)
    k = r.choice([2, 4, 5, 4])
    scores = [r.randint(60, 100) for _ in range(k)]
    listed = ", ".join(map(str, scores[:-1])) + f" and {scores[-1]}"
    stated = r.random() < 0.6
    if stated:
        q = f"{name} scored {listed} on {her} {_WORDS[k]} tests. What is {her} average score?"
    else:
        q = f"{name}'s test scores this term were {listed}. What is {her} average score?"
    s = _Solution(r)
    tot = s.calc("The scores add up to {}.", "+".join(map(str, scores)))
    avg = s.calc("The average is {}.", f"{_fmt(tot)}/{k}")
    return s.done(q, _fmt(avg), "average_stated" if stated else "average_counted")


def _farm(r: Random) -> DemoProblem:
    a, b, sold = r.randint(5, 30), r.randint(2, 15), r.randint(2, 10)
    q = f"A farm has {a} cows. There are {b} more pigs than cows, and twice as many chickens as pigs. The farmer sells {sold} chickens. How many animals are left on the farm?"
    s = _Solution(r)
    pigs = s.calc("There are {} pigs.", f"{a}+{b}")
    hens = s.calc("There are {} chickens.", f"{_fmt(pigs)}*2")
    kept = s.calc("After the sale there are {} chickens.", f"{_fmt(hens)}-{sold}")
    tot = s.calc("There are {} animals left.", f"{a}+{_fmt(pigs)}+{_fmt(kept)}")
    return s.done(q, _fmt(tot), "farm")


def _hall(r: Random) -> DemoProblem:
    rows, per, seated, more = r.randint(5, 20), r.randint(6, 15), r.randint(10, 40), r.randint(3, 20)
    seated = min(seated, rows * per - more - 1)
    q = f"A hall has {rows} rows of {per} chairs. {seated} people are sitting down, and then {more} more people arrive and sit down. How many chairs are still empty?"
    s = _Solution(r)
    chairs = s.calc("There are {} chairs.", f"{rows}*{per}")
    people = s.calc("There are {} people seated.", f"{seated}+{more}")
    empty = s.calc("There are {} empty chairs.", f"{_fmt(chairs)}-{_fmt(people)}")
    return s.done(q, _fmt(empty), "hall")


def _factory(r: Random) -> DemoProblem:
    u, h, d, f = r.randint(10, 60), r.randint(4, 10), r.randint(2, 7), r.randint(1, 9)
    q = f"A machine makes {u} toys an hour and runs {h} hours a day. Each day, {f} of the toys are defective. How many good toys does it make in {_count(r, d)} days?"
    s = _Solution(r)
    day = s.calc("It makes {} toys a day.", f"{u}*{h}")
    tot = s.calc("It makes {} toys in all.", f"{_fmt(day)}*{d}")
    bad = s.calc("{} toys are defective.", f"{f}*{d}")
    good = s.calc("There are {} good toys.", f"{_fmt(tot)}-{_fmt(bad)}")
    return s.done(q, _fmt(good), "factory")


def _running(r: Random) -> DemoProblem:
    """Decimal distances and prices: DECIMAL (sometimes INTEGER when the tenths cancel)."""
    name, she, her = _person(r)
    s = _Solution(r)
    if r.random() < 0.5:
        x = Fraction(r.randint(10, 60), 10)
        d = r.randint(2, 6)
        y = Fraction(r.randint(10, 90), 10)
        q = f"{name} runs {_fmt(x)} kilometers on each of {_count(r, d)} days, and {_fmt(y)} kilometers on Sunday. How many kilometers does {she} run in total?"
        part = s.calc("On those days {} kilometers.", f"{_fmt(x)}*{d}")
        tot = s.calc("In total {} kilometers.", f"{_fmt(part)}+{_fmt(y)}")
        return s.done(q, _fmt(tot), "running")
    g = r.randint(5, 15)
    p = _price(r, True, 2, 4)
    q = f"{name} buys {g} gallons of gas at {_money(p)} per gallon. How much does {she} pay?"
    cost = s.calc(f"{she.capitalize()} pays {{}}.", f"{g}*{_fmt(p)}", money=True)
    return s.done(q, _fmt(cost), "gas")


def _unit_price(r: Random) -> DemoProblem:
    name, she, her = _person(r)
    n = r.choice([2, 4, 5, 8, 10])
    p = Fraction(r.randint(3, 40)) if r.random() < 0.5 else Fraction(n * r.randint(1, 6))
    k = r.randint(3, 12)
    (g, gs) = r.choice(_GOODS)
    q = f"A pack of {n} {gs} costs {_money(p)}. How much would {k} {gs} cost at the same price per {g}?"
    s = _Solution(r)
    one = s.calc(f"One {g} costs {{}}.", f"{_fmt(p)}/{n}", money=True)
    tot = s.calc(f"{k} {gs} cost {{}}.", f"{_fmt(one)}*{k}", money=True)
    return s.done(q, _fmt(tot), "unit_price")


def _savings(r: Random) -> DemoProblem:
    name, she, her = _person(r)
    per = r.randint(5, 30)
    weeks = r.randint(3, 20)
    have = r.randint(10, 90)
    cost = have + per * weeks
    item = r.choice(_BIG_ITEMS)
    q = f"{name} wants to buy a {item} that costs ${cost}. {she.capitalize()} has ${have} and saves ${per} each week. How many weeks will it take {her} to save enough?"
    s = _Solution(r)
    need = s.calc(f"{she.capitalize()} still needs {{}}.", f"{cost}-{have}", money=True)
    w = s.calc(f"It will take {{}} weeks.", f"{_fmt(need)}/{per}")
    return s.done(q, _fmt(w), "savings")


def _recipe(r: Random) -> DemoProblem:
    name, she, her = _person(r)
    f = r.randint(2, 8)
    n = r.randint(2, 6)
    half = r.random() < 0.6
    q = f"A recipe uses {f} cups of flour and {'half as much' if half else 'twice as much'} sugar. {name} makes {_count(r, n)} batches. How many cups of flour and sugar does {she} use altogether?"
    s = _Solution(r)
    sugar = s.calc("Each batch uses {} cups of sugar.", f"{f}/2" if half else f"{f}*2")
    batch = s.calc("Each batch uses {} cups in all.", f"{f}+{_fmt(sugar)}")
    tot = s.calc(f"{she.capitalize()} uses {{}} cups.", f"{_fmt(batch)}*{n}")
    return s.done(q, _fmt(tot), "recipe")


Template = Callable[[Random], DemoProblem]

# The mix.  Weights were tuned by measuring the labelled output at the default size (117 files x
# 583 records, seed 0): C4 2.59% BRIDGING; C5 47.2% DEPENDS; C6 INTEGER 62.2%, DECIMAL 11.8%,
# FRACTION 8.3%, SET 5.1%, EXPRESSION 5.0%, RADICAL 4.6%, INTERVAL 3.0%.  The templates that contain
# an implicit-constant step (discount, time/length/weight/week/cent conversions, perimeter "*2",
# triangle "/2", ages "/2", consecutive "+1", average over an unstated count, "the rest" = 100 - ...)
# set the C4 rate; long templates with parallel sub-computations (shopping, trip, bake sale,
# compare, garden beds) pull C5 towards INDEPENDENT; the geometry/algebra/fraction templates feed
# the C6 tail.
MIX: tuple[tuple[Template, float], ...] = (
    (_shopping, 14),
    (_trip, 8),
    (_garden_beds, 7),
    (_bake_sale, 8),
    (_compare, 9),
    (_wages, 3),
    (_discount, 1.7),
    (_percent_points, 2.6),
    (_speed_distance, 3),
    (_time_convert, 3.2),
    (_length_convert, 2.0),
    (_stated_multiplier, 4),
    (_weeks, 2.0),
    (_weight, 1.45),
    (_cents, 0.7),
    (_rectangle_area, 4),
    (_fence, 2.8),
    (_triangle_area, 0.7),
    (_box_volume, 2),
    (_hypotenuse, 7.5),
    (_square_side, 8),
    (_circle, 3),
    (_linear_equation, 5),
    (_ages, 2.8),
    (_consecutive, 0.6),
    (_expression, 11),
    (_evaluate, 2),
    (_quadratic, 7.5),
    (_absolute_value, 2.5),
    (_multiples, 2.5),
    (_inequality, 7.5),
    (_fraction_of, 5.5),
    (_probability, 4),
    (_share, 4),
    (_simplify_fraction, 4.5),
    (_average, 2.1),
    (_farm, 2.5),
    (_hall, 2.5),
    (_factory, 3),
    (_running, 3),
    (_unit_price, 2.5),
    (_savings, 3),
    (_recipe, 2),
)


def generate_problem(r: Random, mix: tuple[tuple[Template, float], ...] = MIX) -> DemoProblem:
    templates, weights = zip(*mix)
    return r.choices(templates, weights=weights, k=1)[0](r)


def generate_problems(n: int, seed: int = 0) -> list[DemoProblem]:
    r = Random(f"mycelium-demo:{seed}")
    return [generate_problem(r) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def problem_records(task: str, problem: DemoProblem, problem_id: str) -> list[dict]:
    """The records of one problem for one task, labelled by the structural rules."""
    if task == "c6":
        answer = final_answer(problem.solution)
        return [{"id": f"{problem_id}-0", "problem_id": problem_id, "problem": problem.question, "label": answer_type(answer or "")}]
    steps = parse_solution(problem.solution)
    rows = c4_transitions(problem.question, steps) if task == "c4" else c5_pairs(problem.question, steps) if task == "c5" else None
    if rows is None:
        raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    return [
        {"id": f"{problem_id}-{n}", "problem_id": problem_id, "problem": problem.question, **record_fields(row)}
        for n, row in enumerate(rows)
    ]


def iter_file_problems(task: str, k: int, *, per_file: int = 583, seed: int = 0) -> Iterator[tuple[str, DemoProblem, list[dict]]]:
    """The problems of file ``k`` of ``task`` with their ids and records: whole problems until the
    file holds at least ``per_file`` records.

    Seeded by (seed, task, k) alone, so any file can be rebuilt without the others.
    """
    r = Random(f"mycelium-demo:{seed}:{task}:{k}")
    count = n = 0
    while count < per_file:
        problem = generate_problem(r)
        problem_id = f"demo-{seed}-{task}-{k:05d}-{n:04d}"
        records = problem_records(task, problem, problem_id)
        count += len(records)
        n += 1
        yield problem_id, problem, records


def build_file(task: str, k: int, *, per_file: int = 583, seed: int = 0) -> list[dict]:
    """The records of file ``k`` of ``task`` (see ``iter_file_problems``)."""
    return [rec for _, _, records in iter_file_problems(task, k, per_file=per_file, seed=seed) for rec in records]


def _encoded_file(job: tuple[str, int, int, int]) -> tuple[str, int, bytes, Counter, int, int]:
    """Build and encode one file (runs in a worker process); returns what the parent needs."""
    task, k, per_file, seed = job
    records = build_file(task, k, per_file=per_file, seed=seed)
    labels = Counter(rec["label"] for rec in records)
    return task, k, to_jsonl(records), labels, len(records), len({rec["problem_id"] for rec in records})


def write_demo_corpus(
    dest: str,
    *,
    files: int = 117,
    per_file: int = 583,
    seed: int = 0,
    tasks: Iterable[str] = TASKS,
    upload_workers: int = 16,
    processes: int | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Write ``{dest}/{task}/part-NNNNN.jsonl`` for each task; return per-task stats
    ``{"files", "records", "problems", "labels", "seconds"}`` (``seconds``: wall time of the call).

    Files are built in ``processes`` worker processes (default: up to 8, or none for small corpora;
    every file is seeded on its own, so the bytes do not depend on the worker count) and uploaded
    by ``upload_workers`` threads through ``mycelium.storage``; ``dest`` may be a local folder or
    an ``s3://`` prefix.
    """
    from tqdm.auto import tqdm

    tasks = tuple(tasks)
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    jobs = [(task, k, per_file, seed) for task in tasks for k in range(files)]
    if processes is None:
        # Worker processes are forked (spawn would re-run the caller's main module, which breaks
        # scripts without a __main__ guard); forking is only safe while this process has no other
        # threads, so the default falls back to building in-process otherwise.
        forkable = "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
        processes = min(8, os.cpu_count() or 1) if forkable and len(jobs) >= 32 else 1
    stats: dict[str, dict] = {t: {"files": 0, "records": 0, "problems": 0, "labels": Counter()} for t in tasks}
    started = time.perf_counter()
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # The pool is created, and map() starts its workers, before any upload thread exists.
    builder = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method)) if processes > 1 else None
    try:
        results = builder.map(_encoded_file, jobs, chunksize=2) if builder else map(_encoded_file, jobs)
        with ThreadPoolExecutor(max_workers=upload_workers) as pool, tqdm(
            total=len(jobs), desc="demo corpus", unit="file", disable=not progress
        ) as bar:
            pending = []
            for task, k, data, labels, n_records, n_problems in results:
                st = stats[task]
                st["files"] += 1
                st["records"] += n_records
                st["problems"] += n_problems
                st["labels"].update(labels)
                fut = pool.submit(storage.write_bytes, storage.join(dest, task, part_name(k)), data)
                fut.add_done_callback(lambda _f: bar.update(1))
                pending.append(fut)
            for fut in pending:
                fut.result()  # surface the first upload error, if any
    finally:
        if builder:
            builder.shutdown()
    # A smaller corpus written over a bigger one must not leave the old extra parts behind:
    # the loader reads every file under the prefix.
    wanted = {part_name(k) for k in range(files)}
    for task in stats:
        stale = [o for o in storage.list_objects(storage.join(dest, task) + "/")
                 if re.fullmatch(r"part-\d{5}\.jsonl", o.key) and o.key not in wanted]
        for obj in stale:
            storage.delete(obj.uri)
        stats[task]["removed_stale_files"] = len(stale)
    elapsed = round(time.perf_counter() - started, 2)
    for st in stats.values():
        st["labels"] = dict(st["labels"].most_common())
        st["seconds"] = elapsed
    return stats
