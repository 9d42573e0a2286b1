#!/usr/bin/env bash
# The CUDA path end to end, for a machine with an NVIDIA GPU (under 8 minutes on one H100; nothing here runs in
# the CPU suite).  Prints and writes to $OUT (default /tmp/gpu_check):
#   gpu.txt      nvidia-smi's name, memory and driver
#   engine.json  `helios-ray bench engine` on CUDA (our engine vs transformers generate(), batch 1 and 16)
#   serve.json   a short `helios-ray serve` of deployments/helios-gpu.yaml - both groups on the one GPU (half a GPU
#                and 0.4 of its memory each) - after 48 streamed chat and code requests: each replica's placement,
#                tokens and NVML energy per token (status), and the requests' outcome
# Usage: bash scripts/gpu_check.sh   (after the README's setup command; HELIOS_API_KEY unset: loopback only)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
unset HELIOS_API_KEY HELIOS_ADMIN_KEY || true

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, torch.version.cuda)"

echo "== engine bench on CUDA (~2 min)"
timeout 300 "$PY" -m helios_ray.cli bench engine --model smollm2-135m --batches 1,16 --requests 16 \
  --max-output-tokens 64 --dtype auto --json > "$OUT/engine.json"
"$PY" -c "import json; r = json.load(open('$OUT/engine.json'));
[print(f\"batch {x['batch']}: engine {x['engine_tokens_per_s']} tok/s, generate() {x['transformers_tokens_per_s']}, \"
       f\"{x['ratio_engine_over_transformers']}x, agreement {x['token_agreement_with_transformers']:.1%}\") for x in r['runs']]"

echo "== serve deployments/helios-gpu.yaml on one GPU (~3 min)"
"$PY" - "$OUT/helios-gpu-1.yaml" <<'EOF'
import sys, yaml
cfg = yaml.safe_load(open("deployments/helios-gpu.yaml"))
args = cfg["applications"][0]["args"]
for g in args["groups"]:  # both groups share the one GPU
    g["replica_num_gpus"] = 0.5
args["replica_num_gpus"] = 0.5
args["engine"]["gpu_memory_fraction"] = 0.4
cfg["http_options"]["port"], cfg["grpc_options"]["port"] = 8765, 9765
yaml.safe_dump(cfg, open(sys.argv[1], "w"), sort_keys=False)
EOF
"$PY" -m helios_ray.cli serve "$OUT/helios-gpu-1.yaml" --ready-timeout 240 > "$OUT/serve.log" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null || true; wait $SERVE 2>/dev/null || true' EXIT
timeout 300 "$PY" - "$OUT/serve.json" <<'EOF'
import concurrent.futures as cf, json, sys, time
import httpx
base = "http://127.0.0.1:8765"
deadline = time.time() + 270
while time.time() < deadline:
    try:
        st = httpx.get(f"{base}/v1/helios/status", timeout=5).json()
        if len(st.get("replicas") or []) >= 2:
            break
    except Exception:
        pass
    time.sleep(2)
else:
    sys.exit("the GPU deployment did not report two replicas in time (see serve.log)")
def one(i):
    chat = i % 2 == 0
    body = {"model": "helios", "max_tokens": 64, "temperature": 0}
    body.update({"messages": [{"role": "user", "content": f"Explain in two sentences why the sky is blue ({i})."}]}
                if chat else {"prompt": f"def fibonacci_{i}(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"})
    r = httpx.post(f"{base}/v1/{'chat/completions' if chat else 'completions'}", json=body, timeout=120)
    return r.status_code, (r.json().get("usage") or {}).get("completion_tokens", 0)
t0 = time.time()
with cf.ThreadPoolExecutor(16) as pool:
    res = list(pool.map(one, range(48)))
wall = time.time() - t0
time.sleep(6)  # one telemetry period: energy per token is reported every few seconds
st = httpx.get(f"{base}/v1/helios/status", timeout=10).json()
reps = [{k: r.get(k) for k in ("group", "model", "depth", "device", "tokens_out", "energy_j_per_token")}
        for r in st.get("replicas") or []]
out = {"requests": len(res), "ok": sum(s == 200 for s, _ in res), "tokens": sum(n for _, n in res),
       "tokens_per_s": round(sum(n for _, n in res) / wall, 1), "replicas": reps}
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out, indent=2))
if out["ok"] != out["requests"]:
    sys.exit("some requests failed")
if not any(r["energy_j_per_token"] for r in reps):
    sys.exit("no NVML energy per token reported")
EOF
echo "gpu_check: done; results in $OUT"
