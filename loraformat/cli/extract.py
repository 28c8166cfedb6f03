"""``extract`` and ``unmerge``: thin click commands over loraformat.extraction and loraformat.unmerging."""

from __future__ import annotations

import contextlib

import click

from loraformat.cli.common import emit_json, human_bytes, info, progress, resolve_adapter, warn
from loraformat.errors import UsageError


@click.command("extract")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("tuned", type=click.Path(path_type=str))
@click.option(
    "-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Output .safetensors file."
)
@click.option(
    "--rank",
    required=True,
    help="Rank R of every module, or auto:E: per module the smallest rank keeping fraction E of the "
    "delta's squared Frobenius norm (e.g. auto:0.9).",
)
@click.option(
    "--targets",
    default="all-linear",
    show_default=True,
    help="Comma-separated module names (q_proj,v_proj: a name or its last dotted parts, as PEFT) or "
    "all-linear (every 2-D weight but embeddings and the output layer).",
)
@click.option("--min-rank", type=int, default=1, show_default=True, help="Lower clamp of auto:E ranks.")
@click.option("--max-rank", type=int, help="Upper clamp of auto:E ranks (default: no clamp).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="Storage dtype of the factors (auto: the tuned weight's).",
)
@click.option(
    "--save-changed",
    is_flag=True,
    help="Store changed non-linear tensors (embeddings, norms, lm_head) whole, as modules_to_save.",
)
@click.option("--exact", is_flag=True, help="Full SVD per module instead of the randomized one (slow).")
@click.option("--name", help="Adapter name recorded in the metadata (default: the output's file name).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-module report as JSON.")
def extract_cmd(
    base: str,
    tuned: str,
    out: str,
    rank: str,
    targets: str,
    min_rank: int,
    max_rank: int | None,
    device: str,
    dtype: str,
    save_changed: bool,
    exact: bool,
    name: str | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Extract a LoRA adapter from TUNED, a full fine-tune of BASE: per module, the optimal rank-R
    approximation of W_tuned - W_base (randomized SVD, residual checked), B = U diag(S), A = V^T, alpha = R.

    Both models stream tensor by tensor; identical tensors are skipped by digest. The output is a native
    loraformat file stamped with BASE's hashes. Changed tensors that are not linear (embeddings, norms) are
    listed, or stored whole with --save-changed.

    \b
    Examples:
      loraformat extract ./Llama-3-8B ./Llama-3-8B-chat -o chat.safetensors --rank 16
      loraformat extract ./base ./tuned -o a.safetensors --rank auto:0.9 --max-rank 64 --targets q_proj,v_proj
    """
    from loraformat.extraction import extract

    with progress(None, "modules", unit="tensor") as bar:
        result = extract(
            base,
            tuned,
            out,
            rank=rank,
            targets=targets,
            min_rank=min_rank,
            max_rank=max_rank,
            device=device,
            dtype=dtype,
            save_changed=save_changed,
            exact=exact,
            overwrite=overwrite,
            name=name,
            progress=bar,
        )
    if as_json:
        emit_json(result.to_json())
        return
    for note in result.warnings:
        warn(note)
    ranks = sorted({m["rank"] for m in result.modules.values()})
    info(
        f"wrote {result.output}: {len(result.modules)} modules, rank {ranks[0]}"
        + (f"-{ranks[-1]}" if len(ranks) > 1 else "")
        + f", {result.parameters:,} parameters ({human_bytes(result.file_size)}); relative error max "
        f"{result.max_relative_error:.4f}, energy kept min {result.min_energy_kept:.4f}; {result.identical} "
        f"tensors identical, {len(result.changed)} other changed; {result.seconds:.1f} s, peak RSS "
        f"{human_bytes(result.peak_rss_bytes)}"
    )


@click.command("unmerge")
@click.argument("merged", type=click.Path(path_type=str))
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...")
@click.option(
    "-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Output model directory."
)
@click.option(
    "--weight",
    "weights",
    multiple=True,
    type=float,
    help="The weight each adapter was merged with, in order (repeat once per adapter; default 1).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--no-verify", is_flag=True, help="Skip checking MERGED's merge record and the recovered digests."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print figures and what was verified as JSON.")
def unmerge_cmd(
    merged: str,
    adapters: tuple[str, ...],
    out: str,
    weights: tuple[float, ...],
    device: str,
    no_verify: bool,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Recover a base from MERGED, a checkpoint with ADAPTER(s) merged in: W = W' - sum_i w_i s_i B_i A_i.

    The exact inverse of merge, streamed the same way (fp32, rounded once, untouched tensors copied). The
    result is within one rounding of the base (bf16: |W_rec - W| <= 1/2 ulp of the merged weight + 1/2 ulp
    of the recovered one); recovered targets are compared with the base digests the adapters recorded.

    \b
    Example:
      loraformat unmerge ./merged adapter.safetensors -o ./base-recovered
      loraformat unmerge ./blend a.safetensors b.safetensors --weight 0.7 --weight 0.3 -o ./base --json
    """
    from loraformat.unmerging import unmerge

    if weights and len(weights) != len(adapters):
        raise UsageError(f"got {len(weights)} --weight for {len(adapters)} adapter(s); give one per adapter")
    paths = [resolve_adapter(a) for a in adapters]
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(progress(None, "unmerging"))
        result = unmerge(
            merged,
            paths,
            out,
            weights=list(weights) or None,
            device=device,
            verify=not no_verify,
            overwrite=overwrite,
            progress=lambda nbytes, tensors: bar(nbytes),
        )
    if as_json:
        emit_json(result.to_json())
        return
    for note in result.warnings:
        warn(note)
    rec = result.verified.get("recovered_digests") or {}
    info(
        f"wrote {result.output}: {result.tensors} tensors ({result.tensors_merged} unmerged, "
        f"{result.tensors_copied} copied) in {result.seconds:.2f} s; merge record "
        f"{result.verified.get('merge_record')}; recovered digests identical "
        f"{rec.get('identical', 0)}/{rec.get('checked', 0)}"
    )


COMMANDS: list[click.Command] = [extract_cmd, unmerge_cmd]
