"""llama.cpp itself (built from the llama-cpp-python source package, in its own venv) applies our GGUF adapters
exactly as transformers + PEFT apply the original adapters, while llama.cpp's own convert_lora_to_gguf.py
mis-scales rsLoRA and per-module-alpha adapters on the same inputs.

One driver run for the module (tests/engine_drivers/llamacpp_driver.py): the tiny fp32 Llama base and our
merged models are converted with llama.cpp's convert_hf_to_gguf.py (F32), then llama.cpp evaluates one prompt
for each (model, adapter) pair and returns the logits of every position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import loraformat
from tests.engine_helpers import run_driver
from tests.engines import engine_path, engine_python
from tests.fixtures import LLAMA_TARGETS, PEFT_VARIANTS, make_llama_base, make_peft_adapter

pytestmark = pytest.mark.slow
TOKENS = [1, 5, 9, 23, 100, 7, 200, 3]
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": dict(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=LLAMA_TARGETS),
    "per_module_alpha": PEFT_VARIANTS["patterns"][1],
    # token embeddings: llama.cpp stores lora_a transposed for token_embd (its converter's rule)
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
}
#: also converted with llama.cpp's own convert_lora_to_gguf.py
THEIRS = ("plain", "rslora", "per_module_alpha")


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def llama_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python, src = engine_python("llama.cpp"), engine_path("llama.cpp")
    root = tmp_path_factory.mktemp("llamacpp")
    base = make_llama_base(root / "base", dtype="float32")
    job: dict[str, Any] = {"src": str(src), "tokens": TOKENS, "convert_models": {"base": str(base)}}
    job["convert_loras"], job["runs"] = {}, {"base": ["base", None]}
    adapters = {}
    for name, kwargs in VARIANTS.items():
        adapters[name] = make_peft_adapter(base, root / name, **kwargs)
        ours = loraformat.convert(adapters[name], root / f"{name}@ours.gguf", engine="llama.cpp", base=base)
        loraformat.merge(base, [adapters[name]], root / f"{name}-merged")
        job["convert_models"][f"{name}-merged"] = str(root / f"{name}-merged")
        job["runs"][f"{name}@ours"] = ["base", ours.output]
        if name in THEIRS:
            job["convert_loras"][f"{name}@theirs"] = [str(adapters[name]), str(base)]
            job["runs"][f"{name}@theirs"] = ["base", f"{name}@theirs"]
        job["runs"][f"{name}@merged"] = [f"{name}-merged", None]
    out = run_driver(python, "llamacpp_driver.py", job, root)
    logits = {k: torch.tensor(v, dtype=torch.float64) for k, v in out["logits"].items()}
    oracle = {n: peft_logits(base, adapters[n]) for n in VARIANTS}
    return {"logits": logits, "oracle": oracle, "base": base}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_llamacpp_applies_our_gguf_as_peft_does(name: str, llama_world: dict[str, Any]) -> None:
    logits, want = llama_world["logits"], llama_world["oracle"][name]
    ours = logits[f"{name}@ours"]
    assert rel(logits["base"], want) > 1e-2  # the adapter changes the logits noticeably
    assert rel(ours, want) < 1e-5
    assert torch.equal(ours.argmax(-1), want.argmax(-1))
    # and our merged model, converted by llama.cpp's own converter, gives the same logits
    assert rel(logits[f"{name}@merged"], want) < 1e-5


def test_llamacpp_own_converter_mis_scales_rslora_and_per_module_alpha(llama_world: dict[str, Any]) -> None:
    logits, oracle = llama_world["logits"], llama_world["oracle"]
    assert rel(logits["plain@theirs"], oracle["plain"]) < 1e-5  # one alpha, standard rule: it is right
    for name in ("rslora", "per_module_alpha"):
        theirs, ours = rel(logits[f"{name}@theirs"], oracle[name]), rel(logits[f"{name}@ours"], oracle[name])
        assert theirs > 1e-2 and theirs > 100 * ours, (name, theirs, ours)
