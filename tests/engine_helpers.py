"""Shared by the real-engine tests: the transformers + PEFT oracle and running a driver in an engine's venv."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

DRIVERS = Path(__file__).parent / "engine_drivers"
PROMPTS = [[1, 5, 9, 23, 100], [7, 7, 200, 3]]


def peft_greedy(base: Path, adapter: Path | None, prompts: list[list[int]], steps: int) -> dict[str, Any]:
    """Greedy tokens and the log-probability of each, from transformers (+ PEFT with ``adapter``) in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    tokens, logprobs = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            got, lps = [], []
            for _ in range(steps):
                logits = model(torch.tensor([ids])).logits[0, -1].double()
                lp = torch.log_softmax(logits, -1)
                tok = int(torch.argmax(lp))
                got.append(tok)
                lps.append(float(lp[tok]))
                ids.append(tok)
            tokens.append(got)
            logprobs.append(lps)
    return {"tokens": tokens, "logprobs": logprobs}


def run_driver(python: Path, driver: str, job: dict[str, Any], workdir: Path, timeout: float = 900) -> Any:
    """Run ``engine_drivers/<driver>`` with the engine's interpreter on a JSON job; return its last stdout line
    parsed. The driver's stderr goes to ``workdir/<driver>.log`` (shown when it fails)."""
    job_file = workdir / f"{driver}.job.json"
    job_file.write_text(json.dumps(job))
    log = workdir / f"{driver}.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    with open(log, "w") as err:
        done = subprocess.run(
            [str(python), str(DRIVERS / driver), str(job_file)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=timeout,
            env=env,
            cwd=workdir,
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = log.read_text()[-3000:]
        raise AssertionError(f"{driver} failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1])
