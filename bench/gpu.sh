#!/usr/bin/env bash
# The JEM step benchmark on a GPU machine, in one command (about 3-5 minutes on one modern GPU):
#   bash bench/gpu.sh [OUT.json]
# Installs jem-tf into a virtual environment if `jem_tf` is not importable, then times WRN-10-1, WRN-28-2 and
# the paper's WRN-28-10 (batch 64, 20 SGLD steps) in float32 and mixed precision in three modes, labelled in
# each record: TensorFlow's default kernels (jit_compile false: JEM's default on every device, not Keras's
# "auto"), the SGLD loop alone under XLA (sgld_jit_compile true), and the whole train step under XLA
# (jit_compile true), and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench_gpu.json}"
if ! python -c "import jem_tf" 2>/dev/null; then
  python3 -m venv .venv-bench && . .venv-bench/bin/activate
  python -m pip install -q -e . "tensorflow[and-cuda]==2.21.*"
fi
python -c "import tensorflow as tf, sys; sys.exit(0 if tf.config.list_physical_devices('GPU') else 'no GPU visible to TensorFlow')"
python bench/run.py --models wrn-10-1 wrn-28-2 wrn-28-10 --precision float32 mixed_float16 mixed_bfloat16 \
  --repeats 5 --warmup 2 --out "${out%.json}_default.json"
python bench/run.py --models wrn-28-10 --precision float32 mixed_bfloat16 --sgld-jit-compile --skip-export \
  --repeats 5 --warmup 2 --out "${out%.json}_xla.json"
python bench/run.py --models wrn-10-1 wrn-28-10 --precision float32 mixed_bfloat16 --jit-compile --skip-export \
  --repeats 5 --warmup 2 --out "${out%.json}_xla_step.json"
python - "$out" "${out%.json}_default.json" "${out%.json}_xla.json" "${out%.json}_xla_step.json" <<'PY'
import json, sys
records = [r for path in sys.argv[2:] for r in json.load(open(path))]
json.dump(records, open(sys.argv[1], "w"), indent=2)
print(f"wrote {sys.argv[1]} ({len(records)} records)")
PY
