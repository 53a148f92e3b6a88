"""Rewards and the safe arithmetic evaluator: hand examples, adversarial model output, hypothesis fuzzing."""

import math
import threading
import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rl import rewards as R
from rl.code_screen import code_risk
from rl.sandbox import _worker
from rl.safe_eval import numbers_used, safe_eval

GOOD = "<think>7*3=21, 12+21=33</think> <answer>33</answer>"
TIME_BOUND = 1.0  # seconds per reward call on adversarial input


def ans(s: str) -> str:
    return f"<think>x</think> <answer>{s}</answer>"


@pytest.fixture(scope="module")
def mv():
    m = R.MathVerifyReward(timeout=0.5)
    assert m.warmup()
    return m


@pytest.fixture(scope="module")
def rg_insert():
    # string_insertion's scorer calls eval() on the answer: the adapter must refuse code before it gets there.
    r = R.ReasoningGymReward("string_insertion", size=5, seed=0, timeout=0.5)
    assert r.warmup()
    r([ans("x")], entry=r.dataset[0])  # the worker imports reasoning-gym once (untimed)
    return r


# ----------------------------------------------------------------------------------------------------------------
# safe_eval


def test_safe_eval_values():
    assert safe_eval("12+7*3") == 33
    assert safe_eval(" (1 + 2) * 3 ") == 9
    assert safe_eval("1/3*3") == 1 and isinstance(safe_eval("1/3"), Fraction)
    assert safe_eval("-4 - -2") == -2 and safe_eval("+5") == 5
    assert safe_eval("0.1+0.2") == Fraction(3, 10)
    assert safe_eval("1/0") is None and safe_eval("1/(2-2)") is None
    assert safe_eval("2**3") is None and safe_eval("2**3", allow_pow=True) == 8
    assert safe_eval("2**-2", allow_pow=True) == Fraction(1, 4)
    assert safe_eval("2**0.5", allow_pow=True) is None  # non-integer exponent
    assert safe_eval("2**9", allow_pow=True) is None  # |exponent| > 8
    assert safe_eval("7//2") is None and safe_eval("7//2", allow_floordiv=True) == 3
    assert safe_eval("10**6*10**6", allow_pow=True) == 10 ** 12
    assert safe_eval("10**6*10**6*10", allow_pow=True) is None  # magnitude bound
    assert safe_eval("1000000000000*10") is None
    assert safe_eval("") is None and safe_eval("()") is None and safe_eval("1 2") is None
    for bad in ["1e5", "x", "3%2", "1_000", "0x10", "abs(-1)", "True", "[1]", "'1'", "1 if 1 else 2", "1<2", "~1"]:
        assert safe_eval(bad) is None, bad
    for bad in [None, 3, 3.0, b"1+1", ["1"], object()]:
        assert safe_eval(bad) is None


def test_safe_eval_bounds():
    def balanced(k):  # a sum of 2**k ones as a balanced tree: 2**(k+1) - 1 expression nodes, depth k + 1
        return "1" if k == 0 else f"({balanced(k - 1)})+({balanced(k - 1)})"

    assert safe_eval(balanced(5)) == 32  # 63 nodes + Expression = 64
    assert safe_eval(balanced(6)) is None  # > 64 nodes
    assert safe_eval("+".join(["1"] * 31)) == 31  # a left-leaning chain: depth 32
    assert safe_eval("+".join(["1"] * 32)) is None  # depth 33
    assert safe_eval("-" * 20 + "1") == 1
    assert safe_eval("-" * 40 + "1") is None  # depth > 32
    assert safe_eval("(" * 100 + "1" + ")" * 100) == 1  # parentheses are not nodes
    assert safe_eval("1" * 257) is None  # length


def test_numbers_used():
    assert numbers_used("(1+2)*3") == [1, 2, 3]
    assert numbers_used("25 - 5*(3+1)") == [25, 5, 3, 1]
    assert numbers_used("-3+3.0") == [3, 3.0] and type(numbers_used("3.0")[0]) is float
    assert numbers_used("x+1") == [] and numbers_used(None) == [] and numbers_used("2**3") == []


