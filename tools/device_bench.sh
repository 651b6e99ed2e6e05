#!/usr/bin/env bash
# Quire's large benchmarks on a lent GPU machine (docs/lab/corpus-cache-and-sparse-attention.md, "Session 5").
#
# The machine starts bare and reaches no network; each call of the workplace's
# `device` tool sends the working tree plus at most 64 MiB of ignored folders, so
# the model GGUF travels in parts (.c1 … .c8, made by `split`), the wheels the image
# lacks in .whl and the haystack archive in .dev. Long jobs run detached (setsid),
# so one call can start them and later calls read their logs and collect results.
#
#   tools/device_bench.sh setup            wheels, haystack, a copy of the repo, part .c1
#   tools/device_bench.sh part N           move part .cN aside
#   tools/device_bench.sh tests            the torch/corpus suites on CUDA, detached
#   tools/device_bench.sh model            join the parts, check the GGUF's sha256
#   tools/device_bench.sh run NAME CMD…    a detached job: quire CMD…, log and JSON under $W
#                                          (as python -m bench.cli: the copy is not pip-installed)
#   tools/device_bench.sh queue            tools/device_jobs.sh's jobs, one after another, detached
#   tools/device_bench.sh status           jobs, logs' tails, GPU and disk
#   tools/device_bench.sh collect          results and logs into $OUT
set -u
W=/root/quire-work
export QUIRE_HOME=$W/home PYTHONPATH=$W/repo:$W/site PYTHONUNBUFFERED=1
step=${1:-status}
shift || true
case "$step" in
setup)
    mkdir -p "$W/parts" "$W/out" "$W/logs" "$W/repo" "$W/home/models/gguf"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" .whl/*.whl
    tar --exclude=./.c? --exclude=./.dev --exclude=./.whl --exclude=./.git -cf - . | tar -C "$W/repo" -xf -
    [ -d "$W/haystack-10m" ] || tar -C "$W" -xJf .dev/haystack-10m.tar.xz
    mv .c1/* "$W/parts/" 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
    df -h / "$W" | cat; free -g; nproc; ls "$W/haystack-10m" | wc -l; ls -la "$W/parts"
    ;;
part)
    mv ".c$1"/* "$W/parts/" && ls -la "$W/parts" | tail -2
    ;;
tests)
    [ $# -gt 0 ] || set -- tests/test_torch_models.py tests/test_generate.py tests/corpus
    cd "$W/repo" && setsid nohup python3 -m pytest -q -p no:cacheprovider "$@" >>"$W/logs/tests.log" 2>&1 </dev/null &
    sleep 2; echo started tests
    ;;
model)
    gguf=$W/home/models/gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    cat "$W"/parts/part.* >"$gguf" && rm -f "$W"/parts/part.*
    sha256sum "$gguf"
    cd "$W/repo" && time python3 -c "import sys; from engine.model_store import convert_gguf; from engine.paths import models_dir
convert_gguf(sys.argv[1], models_dir() / 'qwen2.5-coder-0.5b-instruct')" "$gguf"
    ;;
run)
    name=$1
    shift
    printf -v command '%q ' "$@"
    cd "$W/repo" && setsid nohup bash -c "time python3 -m bench.cli $command" >"$W/logs/$name.log" 2>&1 </dev/null &
    sleep 2; echo "started $name"
    ;;
queue)
    cd "$W/repo" && setsid nohup bash -c "W=$W; source tools/device_jobs.sh" >>"$W/logs/queue.log" 2>&1 </dev/null &
    sleep 2; echo started queue
    ;;
status)
    ps -eo pid,etime,args | grep -E "pytest|bench.cli" | grep -v grep | cut -c1-150
    for log in "$W"/logs/*.log; do echo "== $log"; tail -c 1500 "$log"; echo; done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    df -h "$W" | tail -1; free -g | head -2; ls -la "$W/out"
    ;;
collect)
    cp "$W"/out/*.json "$OUT/" 2>/dev/null
    tar -C "$W" -czf "$OUT/logs.tar.gz" logs
    ls -la "$OUT"
    ;;
*)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac
