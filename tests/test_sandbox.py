"""The scoring sandbox: hostile answers through every reward and reasoning-gym task we expose, and the audit hook
itself (scorers that evaluate answers, write files, spawn processes, open sockets, import or call native code)."""

import os
import subprocess
import sys
import time

import pytest

from rl import rewards as R
from rl.reward_inputs import SandboxError
from rl.sandbox import _Worker, _worker
from rl.verifiers import TESTED_TASKS

TIMEOUT = 1.0  # per item
BOUND = 2.5  # per call: the item deadline plus a possible worker restart's slack


def ans(s: str) -> str:
    return f"<think>x</think> <answer>{s}</answer>"


def hostile_answers(canary: str) -> dict[str, list[str]]:
    """Answers that try to create `canary`, by family."""
    w = f"open('{canary}', 'w').write('x')"
    return {
        "sympy string re-parse": [f'sin("{w}")', f'Matrix(["{w}"])',
                                  f"Symbol('x') + cos(\"exec(\\\"{w}\\\")\")",
                                  f'Integer(1) + Rational("{w}")', f"3! + sqrt(\"{w}\")", f'Function("f")("{w}")'],
        "key=/default= callables": [f"max([\"{w}\"], key=exec)", f"min([], default=exec(\"{w}\"))",
                                    f"max([\"{w}\"], key=eval)", f"sorted([\"{w}\"], key=exec)",
                                    f"Matrix(1, 1, lambda i, j: {w})"],
        "attribute chains": ["().__class__.__bases__[0].__subclasses__()", f"(1).real.__class__('{w}')",
                             "Integer(1).func.__globals__", f"sin.func(\"{w}\")", "x.y.z('1')"],
        "unicode look-alikes": [f'ｅｘｅｃ("{w}")', f'𝐞𝐱𝐞𝐜("{w}")', f'ᵉxec("{w}")', f"ｏｐｅｎ('{canary}', 'w')",
                                f"max([\"{w}\"], ｋｅｙ=ｅｘｅｃ)"],
        "format-string tricks": ["'{0.__class__}'.format(1)", f"f'{{{w}}}'", f"'%s' % exec(\"{w}\")",
                                 f"'{{}}'.format(exec(\"{w}\"))", f'"{{x}}" if exec("{w}") else 1'],
        "plain code": [f'exec("{w}")', f"__import__('os').system('touch {canary}')", w, f"3! + {w}",
                       f"(lambda: {w})()", f"[x for x in [{w}]]", f"(y := {w})", f"\\boxed{{{w}}}",
                       f"sympify(\"{w}\")", f"lambdify(x, \"{w}\")(1)"],
    }


@pytest.fixture(scope="module")
def rewards():
    tasks = {name: R.ReasoningGymReward(name, size=5, seed=0, timeout=TIMEOUT) for name in TESTED_TASKS}
    out = {"format": R.format_reward, "accuracy": R.accuracy_reward,
           "arithmetic": lambda c, **kw: R.arithmetic_reward(c, allow_pow=True, **kw),
           "countdown": R.countdown_reward, "math_verify": R.MathVerifyReward(timeout=TIMEOUT),
           **{f"reasoning_gym:{name}": r for name, r in tasks.items()}}
    assert out["math_verify"].warmup()  # one worker, with every dataset loaded, before the timed calls
    return out, tasks


def test_hostile_answers_through_every_reward(tmp_path, rewards):
    fns, tasks = rewards
    canary = tmp_path / "canary"
    families = hostile_answers(str(canary))
    assert sum(map(len, families.values())) >= 30
    for family, answers in families.items():
        for a in answers:
            comps = [ans(a), a, f"<think>{a}</think> <answer>1</answer>"]
            for name, fn in fns.items():
                batch = {"answer": "98765", "numbers": [1, 2, 3], "target": 6}  # no hostile text contains the gold
                if name.startswith("reasoning_gym:"):
                    batch["entry"] = tasks[name.split(":")[1]].dataset[0]
                _worker().warmup()  # a restart after a killed item happens outside the timed region
                t0 = time.monotonic()
                out = fn(comps, **batch)
                elapsed = time.monotonic() - t0
                assert elapsed < BOUND, (family, name, a, elapsed)
                assert len(out) == 3 and all(0.0 <= v <= 1.0 for v in out), (family, name, a)
                assert out[0] <= 0.1 or name == "format", (family, name, a, out)  # no hostile answer is credited
                assert not canary.exists(), (family, name, a)


