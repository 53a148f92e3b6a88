"""The digit-chain task (rl/tasks.py): answers, the fixed-distance layout that makes steps learnable, the
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