@st.composite
def _expr(draw, depth=0):
    """(expression text, its exact value or None past the 1e12 magnitude bound) built together, so no reference
    evaluator is needed."""
    if depth >= 4 or draw(st.booleans()):
        v = draw(st.integers(0, 99_999))
        return str(v), Fraction(v)
    (a, x), (b, y) = draw(_expr(depth + 1)), draw(_expr(depth + 1))
    op = draw(st.sampled_from("+-*/"))
    if op == "/" and y == 0:
        op = "+"
    if x is None or y is None:
        return f"({a}{op}{b})", None
    v = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]
    return f"({a}{op}{b})", v if abs(v) <= 10 ** 12 else None


@settings(max_examples=200, deadline=None)
@given(_expr())
def test_safe_eval_matches_construction(pair):
    text, value = pair
    assert safe_eval(text) == value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), st.text(alphabet="0123456789+-*/(). ", max_size=300)))
def test_safe_eval_fuzz(s):
    for kw in ({}, {"allow_pow": True, "allow_floordiv": True}):
        v = safe_eval(s, **kw)
        assert v is None or (isinstance(v, Fraction) and abs(v) <= 10 ** 12)
        used = numbers_used(s, **kw)
        assert isinstance(used, list) and all(type(u) in (int, float) for u in used)


# ----------------------------------------------------------------------------------------------------------------
# Extraction and format


def test_extract_answer():
    assert R.extract_answer(GOOD) == "33"
    assert R.extract_answer("<answer> 5 </answer> then <answer>7</answer>") == "7"  # the last one counts
    assert R.extract_answer("<answer>5</answer> <answer>7") == "5"  # last complete pair
    assert R.extract_answer("no tags") is None and R.extract_answer("</answer><answer>") is None
    assert R.extract_answer("<answer></answer>") == ""
    assert R.extract_answer(None) is None and R.extract_answer(5) is None
    assert R.extract_answer({"role": "assistant", "content": GOOD}) == "33"  # chat message


def test_format_reward():
    cases = {
        GOOD: 1.0,
        "  <think>\nreasoning\n</think>\n<answer>33</answer>\n": 1.0,
        GOOD + "<eos>": 1.0,
        GOOD + "<|endoftext|>  ": 1.0,
        "<think></think><answer>1</answer>": 1.0,
        "<think>r</think> <answer> </answer>": 0.0,  # blank answer
        "<answer>33</answer>": 0.0,  # no think
        "<think>r</think>": 0.0,
        "<think>r</think> text <answer>33</answer>": 0.0,
        GOOD + " and more": 0.0,
        "prefix " + GOOD: 0.0,
        "<think>r</think> <answer>1</answer> <answer>2</answer>": 0.0,  # two answers
        "<think>a<think>b</think> <answer>1</answer>": 0.0,
        "<answer>1</answer> <think>r</think>": 0.0,
        "": 0.0,
    }
    assert R.format_reward(list(cases)) == list(cases.values())
    assert R.format_reward([None, 3, b"x", [], {"content": GOOD}]) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert R.format_reward([]) == [] and R.format_reward(None) == []


# ----------------------------------------------------------------------------------------------------------------
# Accuracy, arithmetic, Countdown


