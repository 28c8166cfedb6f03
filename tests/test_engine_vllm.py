"""vLLM itself (the CPU build, in its own venv) serves our --for vllm exports exactly as transformers + PEFT
serve the original adapters, and `validate --for vllm` predicts which adapters this vLLM loads.

One engine start for the whole module (tests/engine_drivers/vllm_driver.py); a tiny random-weight Llama with
head_dim 64 (vLLM's CPU attention has no kernel for smaller heads), fp32 in both engines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import loraformat
from loraformat.engine_check import validate_for
from tests.engine_helpers import PROMPTS, peft_greedy, run_driver
from tests.engines import engine_python
from tests.fixtures import (
    LLAMA_TARGETS,
    PEFT_VARIANTS,
    make_gpt2_base,
    make_llama_base,
    make_peft_adapter,
)

pytestmark = pytest.mark.slow
STEPS = 6
CAP = 16  # the engine's max_lora_rank

#: served by vLLM and compared with transformers + PEFT
SERVED: dict[str, dict[str, Any]] = {
    "per_module": PEFT_VARIANTS["patterns"][1],
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=LLAMA_TARGETS),
    "all_linear": dict(r=8, lora_alpha=32, target_modules="all-linear"),
}
#: vLLM refuses these; validate --for vllm must say so
REFUSED: dict[str, dict[str, Any]] = {
    "dora": PEFT_VARIANTS["dora"][1],
    "modules_to_save": PEFT_VARIANTS["modules_to_save"][1],
    "lora_bias": PEFT_VARIANTS["lora_bias"][1],
    "rank_above_cap": dict(r=32, lora_alpha=32, target_modules=["q_proj"]),
}


@pytest.fixture(scope="module")
def vllm_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = engine_python("vllm")
    root = tmp_path_factory.mktemp("vllm")
    base = make_llama_base(root / "base", dtype="float32", hidden=256, intermediate=512)
    adapters = {n: make_peft_adapter(base, root / n, **kw) for n, kw in {**SERVED, **REFUSED}.items()}
    # a composed adapter (exact concatenation of two), made native by loraformat, PEFT dir for the oracle
    natives = [loraformat.convert(adapters[n], root / f"{n}.safetensors") for n in ("per_module", "rslora")]
    loraformat.compose([n.output for n in natives], root / "composed.safetensors", method="cat")
    adapters["composed"] = root / "composed-peft"
    loraformat.convert(root / "composed.safetensors", adapters["composed"], to="peft")
    # modules that match nothing in this base: an adapter for a 3-layer model, on its third layer only
    deeper = make_llama_base(root / "deeper", dtype="float32", hidden=256, intermediate=512, layers=3)
    adapters["unmatched"] = make_peft_adapter(
        deeper, root / "unmatched", r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[2]
    )
    # a module vLLM does not expect at all (GPT-2's c_attn): the load fails
    gpt2 = make_gpt2_base(root / "gpt2")
    adapters["unexpected"] = make_peft_adapter(gpt2, root / "unexpected", **PEFT_VARIANTS["gpt2"][1])
    exports = {}
    for name in (*SERVED, "composed"):
        exports[f"{name}@vllm"] = loraformat.convert(adapters[name], root / f"{name}@vllm", engine="vllm")
    exports["per_module@uniform"] = loraformat.convert(
        adapters["per_module"], root / "per_module@uniform", engine="vllm", uniform=True
    )
    serve = [*SERVED, "composed", "unmatched"]
    paths = {
        **{n: adapters[n] for n in [*serve, *REFUSED, "unexpected"]},
        **{n: Path(r.output) for n, r in exports.items()},
    }
    job = {
        "model": str(base),
        "max_lora_rank": CAP,
        "prompts": PROMPTS,
        "max_tokens": STEPS,
        "serve": [{"name": n, "path": str(paths[n])} for n in [*serve, *exports]],
        "check": [{"name": n, "path": str(paths[n])} for n in REFUSED],
        "last": {"name": "unexpected", "path": str(paths["unexpected"])},
    }
    results = run_driver(python, "vllm_driver.py", job, root)["results"]
    return {"base": base, "paths": paths, "results": results, "adapters": adapters}


def _close(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["tokens"] == want["tokens"]
    for g, w in zip(got["logprobs"], want["logprobs"], strict=True):
        assert g == pytest.approx(w, abs=2e-3)


@pytest.mark.parametrize("name", [*SERVED, "composed"])
def test_vllm_serves_the_original_and_our_export_as_peft_does(name: str, vllm_world: dict[str, Any]) -> None:
    results = vllm_world["results"]
    oracle = peft_greedy(vllm_world["base"], vllm_world["adapters"][name], PROMPTS, STEPS)
    assert results[name]["loaded"], results[name]["error"]
    _close(results[name], oracle)
    _close(results[f"{name}@vllm"], oracle)
    if name == "per_module":
        _close(results["per_module@uniform"], oracle)
    assert results[name]["tokens"] != results["__base__"]["tokens"]  # the adapter does change the output


def test_modules_matching_nothing_load_and_change_nothing(vllm_world: dict[str, Any]) -> None:
    results = vllm_world["results"]
    assert results["unmatched"]["loaded"]
    assert results["unmatched"]["tokens"] == results["__base__"]["tokens"]
    assert results["unmatched"]["logprobs"] == results["__base__"]["logprobs"]
    (report,) = validate_for([vllm_world["adapters"]["unmatched"]], "vllm", base=vllm_world["base"])
    assert {f.code for f in report.errors} == {"unmatched-module"}


def test_validate_for_vllm_predicts_what_this_vllm_loads(vllm_world: dict[str, Any]) -> None:
    results = vllm_world["results"]
    for name, path in vllm_world["paths"].items():
        if name == "unmatched":
            continue  # loads, but serves the base: covered above
        (report,) = validate_for([path], "vllm", base=vllm_world["base"], max_lora_rank=CAP)
        assert report.ok() == results[name]["loaded"], (name, results[name].get("error"), report.findings)
    assert "greater than max_lora_rank" in results["rank_above_cap"]["error"]
    assert "DoRA" in results["dora"]["error"]
    # a refusal in the offline engine is not a failed request: the engine dies with it
    assert not results["unexpected"]["loaded"] and results["unexpected"]["engine_alive"] is False
