"""Hand-checked cases for the structural labelers and the GSM8K converter (no servers needed)."""

from __future__ import annotations

import json
import time
from fractions import Fraction

import pytest

from mycelium.data import structural as S
from mycelium.data.gsm8k import convert_gsm8k, pack_by_problem
from mycelium.data.structural import (
    BRIDGING,
    DEPENDS,
    INDEPENDENT,
    NOT_BRIDGING,
    answer_type,
    c4_transitions,
    c5_pairs,
    evaluate,
    final_answer,
    numbers_in_text,
    parse_solution,
)

NATALIA_Q = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
NATALIA_A = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


def labels(records: list[dict]) -> list[str]:
    return [r["label"] for r in records]


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------


def test_natalia_full_example():
    steps = parse_solution(NATALIA_A)
    assert [s.text for s in steps] == [
        "Natalia sold 48/2 = 24 clips in May.",
        "Natalia sold 48+24 = 72 clips altogether in April and May.",
    ]
    assert steps[0].expression == "48/2"
    assert steps[0].result == 24 and isinstance(steps[0].result, Fraction)
    assert steps[0].operands == (48, 2)
    assert steps[1].operands == (48, 24)
    assert final_answer(NATALIA_A) == "72"

    c5 = c5_pairs(NATALIA_Q, steps)
    assert c5 == [
        {"i": 0, "j": 1, "step_i": steps[0].text, "step_j": steps[1].text, "label": DEPENDS},
    ]
    c4 = c4_transitions(NATALIA_Q, steps)
    # "half" states the 2, 48 is in the text, 24 is the first step's result: nothing implicit.
    assert labels(c4) == [NOT_BRIDGING, NOT_BRIDGING]
    assert c4[0]["step_i"] == "" and c4[1]["step_i"] == steps[0].text
    # The raw answer string is accepted too.
    assert c5_pairs(NATALIA_Q, NATALIA_A) == c5


def test_lines_without_annotation_are_skipped_and_multi_annotation_lines_are_one_step():
    answer = (
        "First we think about the problem.\n"
        "He buys 3*4 = <<3*4=12>>12 apples and 12+5 = <<12+5=17>>17 fruits in all.\n"
        "He eats 2 of them, leaving 17-2 = <<17-2=15>>15.\n"
        "#### 15\n"
        "Trailing text <<1+1=2>>2 after the answer is ignored."
    )
    steps = parse_solution(answer)
    assert len(steps) == 2
    first = steps[0]
    assert first.expression == "3*4; 12+5" and first.result == 17
    assert first.values == {12, 17}
    # 12 inside the same line is the line's own earlier result, not an implicit constant.
    q = "He buys 3 bags of 4 apples and 5 pears. He eats 2 of them. How many are left?"
    assert labels(c4_transitions(q, steps)) == [NOT_BRIDGING, NOT_BRIDGING]


def test_exact_arithmetic_not_float():
    assert evaluate("0.1+0.2") == (Fraction(3, 10), (Fraction(1, 10), Fraction(2, 10)))
    assert evaluate("1,000*2")[0] == 2000
    assert evaluate("25**0.5")[0] == 5  # exact root
    assert evaluate("2**0.5")[0] is None  # irrational: no exact result
    assert evaluate("3x4")[0] == 12  # calculator "x"
    assert evaluate("2(3+4)")[0] == 14
    assert evaluate("5/0")[0] is None
    assert evaluate("__import__('os')")[0] is None  # never eval'd
    steps = parse_solution("A third is 10/3 = <<10/3=3.33>>3.33 each.\nSo 3.33*3 = <<3.33*3=9.99>>9.99.")
    assert steps[0].result == Fraction(10, 3) and steps[0].stated == Fraction(333, 100)
    # The rounded stated value is reused by the next step: that is a dependency.
    assert labels(c5_pairs("", steps)) == [DEPENDS]


# ---------------------------------------------------------------------------------------------
# C5 traps
# ---------------------------------------------------------------------------------------------


def test_result_equal_to_a_problem_number_counts_as_depends():
    # Step 0 computes 12, which the problem also states; step 1 uses a 12.  The seed's rule is
    # numeric and exact, so this is DEPENDS (and of course not BRIDGING).
    q = "A box holds 6 pens. Sam buys 2 boxes and a pack of 12 pencils. He gives away 5 pencils."
    a = "Sam has 2*6 = <<2*6=12>>12 pens.\nHe keeps 12-5 = <<12-5=7>>7 pencils.\n#### 7"
    assert labels(c5_pairs(q, a)) == [DEPENDS]
    assert labels(c4_transitions(q, a)) == [NOT_BRIDGING, NOT_BRIDGING]
    # ...whereas a later step that does not use 12 is independent.
    a2 = "Sam has 2*6 = <<2*6=12>>12 pens.\nHe keeps 6-5 = <<6-5=1>>1 pencil.\n#### 1"
    assert labels(c5_pairs(q, a2)) == [INDEPENDENT]


