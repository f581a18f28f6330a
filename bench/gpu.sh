#!/usr/bin/env bash
# The prepared GPU check (issue 12): on a machine with CUDA, install the runtimes, convert the
# shipped demo model, quantise and verify it with --device cuda, run every runtime check (vLLM
# included) on the variants, run bench/quantize.py on CUDA, and print one summary line.
# Budget: well inside 10 minutes on one H200 (each step has its own timeout).
#
#   bash bench/gpu.sh [RESULTS_DIR]        # default: $OUT when set (the device tool), else a temp dir
#
# Installs go into a venv that sees the system's CUDA torch (--system-site-packages). Wheels in
# $WHEELS (default .whl/) are used offline when that folder exists; otherwise pip's index. vLLM pins
# its own torch, so it is installed only with VLLM=1 (its check then reports what happened); without
# it the vllm row says "not installed". Nothing here is run by the test suite.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RES=${1:-${OUT:-$(mktemp -d)}}
WORK=$(mktemp -d)
VENV=${GPU_VENV:-/tmp/gpu-venv}
WHEELS=${WHEELS:-.whl}
mkdir -p "$RES"
START=$(date +%s)
log() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*" >&2; }
fail() { log "FAILED: $*"; echo "gpu: FAILED ($*) after $(( $(date +%s) - START ))s; logs in $RES"; exit 1; }

command -v nvidia-smi >/dev/null && nvidia-smi -L >&2
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || fail "no CUDA device visible to python3's torch"

log "install (venv $VENV)"
python3 -m venv --system-site-packages "$VENV" || fail "venv"
PY=$VENV/bin/python
PIP=("$PY" -m pip install -q --disable-pip-version-check)
[ -d "$WHEELS" ] && PIP+=(--no-index --find-links "$WHEELS")
# the project with its runtimes extra (GPTQModel, optimum) over the system's CUDA torch;
# BUILD_CUDA_EXT=0: compiling GPTQModel's CUDA kernels would take most of the budget, so on CUDA
# it runs its Triton / torch kernels (Marlin is checked through vLLM)
BUILD_CUDA_EXT=0 timeout 240 "${PIP[@]}" --no-build-isolation -e '.[runtimes]' \
    >"$RES/install.log" 2>&1 || log "install of .[runtimes] failed (see install.log)"
if [ "${VLLM:-0}" = 1 ]; then
    timeout 300 "${PIP[@]}" vllm >>"$RES/install.log" 2>&1 || log "vllm install failed (see install.log)"
fi

log "convert the demo"
timeout 120 "$PY" -m pipeline convert recipes/demo/meta "$WORK/fp16" >"$RES/convert.log" 2>&1 \
    || fail "convert (convert.log)"

CAL='recipes/demo/text/calib/*.py'
EVAL='recipes/demo/text/eval/*.py'
VARIANTS=("q4-128g:--bits 4 --group-size 128" "q4-32g-actorder:--bits 4 --group-size 32 --act-order"
          "q8-128g:--bits 8 --group-size 128" "q3-128g:--bits 3 --group-size 128")
QUANTS=()
for v in "${VARIANTS[@]}"; do
    name=${v%%:*}
    log "quantize $name on cuda"
    # shellcheck disable=SC2086  # the option string is split on purpose
    timeout 120 "$PY" -m pipeline quantize "$WORK/fp16" "$WORK/$name" ${v#*:} --device cuda \
        --calibration "$CAL" --nsamples 128 --seqlen 512 --json >"$RES/quantize-$name.json" \
        2>"$RES/quantize-$name.log" || fail "quantize $name (quantize-$name.log)"
    QUANTS+=(--quant "$WORK/$name")
done

log "verify on cuda"
timeout 180 "$PY" -m pipeline verify --fp16 "$WORK/fp16" "${QUANTS[@]}" --eval "$EVAL" \
    --out "$WORK/verify" --seqlen 512 --device cuda --json >"$RES/verify.json" 2>"$RES/verify.log"
VERIFY_RC=$?

log "runtime checks on cuda"
timeout 240 "$PY" - "$WORK" "$EVAL" "$RES/runtimes.jsonl" "${VARIANTS[@]%%:*}" >&2 <<'EOF'
"""Every runtime of verify/runtimes.py on every variant, against our dequantised forward."""
import glob, json, sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from verify.forward import LayerwiseModel
from verify.metrics import eval_tokens, perplexity, windows
from verify.runtimes import RUNTIMES, run_runtime

work, pattern, out, names = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
texts = [Path(f).read_text() for f in sorted(glob.glob(pattern))]
W = windows(eval_tokens(AutoTokenizer.from_pretrained(work / "fp16"), texts), 512, 16)
ref = LayerwiseModel(work / "fp16", "cuda", torch.float16, progress=False)
h = ref.hidden([W])[0]
with out.open("w") as f:
    for name in names:
        m = LayerwiseModel(work / name, "cuda", torch.float16, progress=False)
        ours = perplexity(m.nll(m.hidden([W])[0], W), W.shape[1])
        for rt in RUNTIMES:
            r = run_runtime(rt, work / name, W, ppl_ours=ours, device="cuda",
                            reference=lambda b: ref.project(h[b, :-1]).cpu())
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(rt, name, r["reason"] or r["error"] or f"ppl {r['ppl']:.4f} vs ours {ours:.4f}")
EOF
RT_RC=$?

log "bench/quantize.py on cuda"
timeout 180 "$PY" bench/quantize.py --device cuda --json >"$RES/bench-quantize.json" \
    2>"$RES/bench-quantize.log"
BENCH_RC=$?

SUMMARY=$("$PY" - "$RES" "$VERIFY_RC" "$RT_RC" "$BENCH_RC" <<'EOF'
import json, sys
from collections import defaultdict
from pathlib import Path

res, verify_rc, rt_rc, bench_rc = Path(sys.argv[1]), *map(int, sys.argv[2:])
parts = []
try:
    v = json.loads((res / "verify.json").read_text())
    parts.append(f"verify passed={v['passed']} on {v['device']}")
except Exception as e:
    parts.append(f"verify rc={verify_rc} ({type(e).__name__})")
rows = defaultdict(list)
if (res / "runtimes.jsonl").is_file():
    for line in (res / "runtimes.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["runtime"]].append(r)
for rt, rs in rows.items():
    ok = sum(bool(r["passed"]) for r in rs)
    why = {r["reason"] or (r["error"] or "")[:60] for r in rs if not r["passed"]}
    parts.append(f"{rt} {ok}/{len(rs)} match" + (f" ({'; '.join(sorted(why))})" if why else ""))
if not rows:
    parts.append(f"runtimes rc={rt_rc}")
try:
    b = json.loads((res / "bench-quantize.json").read_text())
    parts.append("quantize " + ", ".join(f"{k} {r['seconds_per_layer']} s/layer" for k, r in b.items()))
except Exception as e:
    parts.append(f"bench rc={bench_rc} ({type(e).__name__})")
print(" | ".join(parts))
EOF
)
echo "gpu: $SUMMARY | $(( $(date +%s) - START ))s"
echo "gpu: $SUMMARY" >"$RES/summary.txt"
rm -rf "$WORK"
