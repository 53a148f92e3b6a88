"""The digit-chain task (rl/tasks/digit_chain.py): answers, the fixed-distance layout that makes steps learnable, the
step checker, the corpus mix, and disjoint seeds."""

import numpy as np
import pytest

from rl.rewards import accuracy_reward, format_reward
from rl.tasks import digit_chain, digit_chain_corpus, digit_chain_prompts, digit_chain_steps

TEMPLATE = "User: {prompt} Assistant:"


def test_hand_example_and_rewards():
    for i in range(200):
        r = digit_chain(3, i)
        sheet = r["prompt"].split("(")[0].split()
        value = int(sheet[0])
        for term in sheet[1:]:
            value = (value + int(term[1]) if term[0] == "+" else value - int(term[1])) % 10
        assert r["answer"] == str(value)
        assert r["difficulty"] == len(sheet)
        assert 2 <= r["difficulty"] <= 6
        assert accuracy_reward([r["reasoning"], r["direct"]], answer=[r["answer"]] * 2) == [1.0, 1.0]
        assert format_reward([r["reasoning"], r["direct"]]) == [1.0, 1.0]
    r = digit_chain(1, 0)
    assert r["prompt"] == "2 +1=? -1=? -1=? +1=?      (mod 10)"
    assert r["reasoning"] == "<think>2 +1=3 -1=2 -1=1 +1=2</think> <answer>2</answer>"


def test_every_step_reads_its_term_at_the_same_distance():
    """Prompt slot j and reasoning step j are the same number of characters apart in every problem."""
    distances = set()
    for i in range(300):
        r = digit_chain(5, i)
        text = TEMPLATE.format(prompt=r["prompt"]) + " " + r["reasoning"]
        think = text.index("<think>") + len("<think>")
        sheet = text.index("User: ") + len("User: ")
        for j in range(1, r["difficulty"]):
            p = sheet + 1 + 5 * (j - 1)
            q = think + 1 + 5 * (j - 1)
            assert text[p + 1:p + 3] == text[q + 1:q + 3]  # op and digit
            distances.add(q - p)
    assert len(distances) == 1


def test_step_checker_judges_each_step_given_the_previous_line():
    r = digit_chain(1, 0)  # 2 +1=? -1=? -1=? +1=?
    assert digit_chain_steps(r["prompt"], r["reasoning"]) == (4, 4)
    assert digit_chain_steps(r["prompt"], "<think>2 +1=4 -1=3 -1=1 +1=2</think>") == (2, 4)  # 1st wrong, 2nd ok
    assert digit_chain_steps(r["prompt"], "<think>2 +1=3 -2=1</think>") == (1, 2)  # wrong digit restated
    assert digit_chain_steps(r["prompt"], "<think>7 +1=8</think>") == (0, 1)  # wrong start
    assert digit_chain_steps(r["prompt"], "<think></think> <answer>2</answer>") == (0, 0)
    assert digit_chain_steps(r["prompt"], None) == (0, 0)
    assert digit_chain_steps("not a worksheet", r["reasoning"]) == (0, 0)
    assert digit_chain_steps(r["prompt"], "<think>2" + " +1=3" * 100_000 + "</think>") == (0, 0)  # cut, no close


def test_corpus_mix_and_disjoint_seeds():
    docs = digit_chain_corpus(1, 2000, 0.3)
    frac = np.mean([d["response"].startswith("<think>") and not d["response"].startswith("<think></think>")
                    for d in docs])
    assert 0.26 < frac < 0.34
    assert digit_chain_corpus(1, 50, 0.3) == docs[:50]
    train = {r["prompt"] for r in digit_chain_prompts(1, 2000)}
    held = [r["prompt"] for r in digit_chain_prompts(2, 200)]
    assert len(set(held)) > 150  # a large problem space: mostly new problems (short ones may repeat)
    with pytest.raises(ValueError, match="max_step"):
        digit_chain(0, 0, max_step=0)
    assert sum(p in train for p in held if len(p.split("=?")) > 4) < 5