def test_half_as_fraction_and_as_decimal_are_equal():
    a = "Half of it is 1/2 = <<1/2=0.5>>0.5.\nThen 0.5*10 = <<0.5*10=5>>5.\n#### 5"
    assert labels(c5_pairs("", a)) == [DEPENDS]
    a2 = "Half of it is 3*1/6 = <<3*1/6=1/2>>1/2.\nThen 0.5*10 = <<0.5*10=5>>5.\n#### 5"
    assert parse_solution(a2)[0].stated == Fraction(1, 2)
    assert labels(c5_pairs("", a2)) == [DEPENDS]


def test_negative_results_match_by_magnitude():
    q = "The temperature was 4 degrees and fell 7 degrees. Later it was -5 degrees warmer than 10."
    a = "The change is 4-7 = <<4-7=-3>>-3.\nThen 10-3 = <<10-3=7>>7.\nAnd -5+10 = <<-5+10=5>>5.\n#### 5"
    steps = parse_solution(a)
    assert steps[0].result == -3
    assert steps[2].operands == (-5, 10)
    assert labels(c5_pairs(q, steps)) == [DEPENDS, INDEPENDENT, INDEPENDENT]
    # -5 in the text states 5; nothing is implicit here.
    assert labels(c4_transitions(q, steps)) == [NOT_BRIDGING] * 3


def test_repeated_values_all_count():
    a = "A is 4*6 = <<4*6=24>>24.\nB is 30-6 = <<30-6=24>>24.\nC is 24+1 = <<24+1=25>>25.\n#### 25"
    pairs = {(r["i"], r["j"]): r["label"] for r in c5_pairs("", a)}
    assert pairs == {(0, 1): INDEPENDENT, (0, 2): DEPENDS, (1, 2): DEPENDS}


# ---------------------------------------------------------------------------------------------
# C4 traps
# ---------------------------------------------------------------------------------------------


def test_unit_conversion_is_bridging():
    q = "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?"
    a = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
    assert labels(c4_transitions(q, a)) == [BRIDGING, NOT_BRIDGING]
    assert S.implicit_operands(q, a) == [[60], []]
    # The same step is not bridging when the problem states the 60 (here: in words).
    q2 = q.replace("How much", "An hour has sixty minutes. How much")
    assert labels(c4_transitions(q2, a)) == [NOT_BRIDGING, NOT_BRIDGING]


def test_percent_needs_an_implicit_hundred():
    q = "A coat costs $80 and is 25% off. What is the sale price?"
    assert {25, 80} <= numbers_in_text(q) and Fraction(1, 4) not in numbers_in_text(q)
    for written in ("80*25/100", "80*0.25", "25/100*80"):
        a = f"The discount is {written} = $<<{written}=20>>20.\nThe price is 80-20 = $<<80-20=60>>60.\n#### 60"
        assert labels(c4_transitions(q, a)) == [BRIDGING, NOT_BRIDGING], written
    # A percent sign written in the step uses the stated 25 and nothing else.
    a = "The discount is 25%*80 = $<<25%*80=20>>20.\nThe price is 80-20 = $<<80-20=60>>60.\n#### 60"
    steps = parse_solution(a)
    assert steps[0].result == 20 and steps[0].operands == (25, 80)
    assert labels(c4_transitions(q, steps)) == [NOT_BRIDGING, NOT_BRIDGING]


def test_number_words_commas_decimals_and_fractions_in_text():
    got = numbers_in_text(
        "She bought a dozen eggs, twice as many apples, two-thirds of a cake, one hundred and five "
        "beads, 1,250 stamps, $3.50 of candy, 1/4 of a pie and one and a half pizzas."
    )
    for value in (12, 2, 3, Fraction(1, 3), Fraction(2, 3), 100, 5, 105, 1250, Fraction(7, 2), 1, 4, Fraction(1, 4), Fraction(3, 2)):
        assert Fraction(value) in got, value
    assert 250 not in got and 1 in got
    assert numbers_in_text("three quarters") >= {3, 4, Fraction(3, 4), Fraction(1, 4)}
    assert numbers_in_text("five one") == {5, 1}  # two numbers, not fifty-one


