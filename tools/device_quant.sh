#!/usr/bin/env bash
# Quantised weights on a lent CUDA GPU (issue 28), in one call of the `device` tool:
#
#   carry: .whl (gguf, platformdirs, snowballstemmer, rank-bm25 wheels) and .dev
#   (model headers cut by `tools/synthetic_gguf.py SOURCE --head-only .dev/NAME.head.gguf`:
#   qwen05 = Qwen2.5-Coder-0.5B Q4_K_M, ds7b = DeepSeek-R1-Distill-Qwen-7B Q4_K_M).
#
# 1. tests/test_quant.py on CUDA (the CUDA layouts against float matmuls);
# 2. tools/quant_kernels.py: int4, int8 and bf16 on a 7B's shapes at 1-2048 rows;
# 3. `quire bench runtime` on synthetic GGUFs (real header and shapes, random weights,
#    since the weights cannot travel): the 0.5B quantised and bf16, then the 7B.
# Each step has its own time limit; results land in $OUT as they finish. Arguments
# pick steps (tests kernels qwen05 ds7b); none: all.
set -u
STEPS=" ${*:-tests kernels qwen05 ds7b} "
want() { [[ $STEPS == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 QUIRE_HOME=/tmp/quire-home
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
G=/tmp/gguf
mkdir -p "$G" "$QUIRE_HOME/models"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
nproc; free -g | head -2

step() { echo "== $1 $(date +%T)"; }
want tests && step tests && timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_quant.py 2>&1 | tail -15 | tee "$OUT/tests.log"
if want kernels; then
    step kernels
    timeout 120 python3 tools/quant_kernels.py --device cuda --out "$OUT/kernels-cuda.json" >"$OUT/kernels.log" 2>&1
    tail -20 "$OUT/kernels.log"
fi

convert() {  # NAME: the header in .dev -> a synthetic GGUF -> a converted folder
    python3 tools/synthetic_gguf.py ".dev/$1.head.gguf" "$G/$1-syn.gguf" &&
        python3 -c "import sys, time; from engine.model_store import convert_gguf
t = time.time(); convert_gguf(sys.argv[1], sys.argv[2], sha256='synthetic'); print('converted in %.1f s' % (time.time() - t))" \
            "$G/$1-syn.gguf" "$QUIRE_HOME/models/$1-syn"
}
bench() {  # NAME OUTFILE LIMIT [ARGS...]
    name=$1 out=$2 limit=$3
    shift 3
    timeout "$limit" python3 -m bench.cli bench runtime --model "$QUIRE_HOME/models/$name-syn" --no-reference \
        --no-llama-cpp --no-quality --out "$OUT/$out" "$@" >"$OUT/$out.log" 2>&1
    echo "rc $?"
    tail -c 1500 "$OUT/$out.log"
}
if want qwen05; then
    step qwen05
    timeout 90 bash -c "$(declare -f convert); convert qwen05"
    bench qwen05 rt-qwen05-cuda.json 150 --lengths 512 2048 8192
fi
if want ds7b; then
    step ds7b
    timeout 150 bash -c "$(declare -f convert); convert ds7b"
    rm -f "$G/ds7b-syn.gguf"  # bf16 then dequantises the converted folder (not the GGUF)
    bench ds7b rt-ds7b-quantised-cuda.json 150 --lengths 512 2048 8192 --dtype quantised
    bench ds7b rt-ds7b-bf16-cuda.json 180 --lengths 512 2048 8192 --dtype bfloat16
fi
step done
nvidia-smi --query-gpu=memory.used --format=csv,noheader