def test_math_verify_agrees_with_our_accuracy_reward():
    """The verdict on a digit-chain answer is not only ours: math-verify (an independent library) agrees."""
    from rl.rewards import math_verify_reward
    recs = [digit_chain(7, i) for i in range(12)]
    right = [r["reasoning"] for r in recs]
    wrong = [r["direct"].replace(f">{r['answer']}<", f">{(int(r['answer']) + 3) % 10}<") for r in recs]
    gold = [r["answer"] for r in recs] * 2
    ours = accuracy_reward(right + wrong, answer=gold)
    assert ours == [1.0] * 12 + [0.0] * 12
    assert math_verify_reward(right + wrong, answer=gold) == ours


def test_countdown_prompts_are_solvable_and_both_verifiers_agree():
    import reasoning_gym

    from rl.rewards import countdown_reward
    from rl.tasks import countdown_prompts
    recs = countdown_prompts(4, 16)
    assert recs == countdown_prompts(4, 16)  # reproducible
    assert {r["difficulty"] for r in recs} <= {3, 4}
    ds = reasoning_gym.create_dataset("countdown", seed=4, size=16, min_numbers=3, max_numbers=4, min_value=1,
                                      max_value=20, min_target=10, max_target=50)
    right = [f"<think></think> <answer>{r['solution']}</answer>" for r in recs]
    wrong = [f"<think></think> <answer>{r['solution']} + 1</answer>" for r in recs]
    fields = {"numbers": [r["numbers"] for r in recs] * 2, "target": [r["target"] for r in recs] * 2}
    ours = countdown_reward(right + wrong, **fields)
    assert ours == [1.0] * 16 + [0.0] * 16
    theirs = [ds.score_answer(r["solution"], e) for r, e in zip(recs, ds)]
    theirs += [ds.score_answer(r["solution"] + " + 1", e) for r, e in zip(recs, ds)]
    assert [float(t >= 1.0) for t in theirs] == ours


# ---- tasks as one concept (rl/tasks/) -------------------------------------------------------------------------------

def test_registry_and_task_fields():
    from rl.tasks import TASKS, Arithmetic, Countdown, DigitChain, GSM8K, get_task
    assert set(TASKS) >= {"arithmetic", "digit_chain", "countdown", "gsm8k"}
    assert get_task("digit_chain") == DigitChain() and get_task(Countdown(train_prompts=5)).train_prompts == 5
    with pytest.raises(ValueError, match="unknown 'nope'"):
        get_task("nope")
    # the correctness reward is the task's, and it is among its RL rewards
    for cls in (Arithmetic, DigitChain, Countdown, GSM8K):
        assert cls.correctness in cls.rewards and cls.rewards[0] == "format"
    with pytest.raises(ValueError, match="task.prompt_seed"):
        DigitChain(prompt_seed=2, held_out_seed=2)
    with pytest.raises(ValueError, match="task.reason_prob"):
        DigitChain(reason_prob=1.5)
    with pytest.raises(ValueError, match="max_step"):
        DigitChain(max_step=0)


def test_digit_chain_task_owns_records_and_split():
    from rl.tasks import DigitChain
    task = DigitChain(train_prompts=300, corpus_docs=50)
    train, held = task.train_records(), task.held_out(40)
    assert len(train) == 300 and len(held) == 40 and held == task.held_out(40)
    assert train == digit_chain_prompts(task.prompt_seed, 300)  # the task's generator, its own seed
    assert len(task.corpus()) == 50 and all(set(r) == {"prompt", "response"} for r in task.corpus())
    long = DigitChain(min_terms=7, max_terms=8).held_out(20)
    assert {r["difficulty"] for r in long} <= {7, 8} and all(len(r["prompt"]) == len(long[0]["prompt"]) for r in long)
    worked = task.worked(201, 10)
    assert task.correct([w["response"] for w in worked], worked).all()


def test_correctness_and_votes_per_task():
    from rl.tasks import Countdown, DigitChain, GSM8K
    recs = [{"prompt": "p", "answer": "4"}, {"prompt": "p", "answer": "4"}]
    assert DigitChain().correct(["<answer>4</answer>", "<answer>5</answer>"], recs).tolist() == [True, False]

    cd = Countdown()
    rec = {"prompt": "Using 3 5 7 once each with + - * /, make 22.", "numbers": [3, 5, 7], "target": 22}
    good = ["<answer>3*5+7</answer>", "<answer>7+5*3</answer>", "<answer>3*5+8</answer>", "<answer>15+7</answer>"]
    assert cd.correct(good, [rec] * 4).tolist() == [True, True, False, False]
    # maj@k's equivalence: every valid equation reaching the target is one answer; wrong ones stay apart
    keys = [cd.vote_key(a, rec) for a in ("3*5+7", "7+5*3", "3*5+8", " 3*5+8 ", None)]
    assert keys[0] == keys[1] and keys[2] == keys[3] != keys[0] and keys[4] is None

    g = GSM8K()
    assert len({g.vote_key(a, {}) for a in ("72", "72.0", "$72", "72.", "72.00")}) == 1
    assert g.vote_key("1,234", {}) == "1234" and g.vote_key("x" * 100, {}) is None
    assert g.vote_key("0.50", {}) == "0.5" and g.vote_key("-5", {}) == "-5"