def test_accuracy_reward():
    comps = [GOOD, ans("+33"), ans(" 33 "), ans("33.0"), ans("33.5"), ans("34"), "33", "<answer>33",
             "<answer>5</answer> <answer>33</answer>", "<answer>33</answer> <answer>5</answer>", None, ans("12+21")]
    assert R.accuracy_reward(comps, answer=["33"] * len(comps)) == [1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    assert R.accuracy_reward([ans("-5"), ans("- 5"), ans("5")], answer=-5) == [1.0, 1.0, 0.0]  # shared int gold
    assert R.accuracy_reward([ans("1,000")], answer="1000") == [1.0]
    assert R.accuracy_reward([ans("Paris")], answer=" Paris ") == [1.0]  # non-integer gold: string match
    assert R.accuracy_reward([GOOD], answer=None) == [0.0]
    assert R.accuracy_reward([GOOD, GOOD], answer=["33"]) == [1.0, 1.0]  # length-1 field broadcast
    assert R.accuracy_reward([GOOD, GOOD, GOOD], answer=["33", "1"]) == [0.0, 0.0, 0.0]  # mismatched field


def test_arithmetic_reward():
    comps = [GOOD, ans("12+21"), ans("66/2"), ans("34"), ans("2**5+1"), ans("abc"), "no answer"]
    assert R.arithmetic_reward(comps, answer="33") == [1, 1, 1, 0, 0, 0, 0]
    assert R.arithmetic_reward([ans("2**5+1")], answer="33", allow_pow=True) == [1.0]
    assert R.arithmetic_reward([ans("0.5"), ans("1/2")], answer="1/2") == [1.0, 1.0]


def test_countdown_reward():
    nums, target = [1, 2, 3], 9
    comps = [ans("(1+2)*3"), ans("3*(2+1)"), ans("3*3"), ans("(1+2)*3*1"), ans("(1+2)*3+0"), ans("(1+2)*3.0"),
             ans("1+2+3"), "no answer", ans("(1+2)*3 = 9"), ans("__import__('os')")]
    assert R.countdown_reward(comps, numbers=nums, target=target) == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    tiny = R.countdown_reward(comps, numbers=nums, target=target, format_score=0.1)
    assert tiny == [1, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.1, 0.1]
    # per-completion numbers/targets, exact division, a number given twice must be used twice
    assert R.countdown_reward([ans("6/3*4"), ans("(5+5)*2"), ans("5*2*2")],
                              numbers=[[6, 4, 3], [5, 5, 2], [5, 2, 2]], target=[8, 20, 20]) == [1, 1, 1]
    assert R.countdown_reward([ans("5*2*2")], numbers=[[5, 2]], target=[20]) == [0.0]  # 2 used twice
    assert R.countdown_reward([ans("1/3+1/3+1/3")], numbers=[1, 3, 1, 3, 1, 3], target=1) == [1.0]
    assert R.countdown_reward([ans("(1+2)*3")], numbers=["1", "2", "3"], target="9") == [1.0]
    assert R.countdown_reward([ans("(1+2)*3")], numbers=None, target=9) == [0.0]
    assert R.countdown_reward([ans("(1+2)*3")], numbers=[1, 2, 3], target=None) == [0.0]


# ----------------------------------------------------------------------------------------------------------------
# math-verify


def test_math_verify_reward(mv):
    comps = [ans("0.5"), ans("\\frac{1}{2}"), ans("1/2"), ans("4"), ans("\\boxed{3}"), "no answer", None]
    golds = ["\\frac{1}{2}", "0.5", "0.5", "\\boxed{3}", "3", "3", "3"]
    assert mv(comps, answer=golds) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert mv([ans("x" * 3000)], answer="x") == [0.0]  # over max_chars


def test_math_verify_from_another_thread(mv):
    out = []
    t = threading.Thread(target=lambda: out.append(mv([ans("0.5")], answer="\\frac{1}{2}")))
    t.start()
    t.join(10)
    assert out == [[1.0]]


def test_worker_hard_kill_and_restart(mv):
    w = _worker()
    restarts = w.restarts
    t0 = time.monotonic()
    # The worker's own soft timer (5 s) is longer than the parent's deadline (0.3 s): the parent must kill it.
    r = w.request(("mv", "1", "\\boxed{9^{9^{9^9}}}", 5.0), 0.3)
    assert r is None and time.monotonic() - t0 < TIME_BOUND and w.restarts == restarts + 1
    assert mv.warmup() and mv([ans("0.5")], answer="1/2") == [1.0]


def test_math_verify_soft_timeout_without_prescreen(mv):
    m = R.MathVerifyReward(timeout=0.5, prescreen=False)
    for s in ["9**9**9**9", "\\boxed{9^{9^{9^9}}}", "(10**9)**(10**9)"]:
        assert m.warmup()
        t0 = time.monotonic()
        assert m([ans(s)], answer="1") == [0.0]
        assert time.monotonic() - t0 < TIME_BOUND, s


# ----------------------------------------------------------------------------------------------------------------
# reasoning-gym


def test_reasoning_gym_reward(rg_insert):
    rg = R.ReasoningGymReward("basic_arithmetic", size=10, seed=1, timeout=1.0)
    entries = [rg.dataset[i] for i in range(3)]
    comps = [ans(e["answer"]) for e in entries] + [ans("not a number"), "no tags"]
    assert rg(comps, index=[0, 1, 2, 0, 0]) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert rg(comps[:3], entry=entries) == [1.0, 1.0, 1.0]
    assert rg(comps[:1], index=[99]) == [0.0]  # index out of range
    assert rg(comps[:1]) == [0.0]  # neither entry nor index
    e = rg_insert.dataset[0]
    good, as_list = ans(e["answer"]), ans(repr(list(e["answer"])))
    assert rg_insert([good, as_list, ans("wrong")], entry=e) == [1.0, 0.1, 0.0]  # scorer's own partial credit


def test_code_risk():
    for a in ["ABC", "['D','A']", "x**2 + 3*x", "sin(x) + C", "open", "(1, 2)", "[[1, 0], [0, 1]]", "-4", "3!",
              "X**3/3 + C", "sin('x')", "Matrix([[1, 2]])"]:
        assert not code_risk(a), a
    for a in ["__import__('os')", "open('f','w')", "os.system('ls')", "(lambda: 1)()", "[open][0]('f')",
              "3! + open('f')", "3! + [open][0]('f')", "3! + preview(x)", "[x for x in ()]", "exit()",
              "f'{exit()}'", "getattr(1, 'real')", "3! + open   ('f')", "3! + open\\\n('f')", "x.y",
              "max(['1'], key=exec)", "sin('exec(1)')", "Matrix(['open(1)'])", "[open]", "min([], default=eval)"]:
        assert code_risk(a), a


# ----------------------------------------------------------------------------------------------------------------
# Overlong penalty and combine


def test_soft_overlong_penalty():
    assert R.soft_overlong_penalty([0, 16, 17, 18, 20, 21, 10 ** 9], max_len=20, cache_len=4) == \
        [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    assert R.soft_overlong_penalty([None, "x", float("nan")], 20, 4) == [0.0, 0.0, 0.0]
    assert R.soft_overlong_penalty([20, 21], 20, 0) == [0.0, -1.0]
    p = R.OverlongPenalty(20, 4)
    assert p(["a", "b"], completion_ids=[[0] * 16, [0] * 18]) == [0.0, -0.5]
    assert p(["a", "b"], completion_lengths=[21, 3]) == [-1.0, 0.0]
    assert p(["a"]) == [0.0]


def test_combine():
    def boom(completions, **kw):
        raise RuntimeError("broken reward")

    fn = R.combine({"format": (R.format_reward, 0.1), "accuracy": (R.accuracy_reward, 1.0), "boom": (boom, 5.0),
                    "short": (lambda c, **kw: [1.0], 1.0), "nan": (lambda c, **kw: [math.nan] * len(c), 1.0)})
    total, parts = fn([GOOD, ans("34"), "33"], answer="33")
    assert parts["format"] == [1.0, 1.0, 0.0] and parts["accuracy"] == [1.0, 0.0, 0.0]
    assert parts["boom"] == parts["short"] == parts["nan"] == [0.0, 0.0, 0.0]
    assert total == pytest.approx([1.1, 0.1, 0.0])
    assert fn([], answer="33") == ([], {k: [] for k in parts})
    tiny = R.combine({"countdown": (lambda c, **kw: R.countdown_reward(c, format_score=0.1, **kw), 1.0)})
    assert tiny([ans("(1+2)*3"), ans("3*3")], numbers=[1, 2, 3], target=9)[0] == [1.0, 0.1]


# ----------------------------------------------------------------------------------------------------------------
# Adversarial model output: nothing runs, nothing raises, every call is fast


def _adversarial(tmp_path):
    pwned = tmp_path / "pwned"
    cmd = f"__import__('os').system('touch {pwned}')"
    strings = [
        cmd,
        f"(lambda: __import__('os').system('touch {pwned}'))()",
        f"open('{pwned}', 'w')",
        f"3! + open('{pwned}', 'w')",
        "().__class__.__bases__[0].__subclasses__()",
        "9**9**9**9",
        "9^{9^{9^9}}",
        "(" * 10_000 + "1" + ")" * 10_000,
        "1" * 10 ** 6,
        "a" * 10 ** 6,
        "<answer>" * 100_000,
        "<answer>" * 100_000 + "1</answer>",
        "<think>" * 50_000 + "</think>" * 50_000,
        "-" * 100_000 + "1",
        "\x00\ud800\uffff",
        "",
    ]
    comps = []
    for s in strings:
        comps += [s, ans(s), f"<think>r</think> <answer>{s}"]
    return pwned, comps


def _all_rewards(mv, rg_insert):
    return {
        "format": R.format_reward,
        "accuracy": R.accuracy_reward,
        "arithmetic": lambda c, **kw: R.arithmetic_reward(c, allow_pow=True, **kw),
        "countdown": R.countdown_reward,
        "math_verify": mv,
        "reasoning_gym": rg_insert,
        "overlong": R.OverlongPenalty(20, 4),
    }


def test_adversarial_inputs(tmp_path, mv, rg_insert):
    pwned, comps = _adversarial(tmp_path)
    entry = rg_insert.dataset[0]
    batch = {"answer": "1", "numbers": [1, 2, 3], "target": 6, "entry": entry, "completion_lengths": 3}
    for name, fn in _all_rewards(mv, rg_insert).items():
        for c in comps:
            mv.warmup()  # a killed worker restarts outside the timed region
            t0 = time.monotonic()
            out = fn([c], **batch)
            elapsed = time.monotonic() - t0
            assert elapsed < TIME_BOUND, (name, c[:60], elapsed)
            assert len(out) == 1 and isinstance(out[0], float) and -1.0 <= out[0] <= 1.0, (name, c[:60])
        assert not pwned.exists(), name
    assert safe_eval(comps[0]) is None and not pwned.exists()


def test_adversarial_safe_eval(tmp_path):
    pwned, comps = _adversarial(tmp_path)
    for c in comps:
        for kw in ({}, {"allow_pow": True}):
            t0 = time.monotonic()
            assert safe_eval(c, **kw) is None or isinstance(safe_eval(c, **kw), Fraction)
            numbers_used(c, **kw)
            assert time.monotonic() - t0 < TIME_BOUND
    assert safe_eval("9**9**9**9", allow_pow=True) is None
    assert not pwned.exists()


def test_batch_of_garbage_types(mv, rg_insert):
    junk = [None, 1, 2.5, b"<answer>1</answer>", {"content": None}, [], [None], object(), float("nan")]
    for name, fn in _all_rewards(mv, rg_insert).items():
        out = fn(junk, answer="1", numbers=[1], target=1, entry=rg_insert.dataset[0])
        assert out == [0.0] * len(junk) or name == "overlong", name
    for name, fn in _all_rewards(mv, rg_insert).items():  # garbage batch fields
        out = fn([GOOD], answer=object(), numbers=object(), target=[[]], entry=5, index="x")
        assert out == ([1.0] if name == "format" else [0.0]), name
        assert fn("not a list") in ([0.0], [1.0]) and fn(None) == [] and fn(12345) == [], name


# ----------------------------------------------------------------------------------------------------------------
# Fuzzing every reward


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(comps=st.lists(st.one_of(st.text(), st.text().map(ans), st.none(), st.integers()), max_size=4),
       gold=st.one_of(st.text(max_size=20), st.integers(), st.none()))
def test_fuzz_cheap_rewards(comps, gold):
    for fn in (R.format_reward, R.accuracy_reward, R.arithmetic_reward, R.countdown_reward):
        out = fn(comps, answer=gold, numbers=[1, 2], target=gold)
        assert len(out) == len(comps) and all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out)
    e = R.extract_answer(comps[0] if comps else None)
    assert e is None or isinstance(e, str)
    out = R.soft_overlong_penalty([len(c) if isinstance(c, str) else c for c in comps], 10, 4)
    assert all(-1.0 <= v <= 0.0 for v in out)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(comp=st.one_of(st.text(max_size=200), st.text(max_size=200).map(ans)), gold=st.text(max_size=20))
def test_fuzz_isolated_rewards(mv, rg_insert, comp, gold):
    for fn in (mv, rg_insert):
        t0 = time.monotonic()
        out = fn([comp], answer=gold, entry=rg_insert.dataset[0])
        assert time.monotonic() - t0 < TIME_BOUND + 1.5  # + a possible worker restart
        assert len(out) == 1 and 0.0 <= out[0] <= 1.0


def test_numpy_fields():
    np = pytest.importorskip("numpy")
    assert R.countdown_reward([ans("(1+2)*3")], numbers=np.array([[1, 2, 3]]), target=np.array([9])) == [1.0]
    assert R.accuracy_reward([GOOD], answer=np.int64(33)) == [1.0]
    assert R.arithmetic_reward([ans("1/2")], answer=np.float32(0.5)) == [1.0]
