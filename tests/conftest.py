"""Session-wide fixtures: small bases and real PEFT adapters, built once per test session."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

from tests.fixtures import PEFT_VARIANTS, make_gpt2_base, make_llama_base, make_peft_adapter


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer bf16 Llama base in one model.safetensors."""
    return make_llama_base(tmp_path_factory.mktemp("bases") / "llama")


@pytest.fixture(scope="session")
def llama_base_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture, sharded (model-0000x-of-0000n.safetensors + index.json)."""
    return make_llama_base(tmp_path_factory.mktemp("bases") / "llama_sharded", max_shard_size="150KB")


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer fp32 GPT-2 base (Conv1D weights stored (in, out): fan_in_fan_out)."""
    return make_gpt2_base(tmp_path_factory.mktemp("bases") / "gpt2")


@pytest.fixture(scope="session")
def peft_adapters(
    tmp_path_factory: pytest.TempPathFactory, llama_base: Path, gpt2_base: Path
) -> dict[str, Path]:
    """Every PEFT variant in PEFT_VARIANTS, as a real PEFT adapter directory."""
    root = tmp_path_factory.mktemp("peft")
    bases = {"llama": llama_base, "gpt2": gpt2_base}
    return {
        name: make_peft_adapter(bases[kind], root / name, **kwargs)
        for name, (kind, kwargs) in PEFT_VARIANTS.items()
    }


@pytest.fixture(scope="session")
def base_of(llama_base: Path, gpt2_base: Path):
    """The base directory a PEFT variant was made for."""
    bases = {"llama": llama_base, "gpt2": gpt2_base}
    return lambda variant: bases[PEFT_VARIANTS[variant][0]]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the hash cache and HF cache of each test inside its tmp_path."""
    monkeypatch.setenv("LORAFORMAT_CACHE", str(tmp_path / ".lfcache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / ".hf"))


@pytest.fixture(scope="session")
def llama32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 base of the same architecture as llama_base, so merges compare at fp32 precision."""
    return make_llama_base(tmp_path_factory.mktemp("bases32") / "llama32", dtype="float32")


@pytest.fixture(scope="session")
def deltas_of(llama32: Path):
    """PEFT's own fp64 deltas of an adapter on the fp32 base, per module, cached for the session."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(path: Path) -> dict[str, torch.Tensor]:
        from tests.compose_helpers import peft_deltas

        if str(path) not in cache:
            cache[str(path)] = peft_deltas(Path(path), llama32)
        return cache[str(path)]

    return get


@pytest.fixture(scope="session")
def quantized_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 16-bit tiny Llama (intermediate 192: partial 128x128 tiles) and its quantized copies made by the real
    libraries: bitsandbytes nf4 (double quant) and fp4, compressed-tensors FP8 per tensor, per channel and
    block, and the DeepSeek block layout (tests/quant_fixtures.py)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("compressed_tensors")
    from tests.quant_fixtures import make_block_fp8_base, make_bnb4_base, make_ct_fp8_base

    root = tmp_path_factory.mktemp("quantized")
    base = make_llama_base(root / "bf16", intermediate=192)  # 192 = 128 + a partial tile; a multiple of 64
    return {
        "bf16": base,
        "nf4": make_bnb4_base(base, root / "nf4"),
        "fp4": make_bnb4_base(base, root / "fp4", quant_type="fp4", double_quant=False),
        "fp8-tensor": make_ct_fp8_base(base, root / "fp8-tensor", scheme="FP8_TENSOR"),
        "fp8-channel": make_ct_fp8_base(base, root / "fp8-channel", scheme="FP8_DYNAMIC"),
        "fp8-block": make_block_fp8_base(base, root / "fp8-block"),
        "fp8-ct-block": make_ct_fp8_base(base, root / "fp8-ct-block", scheme="FP8_BLOCK"),
    }


@pytest.fixture(scope="session")
def stamped_adapter(tmp_path_factory, peft_adapters, llama_base) -> Path:
    """A loraformat adapter with recorded base digests, so every worker verifies its targets."""
    from loraformat.conversion import convert

    path = tmp_path_factory.mktemp("split") / "a.safetensors"
    convert(peft_adapters["plain"], path, base=llama_base)
    return path


@pytest.fixture(scope="session")
def split_reference(tmp_path_factory, llama_base, stamped_adapter) -> dict[str, bytes]:
    """The one-machine merge every split merge must equal byte for byte (5 output shards)."""
    from loraformat.cli.main import main
    from tests.test_merge_split import SHARD_SIZE, tree_bytes

    out = tmp_path_factory.mktemp("ref") / "one"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "-q",
                "merge",
                str(llama_base),
                str(stamped_adapter),
                "-o",
                str(out),
                "--max-shard-size",
                SHARD_SIZE,
            ]
        )
    assert exc.value.code in (0, None)
    files = tree_bytes(out)
    assert sum(name.endswith(".safetensors") for name in files) == 5
    return files