def test_countdown_held_out_excludes_training_problems():
    from rl.tasks import Countdown
    task = Countdown(train_prompts=60, min_numbers=3, max_numbers=3, max_value=6, min_target=5, max_target=12)
    train = {r["prompt"] for r in task.train_records()}
    held = task.held_out(20)
    assert len(held) == 20 and not train & {r["prompt"] for r in held}
    assert all(cd_ok for cd_ok in task.correct([f"<answer>{r['solution']}</answer>" for r in held], held))


def test_evaluate_judges_and_votes_with_the_task(monkeypatch):
    """maj@k groups answers by the task's equivalence: two different valid Countdown equations are one vote."""
    import rl.rollout
    from rl.evaluate import evaluate
    from rl.rollout import Sampling
    from rl.sampler import SampleOutput
    from rl.tasks import Countdown
    from train.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    script = ["<think>a</think> <answer>3*5+7</answer>", "<think>b</think> <answer>3*5+8</answer>",
              "<think>c</think> <answer>3*5+8</answer>", "<think>d</think> <answer>7+5*3</answer>",
              "<think>e</think> <answer>5*3+7</answer>"]

    def fake(cfg, params, prompts, prompt_lens, max_new_tokens, *args, **kw):
        ids = [(tok.encode(t) + [tok.eos_id])[:max_new_tokens] for t in script]
        rows = [i + [tok.pad_id] * (max_new_tokens - len(i)) for i in ids]
        return SampleOutput(np.asarray(rows, np.int32), np.zeros((5, max_new_tokens), np.float32),
                            np.asarray([len(i) for i in ids], np.int32), np.zeros(5, bool))

    monkeypatch.setattr(rl.rollout, "generate", fake)
    rec = {"prompt": "make 22 from 3 5 7", "numbers": [3, 5, 7], "target": 22, "answer": ""}
    m = evaluate(None, None, tok, [rec], k=5, sampling=Sampling(max_new_tokens=60), template="{prompt}",
                 batch_size=5, task=Countdown())
    assert m["pass@1"] == pytest.approx(3 / 5)
    assert m["maj@k"] == 1.0  # 3 valid equations (one class) outvote the twice-given wrong one
    # by string the wrong answer would win: the arithmetic task's integer check finds no integer at all
    assert evaluate(None, None, tok, [rec], k=5, sampling=Sampling(max_new_tokens=60), template="{prompt}",
                    batch_size=5)["maj@k"] == 0.0


# ---- Countdown's worked search (rl/tasks/countdown.py) ------------------------------------------------------------

def _countdown_steps_ok(rec, response):
    """Every written step of a worked search is a true fact (a value in 1..9, or '>9' / '<1' when it is out of that
    range), every value before the last misses the target, the last hits it, and the answer is that line's equation."""
    import re

    def holds(v, mark, w):
        return v == int(w) if mark == "=" else (v > 9 if (mark, w) == (">", "9") else v < 1 and (mark, w) == ("<", "1"))

    ops = {"+": lambda p, q: p + q, "-": lambda p, q: p - q, "*": lambda p, q: p * q, "/": lambda p, q: p / q}
    body = response[len("<think>"):response.index("</think>")]
    values, first, value = [], None, None
    for tok in body.split(" "):
        if tok.endswith(":"):  # each line restates the target
            assert tok == f"{rec['target']}:"
            continue
        m = re.fullmatch(r"(\d)([-+*/])(\d)([=<>])(\d)", tok)
        if m:
            x, op, y, mark, w = m.groups()
            x, y = int(x), int(y)
            assert {x, y} <= set(rec["numbers"]) and x >= y and holds(ops[op](x, y), mark, w)
            first, value = f"{x}{op}{y}", int(w) if mark == "=" else None
            continue
        op, z, mark, w = re.fullmatch(r"([-+*/])(\d)([=<>])(\d)", tok).groups()
        assert value is not None and int(z) in rec["numbers"] and holds(ops[op](value, int(z)), mark, w)
        if mark == "=":
            values.append(int(w))
        last = f"({first}){op}{z}"
    assert values and values[-1] == rec["target"] and rec["target"] not in values[:-1]
    assert response.endswith(f"</think> <answer>{last}</answer>")


