"""R1 §4.1's comparison at laptop scale: the small dense student trained with RL directly instead of distilled.

    python -m experiments.run experiments/rl_student.py run_dir=runs/rl_student [steps=24]

Student: experiments/distill.py's dense decoder (GQA + SwiGLU, no MLA / MoE / MTP; 0.5M parameters), with a base
stage of its own: pretrained like the teacher's base on the same digit-chain corpus (30 % worked), run_dir/base.
RL: R1-Zero's GRPO recipe (experiments/r1_zero.py: task, template, rewards, G, clip, no KL) from that base.
In experiments/pipeline.py the same student base is distilled (`distill_student`: SFT on the RL teacher's verified
traces) and, here, trained with RL for the same compute: `steps` = `experiments.stages.matched_rl_steps` of the
distillation's SFT budget (training FLOPs counted over the padded tokens each side processes).
"""

import dataclasses

from experiments import r1_zero
from experiments.config import RLExperiment
from experiments.distill import dense_student


def config() -> RLExperiment:
    zero = r1_zero.config()
    return dataclasses.replace(zero, name="rl_student", model=dense_student(),
                               base=dataclasses.replace(zero.base, name="student_base"))
