"""Old prefill-first steps vs chunked-prefill mixed steps: decode speed side by side (A-B-B-A), batch 1 and 16.

Run: PYTHONPATH=. python scripts/chunked_vs_old_decode.py   (SmolLM2-135M fp32, 1 thread, ShareGPT prompts)
"""
import time, torch, json, sys
torch.set_num_threads(1)
from helios_ray.models.early_exit import load_model
from helios_ray.engine.engine import LLMEngine, EngineConfig
from helios_ray.engine.sequence import SamplingParams
from helios_bench.engine_bench import sharegpt_requests, agreement
m = load_model("smollm2-135m", exits="shared", dtype="float32")
res={}
for B in (1, 16):
    reqs = sharegpt_requests(m, B if B>1 else 2, 0, 256, 32 if B>1 else 24)
    def run(chunked):
        eng=LLMEngine(m, EngineConfig(memory_budget=2<<30, max_num_seqs=B, chunked_prefill=chunked, **({} if chunked else {"max_num_batched_tokens": 2048})))
        seqs=[eng.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)) for p,n in reqs]
        t=time.perf_counter(); dec=0.0; nd=0
        while eng.scheduler.has_work:
            eng.step()
            st=eng.totals.recent[-1]
            if not st.prefill: dec+=st.seconds; nd+=1
        return time.perf_counter()-t, dec/max(1,nd), [s.output_ids for s in seqs]
    run(True); run(False)
    ts={True:[],False:[]}; ds={True:[],False:[]}; outs={}
    for c in [False, True, True, False]:
        dt,d,o=run(c); ts[c].append(dt); ds[c].append(d); outs[c]=o
    n=sum(n for _,n in reqs)
    res[B]={"tokens":n,"old_tok_s":round(n/(sum(ts[False])/2),2),"new_tok_s":round(n/(sum(ts[True])/2),2),
            "new_over_old":round(sum(ts[False])/sum(ts[True]),3),
            "decode_step_ms_old":round(1e3*sum(ds[False])/2,1),"decode_step_ms_new":round(1e3*sum(ds[True])/2,1),
            "agreement":agreement(outs[True],outs[False])}
    print(B, json.dumps(res[B]), flush=True)