def test_countdown_worked_search_hand_example_and_rewards():
    from rl.rewards import countdown_reward
    from rl.tasks.countdown import Countdown, countdown_search, countdown_worked
    assert countdown_worked([6, 3, 5], 4) == "<think>4: 6+3=9 -5=4</think> <answer>(6+3)-5</answer>"
    assert countdown_worked([7, 3, 6], 2) == ("<think>2: 7+3>9 2: 7-3=4 -6<1 2: 7*3>9 2: 7+6>9 2: 7-6=1 +3=4 *3=3 "
                                              "2: 7*6>9 2: 6+3=9 -7=2</think> <answer>(6+3)-7</answer>")
    assert countdown_search([1, 1, 1], 9) is None
    task = Countdown(corpus_docs=400, corpus_pool=150, reason_prob=0.5)
    docs = task.corpus()
    worked = [d for d in docs if not d["response"].startswith("<think></think>")]
    assert len(docs) == 400 and 0.4 < len(worked) / len(docs) < 0.6
    assert all(set(d) == {"prompt", "response"} for d in docs)
    recs = {r["prompt"]: r for r in task._draw(task.corpus_seed, task.corpus_pool, lambda c: c > 1)}
    fields = {"numbers": [recs[d["prompt"]]["numbers"] for d in docs],
              "target": [recs[d["prompt"]]["target"] for d in docs]}
    # every corpus response, worked or direct, is a correct and well-formed answer
    assert countdown_reward([d["response"] for d in docs], **fields) == [1.0] * len(docs)
    assert format_reward([d["response"] for d in docs]) == [1.0] * len(docs)
    assert task.correct([d["response"] for d in docs], [recs[d["prompt"]] for d in docs]).all()
    for d in worked:
        _countdown_steps_ok(recs[d["prompt"]], d["response"])


def test_countdown_corpus_prompts_and_held_out_are_disjoint():
    from rl.tasks.countdown import Countdown, problem_class
    task = Countdown(corpus_docs=300, corpus_pool=100, train_prompts=100)

    def keys(recs):
        return {(tuple(sorted(r["numbers"])), r["target"]) for r in recs}

    corpus = task._draw(task.corpus_seed, task.corpus_pool, lambda c: c > 1)
    train, held = task.train_records(), task.held_out(40)
    assert len(train) == 100 and len(held) == 40 and held == task.held_out(40)
    assert {problem_class(r["numbers"], r["target"], task.classes) for r in held} == {0}
    assert {problem_class(r["numbers"], r["target"], task.classes) for r in train} == {1}
    assert not keys(held) & keys(train) and not keys(held) & keys(corpus) and not keys(train) & keys(corpus)
    assert not {d["prompt"] for d in task.corpus()} & {r["prompt"] for r in held}
    assert task.correct([f"<answer>{r['answer']}</answer>" for r in held], held).all()
    assert all(r["difficulty"] == 3 and all(1 <= v <= 9 for v in r["numbers"]) and 1 <= r["target"] <= 9
               for r in held)
    with pytest.raises(ValueError, match="task.corpus_seed"):
        Countdown(corpus_seed=2)
    with pytest.raises(ValueError, match="task.classes"):
        Countdown(classes=2)


def test_countdown_worked_traces_are_deterministic_from_the_seed():
    from rl.tasks.countdown import Countdown, problem_class
    task = Countdown()
    a, b = task.worked(201, 12), task.worked(201, 12)
    assert a == b and len(a) == 12 and a != task.worked(202, 12)
    assert task.correct([w["response"] for w in a], a).all()
    assert all(problem_class(w["numbers"], w["target"], task.classes) > 1 for w in a)  # never held-out problems
    for w in a:
        _countdown_steps_ok(w, w["response"])
