"""bf16 vs fp32 on this CPU, side by side (A-B-B-A): teacher-forced top-1 agreement and engine throughput.

Run: PYTHONPATH=. python scripts/bf16_vs_fp32.py   (SmolLM2-135M, 1 thread, batch 8, 32-token outputs)
Without bf16 units (AVX512-BF16/AMX) torch emulates bf16 matmuls through fp32, which is why dtype auto keeps fp32.
"""
import time, torch, json
torch.set_num_threads(1)
from helios_ray.models.early_exit import load_model
from helios_ray.engine.engine import LLMEngine, EngineConfig
from helios_ray.engine.sequence import SamplingParams
from helios_bench.engine_bench import sharegpt_requests, agreement
f32 = load_model("smollm2-135m", exits="shared", dtype="float32")
b16 = load_model("smollm2-135m", exits="shared", dtype="bfloat16")
# teacher-forced agreement
Q=["What is the capital of France?","Write a haiku about the sea.","Explain recursion in one sentence.","List three uses of copper and why it is chosen for each."]
same=total=0
for q in Q:
    ids=f32.encode(messages=[{"role":"user","content":q}])
    cont=[t.token for t in f32.generate_stream(ids,48)]
    seq=torch.tensor([ids+cont]); pos=torch.arange(seq.shape[1])[None]
    a=f32.forward_exit(seq,pos,f32.new_cache(),last_only=False)[0,len(ids)-1:-1].argmax(-1)
    b=b16.forward_exit(seq,pos,b16.new_cache(),last_only=False)[0,len(ids)-1:-1].float().argmax(-1)
    same+=int((a==b).sum()); total+=a.numel()
print("teacher-forced top-1 agreement bf16 vs fp32:", same, "/", total, round(same/total,4), flush=True)
reqs = sharegpt_requests(f32, 8, 0, 256, 32)
def run(m):
    eng=LLMEngine(m, EngineConfig(memory_budget=2<<30, max_num_seqs=8))
    seqs=[eng.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)) for p,n in reqs]
    t=time.perf_counter()
    while eng.scheduler.has_work: eng.step()
    return time.perf_counter()-t, [s.output_ids for s in seqs]
run(f32); run(b16)
ts={"f32":[], "b16":[]}; outs={}
for k in ["f32","b16","b16","f32"]:
    dt,o=run(f32 if k=="f32" else b16); ts[k].append(dt); outs[k]=o
n=sum(n for _,n in reqs)
print(json.dumps({"tokens":n, "fp32_tok_s": round(n/(sum(ts['f32'])/2),2), "bf16_tok_s": round(n/(sum(ts['b16'])/2),2),
  "bf16_over_fp32": round(sum(ts['f32'])/sum(ts['b16']),3), "greedy_agreement_bf16_vs_fp32_engine": round(agreement(outs['b16'],outs['f32']),4), "per_run_s": ts}))
