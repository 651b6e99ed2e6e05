# The benchmark jobs of one GPU lease, run one after another by
# `tools/device_bench.sh queue` (detached); each writes its JSON under $W/out and
# its log under $W/logs. Ordered by what only a GPU can measure here.
H=$W/haystack-10m
job() {
    name=$1
    shift
    echo "== $name start $(date +%T)"
    (time python3 -m bench.cli "$@") >"$W/logs/$name.log" 2>&1
    echo "== $name end rc=$? $(date +%T)"
}
job scale-int4 bench scale --haystack "$H" --lengths 131072 1048576 10485760 --precision int4 --out "$W/out/scale-gpu-int4.json"
job niah-int4 bench niah --haystack "$H" --lengths 131072 1048576 --needles 5 --baselines --precision int4 --out "$W/out/niah-gpu-int4.json"
job niah-int8 bench niah --haystack "$H" --lengths 131072 1048576 --needles 5 --baselines --out "$W/out/niah-gpu-int8.json"
