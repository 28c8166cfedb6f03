"""Each inference engine's reading rule for LoRA adapters, as data and pure functions (no file I/O).

spec/interop/<engine>.md writes each rule down with the engine version and source file it was read from; the
exporters (loraformat/exporting.py) transform an adapter so the rule yields exactly ``s_m * B_m @ A_m`` per module,
and loraformat/engine_check.py predicts, from the header, what the engine would refuse or get wrong.
"""

from __future__ import annotations

from loraformat.constants import ENGINE_LAYOUT, Engine
from loraformat.errors import UsageError

VLLM, LLAMA_CPP, PEFT = Engine.VLLM, Engine.LLAMA_CPP, Engine.PEFT
#: the engines ``--for`` accepts
ENGINES = tuple(Engine)


def check_engine(name: str) -> Engine:
    """The canonical engine name, or a one-line usage error naming the engines we know."""
    canonical = {"llamacpp": LLAMA_CPP, "llama_cpp": LLAMA_CPP}.get(name.lower(), name.lower())
    if canonical not in ENGINES:
        raise UsageError(f"unknown engine {name!r}: --for takes one of {', '.join(ENGINES)}")
    return Engine(canonical)


def target_for(engine: str | None, to: str | None) -> str:
    """The output layout: ``--to`` if given (checked against the engine), else the engine's own layout."""
    if engine is None:
        return to or "loraformat"
    engine = check_engine(engine)
    if to is None:
        return ENGINE_LAYOUT[engine]
    if to != ENGINE_LAYOUT[engine]:
        raise UsageError(
            f"--to {to} does not fit --for {engine}: {engine} reads {ENGINE_LAYOUT[engine]} "
            f"(use --to {ENGINE_LAYOUT[engine]} or leave --to out)"
        )
    return to