def test_rearranged_formula_and_always_known():
    q = "Ann is 6 years older than Bo. The sum of their ages is 30. How old is Bo?"
    a = "Twice Bo's age is 30-6 = <<30-6=24>>24.\nBo is 24/2 = <<24/2=12>>12.\n#### 12"
    assert labels(c4_transitions(q, a)) == [NOT_BRIDGING, BRIDGING]
    assert labels(c4_transitions(q, a, always_known={2})) == [NOT_BRIDGING, NOT_BRIDGING]


# ---------------------------------------------------------------------------------------------
# C6: answer types
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("72", "INTEGER"),
        ("-3", "INTEGER"),
        ("1,000", "INTEGER"),
        ("$5$", "INTEGER"),
        (r"\boxed{7}", "INTEGER"),
        ("4/2", "INTEGER"),  # an unreduced integer: typed by value
        (r"\sqrt{4}", "INTEGER"),
        ("50%", "INTEGER"),  # the percent sign is decoration
        (r"45^\circ", "INTEGER"),
        (r"5\text{ cm}", "INTEGER"),
        ("x = 3", "INTEGER"),
        (r"3 \times 10^5", "INTEGER"),
        ("0.5", "DECIMAL"),
        ("2.0", "DECIMAL"),
        ("12.5%", "DECIMAL"),
        (r"\$3.75", "DECIMAL"),
        ("1/2", "FRACTION"),
        (r"\frac{3}{4}", "FRACTION"),
        (r"\dfrac{3}{4}", "FRACTION"),
        (r"\frac34", "FRACTION"),
        (r"-\frac{1}{2}", "FRACTION"),
        (r"2\frac{1}{2}", "FRACTION"),  # mixed number, 5/2
        ("6/4", "FRACTION"),
        (r"\sqrt{2}", "RADICAL"),
        (r"3\sqrt{2}", "RADICAL"),
        (r"\sqrt{8}", "RADICAL"),
        ("2^{1/2}", "RADICAL"),
        (r"\frac{\sqrt{3}}{2}", "RADICAL"),
        (r"\sqrt[3]{2}", "RADICAL"),
        ("\u221a5", "RADICAL"),
        (r"\{1,2\}", "SET"),
        ("{1, 2}", "SET"),
        ("(1, 2)", "SET"),
        ("1, 2", "SET"),
        ("x = 2, x = 3", "SET"),
        ("[1, 2, 3]", "SET"),
        (r"3 \pm \sqrt{2}", "SET"),
        (r"\emptyset", "SET"),
        ("[0, 1)", "INTERVAL"),
        ("[0, 1]", "INTERVAL"),
        ("(-oo, 3]", "INTERVAL"),
        (r"(-\infty, 3]", "INTERVAL"),
        (r"(-\infty, 1) \cup (2, \infty)", "INTERVAL"),
        (r"x \le 3", "INTERVAL"),
        (r"-1 < x \le 4", "INTERVAL"),
        ("x^2+1", "EXPRESSION"),
        ("4x + 6", "EXPRESSION"),
        ("2xy", "EXPRESSION"),
        (r"\frac{x+1}{2}", "EXPRESSION"),
        (r"\pi", "EXPRESSION"),  # a symbol: "in terms of pi"
        (r"3\pi", "EXPRESSION"),
        ("Monday", "OTHER"),
        (r"\text{(A)}", "OTHER"),
        ("3:4", "OTHER"),
        ("1/0", "OTHER"),
        ("", "OTHER"),
    ],
)
def test_answer_type(answer: str, expected: str):
    assert answer_type(answer) == expected


def test_answer_type_never_evaluates_code_and_refuses_huge_powers():
    t0 = time.perf_counter()
    for hostile in (
        "__import__('os').system('echo pwned')",
        "x.__class__",
        "lambda: 1",
        "10^10^10",
        "(10^100)^(999)",
        "9^9^9^9",
        "exec('1')",
    ):
        assert answer_type(hostile) == "OTHER", hostile
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------------------
# GSM8K conversion
# ---------------------------------------------------------------------------------------------


def test_pack_by_problem_never_splits_a_problem():
    groups = [[{"p": g}] * n for g, n in enumerate([3, 4, 2, 6, 1, 1])]
    files = list(pack_by_problem(groups, per_file=5))
    assert [len(f) for f in files] == [3, 4, 2, 6, 2]
    for f in files:
        ids = {r["p"] for r in f}
        assert all(sum(1 for g in files if {r["p"] for r in g} & {i}) == 1 for i in ids)


