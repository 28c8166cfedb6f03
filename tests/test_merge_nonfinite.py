"""A merge never writes inf/NaN where the base is finite: a scale within float32 range (alpha 3e38) times large
but finite factors overflows the output, and the merge stops with a typed error (exit 1) and no output, on every
CPU backend. Scales beyond float32 (alpha 1e300) and non-finite ones never get that far: they are refused when
the adapter is read (bad-scale; tests/test_hostile_inputs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraformat.errors import AdapterError
from loraformat.merging.api import merge
from tests.hub_helpers import make_native
from tests.spec_helpers import rewrite


@pytest.fixture(scope="module")
def overflowing(
    peft_adapters: dict[str, Path], llama_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("overflow")
    native = make_native(peft_adapters["plain"], root / "plain.safetensors")

    def huge(meta) -> None:  # noqa: ANN001 - AdapterMetadata
        for entry in meta.modules.values():
            entry.alpha = 3e38

    def large(tensors) -> None:  # noqa: ANN001 - dict of tensors
        for key in tensors:
            if "lora_B" in key:
                tensors[key] = tensors[key] * 1e6

    return rewrite(native, root / "huge.safetensors", meta=huge, tensors=large)


@pytest.mark.parametrize("backend, device", [("numpy", "cpu"), ("torch", "cpu"), ("torch", "cpu-staged")])
def test_overflowing_merge_writes_nothing(
    overflowing: Path, llama_base: Path, tmp_path: Path, backend: str, device: str
) -> None:
    out = tmp_path / "merged"
    with pytest.raises(AdapterError, match="would write inf/NaN where the base is finite") as err:
        merge(llama_base, [overflowing], out, backend=backend, device=device)
    assert err.value.exit_code == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_overflowing_merge_through_the_cli(
    overflowing: Path, llama_base: Path, tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    from loraformat.cli.main import main

    with pytest.raises(SystemExit) as code:
        main(["merge", str(llama_base), str(overflowing), "-o", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 1 and len(err) == 1 and "inf/NaN" in err[0], err
    assert not (tmp_path / "m").exists()


def test_scale_beyond_float32_is_refused_when_read(overflowing: Path, tmp_path: Path) -> None:
    from loraformat.adapter import open_adapter

    def beyond(meta) -> None:  # noqa: ANN001 - AdapterMetadata
        for entry in meta.modules.values():
            entry.alpha = 1e300

    path = rewrite(overflowing, tmp_path / "beyond.safetensors", meta=beyond)
    with pytest.raises(AdapterError, match="is not a positive float32 number") as err:
        open_adapter(path)
    assert err.value.exit_code == 1
