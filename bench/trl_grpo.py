"""TRL's `GRPOTrainer` doing bench/grpo.py's iteration: the peer of issue 15's GRPO goal (≥ 2× faster than TRL).

    python -m bench.trl_grpo [--iters 2] [--prompts 16 --generations 8 --new 64 --mu 2 --mini-batches 2 --beta 0.04]
    python -m bench.grpo --trl ...        # ours and TRL's in one run, with the ratio

The same iteration as `bench.grpo` with the same arguments: model `small_qwen2(vocab_size=512)` as transformers'
Qwen2ForCausalLM (`bench.peers.hf_model`, random weights, float32, saved to a temporary directory that TRL loads the
policy and its reference from), the same prompts (the synthetic arithmetic source in bench.grpo's short template),
the byte tokenizer with our ids (an HF fast tokenizer built from `train.tokenizer.ByteTokenizer`), group size,
completion length (stopping at <eos> or </answer>, as our sampler stops at the answer's end), β, μ
(`num_iterations`) and mini-batches (`steps_per_generation`; `per_device_train_batch_size` = batch / mini-batches),
our two rewards (format + accuracy from `rl.rewards`), Dr. GRPO's loss with clip 0.2 / 0.28, on the CPU with
transformers' `generate` (no vLLM). One iteration = one generation round = μ × mini-batches optimizer steps, timed
by a `TrainerCallback` at the round's last step; the first round (warm-up) is not counted.

Prints the CPU, the per-round times and `RESULT trl_iteration_s=<median>`.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: see bench/common.py

import argparse
import statistics
import tempfile
import time

from bench.common import command, header, n_cpus


def byte_tokenizer_hf():
    """transformers' fast tokenizer with `ByteTokenizer`'s ids: bytes 0-255, <pad> 256, <bos> 257, <eos> 258, the
    four tags 259-262 (matched in text, as ours)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from train.tokenizer import TAGS, ByteTokenizer
    # GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer and decoder use
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    byte_char = {b: chr(b if b in printable else next(extra)) for b in range(256)}
    tok = Tokenizer(models.BPE(vocab={byte_char[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    ours = ByteTokenizer()
    tok.add_special_tokens(list(ByteTokenizer.CONTROL))
    tok.add_tokens(list(TAGS))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    sample = "<think>1+2=3</think> <answer>3</answer>"
    assert hf.encode(sample, add_special_tokens=False) == ours.encode(sample), "byte tokenizer ids differ"
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (ours.pad_id, ours.bos_id, ours.eos_id)
    return hf


def time_trl(args, template: str) -> dict:
    """TRL's GRPOTrainer on bench.grpo's iteration -> {'rounds': [s per counted round], 'median': s}."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.peers import hf_model
    from model.config import small_qwen2
    from rl.rewards import REWARDS
    from rl.tasks.arithmetic import synthetic_example

    torch.set_num_threads(n_cpus())
    batch = args.prompts * args.generations
    if batch % args.mini_batches:
        raise ValueError(f"--mini-batches {args.mini_batches} must divide the batch {batch}")
    steps_per_round = args.mu * args.mini_batches
    tmp = tempfile.mkdtemp(prefix="trl_grpo_")
    tokenizer = byte_tokenizer_hf()
    model = hf_model(small_qwen2(vocab_size=512, n_layers=args.layers), train=True)
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</answer>")]  # as our sampler's stop
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    rows = [synthetic_example(0, i) for i in range(args.prompts * (args.iters + 1))]
    data = datasets.Dataset.from_list([{"prompt": "<bos>" + template.format(prompt=r["prompt"]), "answer": r["answer"]}
                                       for r in rows])

    def reward(name):
        def fn(prompts, completions, answer, **kw):
            return [float(x) for x in REWARDS[name](completions, answer=answer)]
        fn.__name__ = name
        return fn

    class Rounds(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, a, state, control, **kw):
            self.marks.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            if state.global_step % steps_per_round == 0:
                self.marks.append(time.perf_counter())

    cfg = GRPOConfig(
        output_dir=tmp, use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=10**6,
        disable_tqdm=True, seed=0, learning_rate=1e-6, max_steps=steps_per_round * (args.iters + 1),
        per_device_train_batch_size=batch // args.mini_batches, gradient_accumulation_steps=1,
        steps_per_generation=args.mini_batches, num_generations=args.generations, num_iterations=args.mu,
        max_completion_length=args.new, temperature=1.0, top_p=1.0, beta=args.beta, loss_type="dr_grpo",
        scale_rewards="none", epsilon=0.2, epsilon_high=0.28, shuffle_dataset=False, dataloader_num_workers=0,
        generation_kwargs={"eos_token_id": stop, "pad_token_id": tokenizer.pad_token_id})
    clock = Rounds()
    trainer = GRPOTrainer(model=tmp, reward_funcs=[reward("format"), reward("accuracy")], args=cfg,
                          train_dataset=data, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    rounds = [b - a for a, b in zip(clock.marks, clock.marks[1:])][1:]
    return {"rounds": rounds, "median": statistics.median(rounds)}


def main(argv=None):
    from bench.grpo import SHORT_TEMPLATE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=2, help="timed rounds (after one warm-up round)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--mu", type=int, default=2)
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6, help="small_qwen2's depth")
    args = ap.parse_args(argv)
    header("bench.trl_grpo", torch=True)
    out = time_trl(args, SHORT_TEMPLATE)
    print("TRL GRPOTrainer rounds (s): " + ", ".join(f"{r:.2f}" for r in out["rounds"]))
    print(command("bench.trl_grpo", argv))
    print(f"RESULT trl_iteration_s={out['median']:.3f}")


if __name__ == "__main__":
    main()