def test_convert_gsm8k(tmp_path):
    src = tmp_path / "train.jsonl"
    weng_q = "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?"
    weng_a = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
    lines = [{"question": NATALIA_Q, "answer": NATALIA_A}, {"question": weng_q, "answer": weng_a}] * 3
    src.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "out"
    stats = convert_gsm8k(str(src), str(out), per_file=4)
    assert stats["problems"] == 6
    assert stats["c4"] == {"files": 3, "records": 12, "labels": {"BRIDGING": 3, "NOT_BRIDGING": 9}}
    assert stats["c5"]["records"] == 6 and stats["c5"]["labels"] == {"DEPENDS": 6}
    records = [json.loads(x) for p in sorted((out / "c4").glob("part-*.jsonl")) for x in p.read_text().splitlines()]
    assert len(records) == 12
    assert set(records[0]) == {"id", "problem_id", "problem", "step_i", "earlier_steps", "step_j", "label"}
    assert len({r["id"] for r in records}) == 12  # unique even though questions repeat
    # The same question always gets the same problem_id (so it cannot straddle a split).
    assert len({r["problem_id"] for r in records}) == 2
    assert records[0]["step_i"] == "" and records[1]["step_i"] == "Natalia sold 48/2 = 24 clips in May."
    weng = [r for r in records if r["problem"] == weng_q][:2]
    assert [r["earlier_steps"] for r in weng] == ["", "Weng earns 12/60 = $0.2 per minute."]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"question": "q"}', "'answer'"),
        ('{"question": "", "answer": "a"}', "'question'"),
    ],
)
def test_convert_gsm8k_rejects_bad_lines(tmp_path, bad, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"question": NATALIA_Q, "answer": NATALIA_A}) + "\n\n" + bad + "\n")
    with pytest.raises(ValueError) as err:
        convert_gsm8k(str(src), str(tmp_path / "out"))
    assert f"{src}:3:" in str(err.value) and message in str(err.value)


def test_fast_paths_agree_with_sympy():
    """The sympy-free shortcuts for common shapes give the same type as the general path."""
    import re as _re

    cases = ["7", "-12", "0.25", "-.5", "6/4", "8/4", r"\frac{9}{3}", r"-\frac{2}{7}", r"\sqrt{49}", r"3\sqrt{12}", r"-2\sqrt{5}", "5\u221a7"]
    for case in cases:
        plain = S._normalise_answer(case)
        fast = S._fast_scalar_type(plain)
        assert fast is not None, case
        expr = plain.replace("^", "**")
        slow = S._classify_value(S._sympy_value(expr), bool(_re.search(r"\d*\.\d+", expr)))
        assert fast == slow, (case, fast, slow)


def test_numbers_written_on_plain_solution_lines_are_not_implicit():
    # GSM-Symbolic writes sums out on lines without annotations; 113 there is an earlier result.
    q = "Tom has 40 apples, 42 pears, 31 plums and some kiwis: 163 fruits in all. How many kiwis?"
    a = "40 + 42 + 31 + K = 113 + K\n113 + K = 163\nK = 163-113 = <<163-113=50>>50 kiwis\n#### 50"
    assert labels(c4_transitions(q, a)) == [NOT_BRIDGING]
    # Parsed steps alone do not carry the plain lines: 113 is implicit there.
    assert labels(c4_transitions(q, S.parse_solution(a))) == [BRIDGING]
    # "half" states both parts of 1/2.
    assert labels(c4_transitions("Half of 36 students left.", "36*1/2 = <<36*1/2=18>>18\n#### 18")) == [NOT_BRIDGING]


def test_c4_earlier_steps_hold_every_step_before_j():
    problem = "A box holds 3 rows of 4 eggs. How many eggs are in 5 boxes, in dozens?"
    answer = ("One box: 3*4 = <<3*4=12>>12 eggs.\nFive boxes: 12*5 = <<12*5=60>>60 eggs.\n"
              "In dozens: 60/12 = <<60/12=5>>5.\n#### 5")
    rows = c4_transitions(problem, answer)
    assert [r["earlier_steps"] for r in rows] == [
        "", "One box: 3*4 = 12 eggs.", "One box: 3*4 = 12 eggs. Five boxes: 12*5 = 60 eggs."]
    assert [r["step_i"] for r in rows][2] == "Five boxes: 12*5 = 60 eggs."
    # The 12 of the last step is the first step's result (known), not the implicit 12 of a dozen.
    assert [r["label"] for r in rows] == ["NOT_BRIDGING", "NOT_BRIDGING", "NOT_BRIDGING"]
