"""Runs inside vLLM's own venv (tests/engines.py finds it): one engine start, then every adapter of a job.

Job (JSON file, argv[1]): {"model", "max_lora_rank", "prompts": [[token ids]], "max_tokens",
"serve": [{"name", "path"}], "check": [{"name", "path"}], "last": {"name", "path"} | null}.
- ``serve``: generated greedily through LoRARequest; the tokens and the logprob of each chosen token are
  returned (``__base__``: no adapter).
- ``check``: vLLM's own load-time validation (PEFTHelper.from_local_dir + validate_legal against this engine's
  LoRAConfig: the calls its worker makes before reading any weight), without the engine: in the offline engine
  a refused adapter kills the engine, so each refusal would cost a restart.
- ``last``: loaded in the engine after everything else, to record what a refusal does to it.
Output: one JSON line on stdout {"results": {name: {"loaded", "error", "tokens", "logprobs", "engine_alive"}}}.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def start(job: dict[str, Any]) -> Any:
    from vllm import LLM

    return LLM(
        model=job["model"],
        enable_lora=True,
        max_lora_rank=job["max_lora_rank"],
        max_loras=1,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="float32",
        max_model_len=64,
        max_num_seqs=4,
        seed=0,
    )


def generate(llm: Any, job: dict[str, Any], lora: Any) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], logprobs=1, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    tokens, logprobs = [], []
    for out in outputs:
        seq = out.outputs[0]
        tokens.append(list(seq.token_ids))
        logprobs.append([step[tok].logprob for step, tok in zip(seq.logprobs, seq.token_ids, strict=True)])
    return {"loaded": True, "error": "", "tokens": tokens, "logprobs": logprobs}


def check(job: dict[str, Any], path: str) -> dict[str, Any]:
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    try:
        helper = PEFTHelper.from_local_dir(path, None)
        helper.validate_legal(LoRAConfig(max_lora_rank=job["max_lora_rank"]))
    except ValueError as exc:
        return {"loaded": False, "error": str(exc).splitlines()[0][:500]}
    return {"loaded": True, "error": ""}


def main() -> None:
    from vllm.lora.request import LoRARequest

    with open(sys.argv[1]) as f:
        job = json.load(f)
    results: dict[str, Any] = {item["name"]: check(job, item["path"]) for item in job["check"]}
    llm = start(job)
    results["__base__"] = generate(llm, job, None)
    items = [*job["serve"], *([job["last"]] if job.get("last") else [])]
    for i, item in enumerate(items, start=1):
        try:
            results[item["name"]] = generate(llm, job, LoRARequest(item["name"], i, item["path"]))
        except Exception as exc:  # a refusal: ValueError, RuntimeError or EngineDeadError
            results[item["name"]] = {"loaded": False, "error": f"{exc.__class__.__name__}: {exc}"[:500]}
            try:
                generate(llm, job, None)
                results[item["name"]]["engine_alive"] = True
            except Exception as dead:
                results[item["name"]]["engine_alive"] = False
                results[item["name"]]["engine_error"] = dead.__class__.__name__
                break
    print(json.dumps({"results": results}))
    sys.stdout.flush()
    os._exit(0)  # a dead engine's shutdown can hang; everything is reported


if __name__ == "__main__":
    main()
