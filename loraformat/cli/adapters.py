"""``convert`` and ``hash``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import click

from loraformat.cli.common import emit_json, human_bytes, info, progress, resolve_adapter
from loraformat.constants import CONVERT_TARGETS, PIPELINE_COMPONENTS
from loraformat.io.pipeline import is_pipeline


@click.command("convert")
@click.argument("src", type=click.Path(path_type=str))
@click.option(
    "-o",
    "--output",
    "dst",
    required=True,
    type=click.Path(path_type=str),
    help="Output: a .safetensors file (--to loraformat, kohya, diffusers), a directory (--to peft) or a .gguf "
    "file (--to gguf, for llama.cpp).",
)
@click.option(
    "--for",
    "engine",
    metavar="ENGINE",
    help="Write exactly what ENGINE's reading rule turns into this adapter: vllm, llama.cpp or peft "
    "(refuses what the engine cannot represent, naming the modules).",
)
@click.option(
    "--max-rank",
    type=click.IntRange(min=1),
    help="Truncate every module above rank R optimally (SVD) to fit a server's cap; reports the energy kept. "
    "E.g. --for vllm --max-rank 16.",
)
@click.option(
    "--uniform",
    is_flag=True,
    help="PEFT layouts: one rank and one alpha for every module (ranks zero-padded, scales folded into "
    "lora_B), for readers that ignore rank_pattern/alpha_pattern.",
)
@click.option(
    "--to",
    type=click.Choice([str(t) for t in CONVERT_TARGETS]),
    help="Output layout, e.g. --to kohya for ComfyUI/A1111, --to diffusers for load_lora_weights.  [default: "
    "loraformat; with --for, the engine's: vllm, peft -> peft; llama.cpp -> gguf]",
)
@click.option(
    "--base",
    type=click.Path(path_type=str),
    help="Base model (checkpoint, component folder or diffusers pipeline): check every target fits, resolve "
    "kohya names against its modules, and stamp a checkpoint's id, hashes and target digests.",
)
@click.option(
    "--component",
    type=click.Choice(list(PIPELINE_COMPONENTS)),
    help="Which pipeline model a single-model adapter is for (needed for --to kohya), e.g. --component unet.",
)
@click.option("--name", help="Adapter name recorded in the metadata.")
@click.option("--base-id", help="Base model id (hub repo id or name) to record.")
@click.option(
    "--base-quantization",
    help="How the training base was quantized (spec §8 Base quantization), overriding what the base config and "
    "the PEFT card say: none, or METHOD[,key=value...], e.g. bnb-nf4,block_size=64,double_quant=true,"
    "compute_dtype=bfloat16 or fp8-e4m3,scale_layout=block,block_size=128x128.",
)
@click.option("--description", help="Free-text description.")
@click.option("--task", help="Task, e.g. CAUSAL_LM or 'summarisation'.")
@click.option("--license", "license_", help="License identifier, e.g. apache-2.0.")
@click.option(
    "--config", type=click.Path(path_type=str), help="adapter_config.json for a bare PEFT .safetensors."
)
@click.option(
    "--allow-pickle", is_flag=True, help="Load adapter_model.bin with torch.load(weights_only=True)."
)
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output (only once the new one is complete)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert_cmd(
    src: str,
    dst: str,
    to: str | None,
    engine: str | None,
    max_rank: int | None,
    uniform: bool,
    base: str | None,
    name: str | None,
    base_id: str | None,
    base_quantization: str | None,
    description: str | None,
    task: str | None,
    license_: str | None,
    component: str | None,
    config: str | None,
    allow_pickle: bool,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Convert an adapter (native, PEFT directory or .safetensors + config, pickle, kohya, diffusers) to
    loraformat, PEFT, kohya or diffusers; alpha and per-module ranks are kept.

    The input is never modified; the output appears only when complete. Exit codes: 0 written, 1 invalid
    input or base mismatch, 2 usage/I-O error (e.g. the output exists without --overwrite).

    \b
    Examples:
      loraformat convert ./peft-adapter -o adapter.safetensors --base ./base-model --base-id org/base
      loraformat convert adapter.safetensors --to peft -o ./peft-adapter
      loraformat convert ./old-adapter -o adapter.safetensors --allow-pickle   # adapter_model.bin
      loraformat convert weights.safetensors --config adapter_config.json -o adapter.safetensors
      loraformat convert civitai_lora.safetensors --base ./sd15-pipeline -o adapter.safetensors
      loraformat convert adapter.safetensors --to kohya -o comfyui_lora.safetensors
      loraformat convert ./qlora-adapter -o a.safetensors --base-quantization bnb-nf4,double_quant=true
      loraformat convert ./unet-peft-adapter --component unet --to diffusers -o pytorch_lora_weights.safetensors
      loraformat convert adapter.safetensors --for vllm -o ./for-vllm --max-rank 16
      loraformat convert ./peft-adapter --for llama.cpp --base ./base-model -o adapter.gguf
    """
    from loraformat.conversion import convert
    from loraformat.exporting import ExportResult, format_export

    src = resolve_adapter(src)
    bar: contextlib.AbstractContextManager[Callable[[int], None] | None] = contextlib.nullcontext(None)
    if base is not None and not is_pipeline(base) and not base.endswith(".gguf"):
        from loraformat.io.checkpoint import open_checkpoint

        bar = progress(open_checkpoint(base).total_bytes, "hashing base")
    with bar as update:
        result = convert(
            src,
            dst,
            to=to,
            engine=engine,
            max_rank=max_rank,
            uniform=uniform,
            base=base,
            name=name,
            base_id=base_id,
            base_quantization=base_quantization,
            description=description,
            task=task,
            license=license_,
            config=config,
            allow_pickle=allow_pickle,
            overwrite=overwrite,
            progress=update,
            component=component,
        )
    if as_json:
        emit_json(result.to_json())
    elif isinstance(result, ExportResult):
        info(format_export(result))
    else:
        stamped = ", base stamped" if result.base_stamped else ""
        info(
            f"wrote {result.output} ({result.to}, {result.modules} modules{stamped}, "
            f"content {result.content_hash[:16]})"
        )


