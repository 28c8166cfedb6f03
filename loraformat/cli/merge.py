"""``loraformat merge``: a thin click layer over :func:`loraformat.merging.api.merge`."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import click

from loraformat.cli.common import (
    emit_json,
    human_bytes,
    info,
    keep_freed_memory,
    progress,
    resolve_adapter,
    warn,
)
from loraformat.errors import UsageError


def _parse_size(value: str | None) -> int | None:
    if value is None:
        return None
    from loraformat.rules import parse_size

    try:
        size = parse_size(value)
    except ValueError:
        raise UsageError(f"--max-shard-size {value!r} is not a size like 5GB, 500MB or 1000000") from None
    if size <= 0:
        raise UsageError("--max-shard-size must be positive")
    return size


@click.command("merge")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=str),
    help="Output model directory (created atomically; loadable with from_pretrained).",
)
@click.option(
    "--weight",
    "weights",
    multiple=True,
    type=float,
    help="Weight of each adapter, in order (repeat once per adapter; default 1).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu, cuda or cuda:N (cpu-staged: the GPU code path run on CPU, for testing).",
)
@click.option(
    "--dtype",
    type=click.Choice(["keep", "bf16", "fp16", "fp32"]),
    default="keep",
    show_default=True,
    help="Dtype of the floating-point output tensors.",
)
@click.option("--max-shard-size", help="Re-shard the output (e.g. 5GB); default: keep the base's shards.")
@click.option("--no-verify", is_flag=True, help="Skip checking base tensors against the adapters' digests.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option(
    "--dequantize-as",
    type=click.Choice(["auto", "nf4", "fp4", "none"]),
    default="auto",
    show_default=True,
    help="16-bit base: merge into dequant(quant(W)) as QLoRA trained (bitsandbytes' round trip, bit for bit); "
    "auto does so when the adapter records a 4-bit training base, none keeps W.",
)
@click.option(
    "--requantize",
    type=click.Choice(["keep", "none"]),
    default="keep",
    show_default=True,
    help="FP8 or bitsandbytes 4-bit base: keep writes the same quantized layout with fresh scales; none writes "
    "16-bit weights and drops quantization_config.",
)
@click.option("--json", "as_json", is_flag=True, help="Print figures and what was verified as JSON.")
@click.option(
    "--shard",
    "share",
    metavar="I/N",
    help="Write only worker I's share of OUT's shards (I from 0 to N-1), for any scheduler; then --assemble N.",
)
@click.option(
    "--assemble",
    "assemble_workers",
    type=int,
    metavar="N",
    help="After all N workers of --shard I/N finished: check their done-files and commit OUT.",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="auto",
    default=None,
    metavar="[ADDRESS]",
    help="Run the shares as Ray tasks (default address: RAY_ADDRESS or the local cluster; 'local' starts one).",
)
@click.option(
    "--workers",
    type=int,
    help="With --ray: number of shares (default: one per free CPU slot, at most one per shard).",
)
@click.option("--ray-cpus", type=float, default=1.0, show_default=True, help="With --ray: CPUs per task.")
@click.option(
    "--ray-gpus", type=float, help="With --ray: GPUs per task (default: 1 when the cluster has GPUs, else 0)."
)
@click.option(
    "--retries",
    type=int,
    default=3,
    show_default=True,
    help="With --ray: retries of a task whose worker died.",
)
def merge_cmd(
    base: str,
    adapters: tuple[str, ...],
    out: str,
    weights: tuple[float, ...],
    device: str,
    dtype: str,
    max_shard_size: str | None,
    no_verify: bool,
    overwrite: bool,
    dequantize_as: str,
    requantize: str,
    as_json: bool,
    share: str | None,
    assemble_workers: int | None,
    ray_address: str | None,
    workers: int | None,
    ray_cpus: float,
    ray_gpus: float | None,
    retries: int,
) -> None:
    """Merge one or more LoRA adapters into BASE, streaming tensor by tensor, and write OUT.

    W' = W + sum_i w_i * s_i * B_i A_i per module (as PEFT's merge_and_unload), computed in fp32 and rounded
    once; untouched tensors are copied byte for byte. BASE is a model directory (model.safetensors or shards
    with an index), a .safetensors file, or a diffusers pipeline directory (model_index.json: each targeted
    component is merged, everything else copied); each ADAPTER a loraformat, PEFT, kohya or diffusers
    adapter or a hub reference.

    \b
    Examples:
      loraformat merge ./Llama-3-8B adapter.safetensors -o ./merged
      loraformat merge ./base a.safetensors b.safetensors --weight 0.7 --weight 0.3 -o ./blend --json
      loraformat merge ./sd15-pipeline civitai_lora.safetensors -o ./sd15-merged
      loraformat merge ./Llama-3-8B qlora-adapter/ -o ./merged --dequantize-as nf4
      loraformat merge ./DeepSeek-V3-FP8 adapter.safetensors -o ./merged-fp8      # re-quantized, fresh scales
      loraformat merge ./Qwen3-8B-FP8 adapter.safetensors -o ./merged-bf16 --requantize none

    \b
    Split across machines that share a file system (workers numbered from 0; any scheduler):
      loraformat merge ./base a.safetensors -o ./merged --shard 3/8     # on each of 8 machines, I = 0..7
      loraformat merge ./base a.safetensors -o ./merged --assemble 8    # once, after all 8 finished
      loraformat merge ./base a.safetensors -o ./merged --ray=10.0.0.1:6379 --workers 16
    """
    from loraformat.merging.api import merge

    keep_freed_memory()
    _check_options(len(adapters), weights, share, assemble_workers, ray_address, workers, ray_gpus)
    shard_size = _parse_size(max_shard_size)
    paths = [resolve_adapter(a) for a in adapters]
    common: dict[str, Any] = dict(
        weights=list(weights) or None,
        dtype=dtype,
        max_shard_size=shard_size,
        overwrite=overwrite,
        dequantize_as=dequantize_as,
        requantize=requantize,
    )
    if assemble_workers is not None:
        _run_assemble(base, paths, out, assemble_workers, common, as_json)
        return
    if no_verify:
        warn("--no-verify: base tensors will not be checked against the adapters' recorded digests")
    with _progress_bars() as update, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the --no-verify warning was printed above, once
        if share is not None:
            _run_share(base, paths, out, share, common, device, no_verify, update, as_json)
            return
        if ray_address is not None:
            _run_ray(
                base,
                paths,
                out,
                ray_address,
                common,
                device,
                no_verify,
                workers,
                ray_cpus,
                ray_gpus,
                retries,
                as_json,
            )
            return
        result = merge(base, paths, out, device=device, verify=not no_verify, progress=update, **common)
    _report(result, as_json)


@contextlib.contextmanager
def _progress_bars() -> Iterator[Callable[[int, int], None]]:
    """Bytes and tensors bars (quiet off a TTY and with --quiet), fed by one ``update(bytes, tensors)``."""
    with progress(None, "tensors", unit="tensor") as tensors_bar, progress(None, "merging") as bytes_bar:

        def update(nbytes: int, tensors: int) -> None:
            if nbytes:
                bytes_bar(nbytes)
            if tensors:
                tensors_bar(tensors)

        yield update


def _check_options(
    n_adapters: int,
    weights: tuple[float, ...],
    share: str | None,
    assemble_workers: int | None,
    ray_address: str | None,
    workers: int | None,
    ray_gpus: float | None,
) -> None:
    """Options that contradict each other: one line, exit 2, before anything is opened."""
    if weights and len(weights) != n_adapters:
        raise UsageError(f"got {len(weights)} --weight for {n_adapters} adapter(s); give one per adapter")
    modes = [
        m for m, on in (("--shard", share), ("--assemble", assemble_workers), ("--ray", ray_address)) if on
    ]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} cannot be combined; give one")
    if ray_address is None and (workers is not None or ray_gpus is not None):
        raise UsageError("--workers and --ray-gpus go with --ray")


def _run_assemble(
    base: str, paths: list[Any], out: str, workers: int, common: dict[str, Any], as_json: bool
) -> None:
    from loraformat.merging.split import assemble

    done = assemble(base, paths, out, workers, **common)
    if as_json:
        emit_json(done.to_json())
    else:
        info(
            f"assembled {done.output} from {done.workers} worker(s): {len(done.shards)} shards, "
            f"{human_bytes(done.bytes_total)} in all; {done.seconds:.2f} s"
        )


def _report(result: Any, as_json: bool) -> None:
    """The merge's result: JSON, or warnings and a summary line (and the re-quantization line)."""
    for note in result.warnings:
        if not note.startswith("--no-verify") and not as_json:
            warn(note)
    if as_json:
        emit_json(result.to_json())
        return
    v = result.verified
    if not v["enabled"]:
        verified = "digests not checked (--no-verify)"
    elif v["tensors"]:
        verified = f"{v['tensors']} base tensors verified against recorded digests"
    else:
        verified = "no adapter records base digests (stamp one with 'loraformat convert --base')"
    info(
        f"wrote {result.output}: {result.tensors} tensors ({result.tensors_merged} merged, "
        f"{result.tensors_replaced} replaced, {result.tensors_copied} copied), "
        f"{human_bytes(result.bytes_written)} in {result.seconds:.2f} s ({human_bytes(result.gb_per_s * 1e9)}/s) on "
        f"{result.device} ({result.backend}); peak RSS {human_bytes(result.peak_rss_bytes)}; {verified}"
    )
    if result.quantization is not None:
        info(quantization_summary(result.quantization, result.requant_error))


