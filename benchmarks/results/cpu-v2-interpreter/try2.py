import os, sys, time
os.environ["TRITON_INTERPRET"] = "1"
import triton.backends as tb
from triton.backends.driver import DriverBase
class _Inactive(DriverBase):
    @classmethod
    def is_active(cls): return False
tb.backends["cpu"] = tb.Backend(compiler=None, driver=_Inactive)
from vllm_rapid.testing.tiny_model import make_tiny_llama
if __name__ == "__main__":
    p = make_tiny_llama("/tmp/v2try/m")
    from vllm import LLM, SamplingParams
    llm = LLM(str(p), max_model_len=512, kv_cache_memory_bytes=64<<20, max_num_seqs=8, seed=0)
    sp = [SamplingParams(max_tokens=16, temperature=0), SamplingParams(max_tokens=16, temperature=1.0, seed=3), SamplingParams(max_tokens=16, temperature=0.8, repetition_penalty=1.2)]
    t=time.time()
    outs = llm.generate(["Hello world", "The quick brown fox", "Serving systems"], sp)
    print("gen s", time.time()-t)
    print([o.outputs[0].token_ids for o in outs])
    r = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    print("runner", type(r).__module__, type(r).__name__)
