"""File I/O: safetensors headers, adapters on disk (native and PEFT), base checkpoints, atomic writes. No math."""
