"""Pure tensor math: functions of tensors only, no file or network I/O (merge deltas, composition, low rank)."""