def quantization_summary(q: dict[str, Any], err: dict[str, Any] | None) -> str:
    """One line: what was quantized and how much of the adapter survived re-quantization."""
    base = q.get("base")
    if isinstance(base, dict):
        layout = f" ({base.get('scale_layout')} scales)" if base.get("scale_layout") else ""
        text = f"quantized {base.get('method')} base{layout}, requantize {q.get('requantize')}"
    else:
        text = f"16-bit base merged into dequant(quant(W)) as {q.get('dequantize_as')} (QLoRA-faithful)"
    if err:
        text += (
            f"; re-quantization error max {err['max_rel']:.1%} and RMS {err['rms_rel']:.1%} of the delta "
            f"({err['max_abs']:.3g} / {err['rms_abs']:.3g} absolute)"
        )
    return text


def _run_share(
    base: str,
    paths: list[str],
    out: str,
    share: str,
    common: dict[str, Any],
    device: str,
    no_verify: bool,
    update: Any,
    as_json: bool,
) -> None:
    from loraformat.merging.split import merge_share

    result = merge_share(
        base, paths, out, share, device=device, verify=not no_verify, progress=update, **common
    )
    if as_json:
        emit_json(result.to_json())
        return
    where = f"worker {result.worker}/{result.workers}"
    if result.skipped:
        info(f"{where}: already done (its done-file and shards match); nothing to do")
        return
    info(
        f"{where}: wrote {len(result.shards)} of the output's shards, {human_bytes(result.bytes_written)} in "
        f"{result.seconds:.2f} s ({human_bytes(result.gb_per_s * 1e9)}/s), {result.tensors_verified} base tensors "
        f"verified; after all {result.workers} workers: --assemble {result.workers}"
    )


def _run_ray(
    base: str,
    paths: list[str],
    out: str,
    address: str,
    common: dict[str, Any],
    device: str,
    no_verify: bool,
    workers: int | None,
    cpus: float,
    gpus: float | None,
    retries: int,
    as_json: bool,
) -> None:
    from loraformat.distributed import merge as distributed_merge

    result = distributed_merge(
        base,
        paths,
        out,
        address=address,
        workers=workers,
        num_cpus=cpus,
        num_gpus=gpus,
        max_retries=retries,
        device=device,
        verify=not no_verify,
        **common,
    )
    if as_json:
        emit_json(result.to_json())
        return
    info(
        f"wrote {result.output} on Ray: {result.workers} task(s) on {len(result.nodes)} node(s), "
        f"{len(result.shards)} shards, {human_bytes(result.bytes_total)} in {result.seconds:.2f} s "
        f"(assemble {result.assemble_seconds:.2f} s; {result.recovered} share(s) recovered from a dead worker)"
    )


COMMANDS: list[click.Command] = [merge_cmd]
