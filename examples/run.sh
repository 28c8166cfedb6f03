#!/usr/bin/env bash
# The main job end to end on the bundled example, on a machine with no network but the package registries:
# build a small base (and its FP8 copy) and two PEFT adapters, convert and stamp them, validate, inspect, merge,
# unmerge, extract an adapter back from the merged model, merge QLoRA-faithfully and into the FP8 base, compose,
# rescale, then push and pull through the embedded local hub.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python3 -m pip install -q torch==2.13.0          # the CPU build first; an unpinned torch pulls CUDA
python3 -m pip install -q -e ".[test]"           # transformers and peft build the example inputs
out=examples/out
rm -rf "$out" && mkdir -p "$out"
export LORAFORMAT_HUB="$PWD/$out/hub" LORAFORMAT_CACHE="$PWD/$out/cache" HF_HUB_OFFLINE=1
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step python3 examples/build_example.py "$out"
step loraformat convert "$out/peft-summarise" -o "$out/summarise.safetensors" --base "$out/base" \
     --base-id example/tiny-llama --name summarise --license apache-2.0
step loraformat convert "$out/peft-translate" -o "$out/translate.safetensors" --base "$out/base" \
     --base-id example/tiny-llama --name translate
step loraformat validate "$out/summarise.safetensors" "$out/translate.safetensors" --base "$out/base"
step loraformat inspect "$out/summarise.safetensors"
step loraformat hash "$out/base"
step loraformat merge "$out/base" "$out/summarise.safetensors" -o "$out/merged"
step loraformat unmerge "$out/merged" "$out/summarise.safetensors" -o "$out/base-recovered"
step loraformat extract "$out/base" "$out/merged" -o "$out/extracted.safetensors" --rank auto:0.999 --max-rank 16
step loraformat convert "$out/peft-summarise" -o "$out/summarise-qlora.safetensors" --base "$out/base" \
     --name summarise-qlora --base-quantization bnb-nf4,block_size=64,double_quant=true
step loraformat merge "$out/base" "$out/summarise-qlora.safetensors" -o "$out/merged-qlora"  # as QLoRA trained it
step loraformat merge "$out/base-fp8" "$out/peft-summarise" -o "$out/merged-fp8"  # re-quantized, fresh scales
step loraformat compose "$out/summarise.safetensors" "$out/translate.safetensors" -o "$out/mix.safetensors" \
     --method svd --weights 0.7,0.3 --rank 16
step loraformat rescale "$out/mix.safetensors" -o "$out/mix-r8.safetensors" --rank 8
step loraformat push "$out/summarise.safetensors" example/summarise --tag v1
step loraformat pull example/summarise -o "$out/pulled" --revision v1
step loraformat list
step loraformat validate "$out/pulled" --base "$out/base" --strict
step python3 examples/check_example.py "$out"
printf '\nexample finished: outputs in %s\n' "$out"
