"""Runs inside llama.cpp's venv (tests/engines.py finds it): llama.cpp's own converters, then llama.cpp itself.

Job (JSON file, argv[1]): {"src": vendored llama.cpp dir, "tokens": [ids], "convert_models": {name: HF dir},
"convert_loras": {name: [PEFT dir, HF base dir]}, "runs": {name: [model name, GGUF adapter path or null]}}.
- ``convert_models``: each HF model gets a sentencepiece tokenizer.model (llama.cpp's converter needs a
  vocabulary; the test models have none) and is converted with convert_hf_to_gguf.py to F32 GGUF.
- ``convert_loras``: each PEFT directory is converted with llama.cpp's convert_lora_to_gguf.py (F32); the
  result is usable in ``runs`` under the same name.
- ``runs``: the model (by name) with the adapter (a path, a converted name, or null) is loaded through the
  llama_cpp bindings and evaluates ``tokens``; the logits of every position are returned.
Output: one JSON line {"logits": {run: [[...]]}, "converted": {name: path}}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def tokenizer_model(model_dir: Path, vocab_size: int) -> None:
    """A small sentencepiece model (training is offline and takes a second); ids beyond it are padded."""
    import sentencepiece as spm

    text = model_dir / "tokenizer-corpus.txt"
    words = [f"w{i} x{i * 7 % 13} y{i % 5}" for i in range(400)]
    text.write_text("\n".join(words))
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(model_dir / "tokenizer"),
        vocab_size=min(vocab_size, 64),
        model_type="bpe",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    text.unlink()
    (model_dir / "tokenizer.vocab").unlink()


def run(cmd: list[str], cwd: str) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed:\n{done.stderr[-3000:]}")


def logits_of(model: str, lora: str | None, tokens: list[int]) -> list[list[float]]:
    from llama_cpp import Llama

    kwargs: dict[str, Any] = {"lora_path": lora} if lora else {}
    llm = Llama(
        model_path=model,
        n_ctx=64,
        logits_all=True,
        verbose=False,
        n_threads=2,
        seed=0,
        type_k=0,
        type_v=0,
        **kwargs,
    )  # type_k/type_v 0: an F32 KV cache (the default F16 cache alone costs ~3e-4 relative)
    llm.eval(tokens)
    out = [list(map(float, llm.scores[i])) for i in range(len(tokens))]
    llm.close()
    return out


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    src = job["src"]
    converted: dict[str, str] = {}
    for name, hf_dir in job["convert_models"].items():
        config = json.loads((Path(hf_dir) / "config.json").read_text())
        tokenizer_model(Path(hf_dir), config["vocab_size"])
        out = str(Path(hf_dir).parent / f"{name}.gguf")
        run([sys.executable, "convert_hf_to_gguf.py", hf_dir, "--outtype", "f32", "--outfile", out], src)
        converted[name] = out
    for name, (peft_dir, base_dir) in job["convert_loras"].items():
        out = str(Path(peft_dir).parent / f"{name}.gguf")
        cmd = [sys.executable, "convert_lora_to_gguf.py", peft_dir, "--base", base_dir, "--outtype", "f32"]
        run([*cmd, "--outfile", out], src)
        converted[name] = out
    logits = {}
    for name, (model, lora) in job["runs"].items():
        logits[name] = logits_of(converted[model], converted.get(lora, lora) if lora else None, job["tokens"])
    print(json.dumps({"logits": logits, "converted": converted}))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