def test_own_arithmetic_scorers_match_reasoning_gym(rewards):
    _, tasks = rewards
    import reasoning_gym

    for name in ("countdown", "puzzle24"):
        r = tasks[name]
        ds = reasoning_gym.create_dataset(name, size=5, seed=0)
        for e in ds:
            for a in (e["answer"], "1 + 2", "", e["answer"] + " + 0"):
                assert r([ans(a)], entry=e) == [ds.score_answer(a, e)], (name, a)


@pytest.fixture(scope="module")
def hostile():
    names = ("evaluate", "write", "shell", "fork", "connect", "import_new", "native", "sleep", "burn", "length")
    scorers = {n: R.SandboxedReward(f"hostile_scorers:{n}", fields=("path",), timeout=TIMEOUT) for n in names}
    assert scorers["length"].warmup()
    return scorers


def test_hook_refuses_a_scorer_that_evaluates_the_answer(tmp_path, hostile):
    canary = tmp_path / "canary"
    w = _worker()
    assert hostile["length"]([ans("abcd")], path=str(canary)) == [4.0]  # the sandbox still scores
    for a in (f"open('{canary}', 'w').write('x')", f"exec(\"open('{canary}', 'w')\")",
              f"__import__('os').system('touch {canary}')", f"max(['open(\"{canary}\", \"w\")'], key=exec)"):
        before = len(w.violations)
        assert hostile["evaluate"]([ans(a)], path=str(canary)) == [0.0], a
        assert len(w.violations) > before and w.violations[-1].startswith("compile"), (a, w.violations[-3:])
    assert hostile["evaluate"]([ans("[1, 2] + [3]")], path=str(canary)) == [1.0]  # plain literals still evaluate
    assert not canary.exists()


@pytest.mark.parametrize("scorer,event", [("write", "open"), ("shell", "os.system"), ("fork", "os.fork"),
                                          ("connect", "socket."), ("import_new", "import"),
                                          ("native", "ctypes.")])
def test_hook_refuses_side_effects(tmp_path, hostile, scorer, event):
    canary = tmp_path / "canary"
    w = _worker()
    before = len(w.violations)
    assert hostile[scorer]([ans("x")], path=str(canary)) == [0.0]
    assert any(v.startswith(event) for v in w.violations[before:]), (scorer, w.violations[before:])
    assert not canary.exists()


def test_time_budgets(hostile):
    w = _worker()
    # Per batch: 6 items of 0.4 s with a 1 s budget return in about a second; the items past it score 0.0.
    r = R.SandboxedReward("hostile_scorers:sleep", fields=("path",), timeout=TIMEOUT, batch_timeout=1.0)
    t0 = time.monotonic()
    out = r([ans(f"0.4{'0' * i}") for i in range(6)], path="-")
    assert time.monotonic() - t0 < 1.6 and out[:2] == [1.0, 1.0] and out[-1] == 0.0, out
    # Per item, inside C code: the CPU limit (soft timeout + 1 s) stops the worker long before the 8 s deadline.
    assert w.warmup()
    t0 = time.monotonic()
    assert w.request(("call", "hostile_scorers:burn", ("8", "-"), 0.3), 8.0) is None
    assert time.monotonic() - t0 < 4.0
    assert hostile["length"]([ans("ab")], path="-") == [2.0]  # restarted and sealed again


def test_a_limit_that_cannot_be_set_is_an_error():
    # In a fresh interpreter (sealing is for good): make one setrlimit fail, seal must raise, and no hook is left.
    code = ("import resource, sys\n"
            "from rl import sandbox_policy as P\n"
            "real = resource.setrlimit\n"
            "def fail(which, lim):\n"
            "    if which == resource.RLIMIT_NPROC: raise OSError('refused')\n"
            "    real(which, lim)\n"
            "resource.setrlimit = fail\n"
            "try:\n"
            "    P.seal(mem_bytes=4 << 30)\n"
            "except P.SandboxSetupError as e:\n"
            "    print('refused:', e, P._state['sealed'])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "refused: cannot set RLIMIT_NPROC to 0: refused False", out.stderr[-2000:]


def test_a_worker_that_cannot_set_up_raises():
    w = _Worker(startup_timeout=60)
    w.register("modules", "no_such_scorer_module")
    try:
        with pytest.raises(SandboxError, match="no_such_scorer_module"):
            w.warmup()
    finally:
        w.close()


def test_worker_environment_is_scrubbed(hostile, monkeypatch):
    w = _worker()
    assert w.warmup()
    pid = w._proc.pid
    assert os.getpgid(pid) == pid  # its own process group
    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    assert not any(e.startswith((b"AWS", b"HF_", b"GITHUB", b"CI=")) for e in env)
    assert os.readlink(f"/proc/{pid}/cwd").startswith("/tmp")
