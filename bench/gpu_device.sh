#!/usr/bin/env bash
# Issue 12's first GPU run in one call of the device tool (a lent, offline GPU machine with its own jax).
#
#   bash bench/gpu_device.sh prepare     # here, with pip and the registry: .whl/ <- flax + optax at the repo's pins
#   bash bench/gpu_device.sh run         # there: run(command="bash bench/gpu_device.sh run", carry=[".whl"],
#                                        #             timeout_s=570) -> $OUT/env.txt, $OUT/gpu.log, $OUT/cudnn.log
#   OUT=/tmp/o PYTHON=python bash bench/gpu_device.sh run --tiny   # the same steps at CPU smoke-test sizes
#   (BENCH_ARGS adds flags to step 2's bench.gpu, e.g. "--devices 8"; TOTAL: seconds for all steps, 540)
#
# Why: that machine reaches no package registry and runs its image's python3 (3.12) with its own jax (0.11.2 with
# the CUDA 13 plugin, read 2026-11; our pin 0.10.2 has no wheels small enough to carry) and its own flax/optax, of
# versions nobody has read. The flax/optax wheels at our pins (pure Python, ~1 MB) go first on PYTHONPATH, so only
# jax differs from CI; its 0.11 changelog removes nothing this repo calls. `run` then, in this order (the most
# wanted result first, each part under its own timeout so one hang cannot eat the call):
#   1. env.txt: versions, devices, nvidia-smi;
#   2. python -m bench.gpu (peak, dense, sampler, MoE; RESULT lines) -> gpu.log (< 5 min planned on one H200);
#   3. pytest tests/test_attention_impl.py -k cudnn: cuDNN flash attention against XLA, logits and gradients, bf16,
#      packed documents, MLA (qk 24 / v 16) and GQA -> cudnn.log (skipped where there is no GPU);
#   4. only when step 2 gave no dense figure: bench.gpu's dense part and sampler on XLA attention -> gpu_xla.log.
# Exit status: 0 when every part passed, else the first failing part's.
set -u
cd "$(dirname "$0")/.."
mode=${1:-}
shift || true

if [ "$mode" = prepare ]; then
  pin() { sed -n "s/^ *\"$1==\([^\"]*\)\".*/\1/p" pyproject.toml | head -1; }
  exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")" || exit
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  rm -rf .whl && mkdir -p .whl
  ${PYTHON:-python3} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    "flax==$(pin flax)" "optax==$(pin optax)" || exit
  ls -l .whl
  exit 0
fi
[ "$mode" = run ] || { echo "usage: bash bench/gpu_device.sh prepare | run [--tiny]" >&2; exit 2; }

tiny=${1:-}
PY=${PYTHON:-python3}
OUT=${OUT:?set OUT to the folder for the logs (the device tool sets it)}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/r1jax-site \
    .whl/*.whl || exit
  export PYTHONPATH=/tmp/r1jax-site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  $PY -c "import sys, jax, jaxlib, flax, optax, numpy; print('python', sys.version.split()[0], '| jax', jax.__version__,
'| jaxlib', jaxlib.__version__, '| flax', flax.__version__, flax.__file__, '| optax', optax.__version__,
'| numpy', numpy.__version__); print('backend', jax.default_backend(), jax.devices())"
  nvidia-smi 2>&1 | head -20
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# each part gets its own limit, cut to what is left of TOTAL (the device call's timeout_s less a margin)
left() { local l=$(( ${TOTAL:-540} - SECONDS )); [ "$l" -lt "$1" ] && echo $(( l > 10 ? l : 10 )) || echo "$1"; }
status=0
timeout "$(left 420)" $PY -m bench.gpu $tiny ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu.log"
rc=${PIPESTATUS[0]}; [ $status -ne 0 ] || status=$rc

# the suite's conftest defaults to 8 fake CPU devices at -O1: here the real backend, one process, no flags
JAX_PLATFORMS= XLA_FLAGS= timeout "$(left 100)" $PY -m pytest -q -n 0 -p no:cacheprovider \
  tests/test_attention_impl.py -k cudnn 2>&1 | tee "$OUT/cudnn.log"
rc=${PIPESTATUS[0]}; [ $status -ne 0 ] || status=$rc

# no dense figure (cuDNN refused, say): the dense part and the sampler again on XLA's attention, if time is left
if ! grep -q '^RESULT gpu_dense_tok_s=' "$OUT/gpu.log" && [ $(( ${TOTAL:-540} - SECONDS )) -gt 120 ]; then
  timeout "$(left 240)" $PY -m bench.gpu $tiny --parts dense,sampler --attention-impl xla 2>&1 | tee "$OUT/gpu_xla.log"
fi
echo "# gpu_device.sh: exit $status after ${SECONDS} s"
exit $status