@click.command("hash")
@click.argument("base", type=click.Path(path_type=str))
@click.option("--no-cache", is_flag=True, help="Recompute even when a cached result matches.")
@click.option("--digests", is_flag=True, help="With --json, include every per-tensor digest.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def hash_cmd(base: str, no_cache: bool, digests: bool, as_json: bool) -> None:
    """Print the structure and content hashes of a base checkpoint (directory, shards or one file).

    Independent of sharding, file names and tensor order; cached by path, size, mtime and header.

    \b
    Example:
      loraformat hash ./Llama-3-8B --json
    """
    from loraformat.hashing import hash_base
    from loraformat.io.checkpoint import open_checkpoint

    ck = open_checkpoint(base)
    with progress(ck.total_bytes, "hashing") as update:
        result = hash_base(ck, use_cache=not no_cache, progress=update)
    if as_json:
        emit_json(
            {"path": base, **result.to_json(with_digests=digests), "tensors": len(result.tensor_digests)}
        )
        return
    rate = result.total_bytes / result.seconds / 1e9 if result.seconds and not result.cached else None
    click.echo(f"structure  {result.structure_hash}")
    click.echo(f"content    {result.content_hash}")
    how = "cached" if result.cached else f"{result.seconds:.2f} s" + (f", {rate:.2f} GB/s" if rate else "")
    info(
        f"algorithm  {result.algorithm} ({len(result.tensor_digests)} tensors, "
        f"{human_bytes(result.total_bytes)}, {how})"
    )


COMMANDS: list[click.Command] = [convert_cmd, hash_cmd]
