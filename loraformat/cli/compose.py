"""``compose`` and ``rescale``: thin click commands over loraformat.composition."""

from __future__ import annotations

import click

from loraformat.cli.common import emit_json, human_bytes, info, progress, resolve_adapter
from loraformat.errors import UsageError

METHOD_HELP = "cat | linear | svd | ties | dare_linear | dare_ties (see above)."


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected comma-separated numbers, e.g. 1,0.5,-0.3") from None


def _energy_line(modules: dict, key: str = "energy_kept") -> str:
    values = [m[key] for m in modules.values()]
    return f"energy kept: min {min(values):.4f}, mean {sum(values) / len(values):.4f}" if values else ""


@click.command("compose")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=str),
    help="Output native loraformat .safetensors file.",
)
@click.option("--method", required=True, metavar="METHOD", help=METHOD_HELP)
@click.option(
    "--weights", help="One weight per adapter, comma-separated (default 1 each); negative negates a task."
)
@click.option(
    "--rank",
    help="Target rank R, or auto:E (smallest rank keeping fraction E of each module's "
    "energy); svd/ties/dare only. Default: the largest parent rank.",
)
@click.option("--density", type=float, help="ties/dare: fraction of entries kept, in (0, 1].")
@click.option("--seed", type=int, default=0, show_default=True, help="dare: seed of the random drop.")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--name", help="Adapter name recorded in the metadata (default: the output's file name).")
@click.option("--force", is_flag=True, help="Compose adapters recorded against different bases anyway.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def compose_cmd(
    adapters: tuple[str, ...],
    out: str,
    method: str,
    weights: str | None,
    rank: str | None,
    density: float | None,
    seed: int,
    device: str,
    name: str | None,
    force: bool,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Combine adapters for the same base into one, module by module, from their factors (no base model
    loaded). Every delta is weighted: delta = sum_i w_i * s_i * B_i A_i.

    \b
    Methods:
      cat          exact weighted sum; rank = sum of the parents' ranks
      linear       the same exact sum, never wider than min(out, in). Unlike PEFT's
                   `linear`, which mixes A's and B's separately (cross terms), it IS the sum
      svd          the exact sum recompressed to --rank (optimal: truncated SVD from a
                   QR of the factors, never forming out x in)
      ties         trim to --density by magnitude, elect signs, disjoint mean; then SVD
      dare_linear  random drop (keep --density, rescale), weighted sum; then SVD
      dare_ties    random drop, then TIES sign election; then SVD
    ties/dare are approximations by nature; dare is deterministic for a --seed.
    The output uses alpha = rank (scale 1) and PEFT's tensor names, so PEFT and vLLM load it.
    DoRA adapters cannot be composed (the magnitude vector is nonlinear).

    \b
    Examples:
      loraformat compose math.safetensors code.safetensors -o mix.safetensors --method cat --weights 0.7,0.3
      loraformat compose a.safetensors b.safetensors -o ab.safetensors --method svd --rank auto:0.99
      loraformat compose task.safetensors bias.safetensors -o clean.safetensors --method svd --weights 1,-1 --rank 16
      loraformat compose a/ b/ c/ -o abc.safetensors --method ties --density 0.5 --rank 16
    """
    from loraformat.composition import compose

    paths = [resolve_adapter(a) for a in adapters]
    w = _weights(weights)
    with progress(None, "composing", unit="module") as update:
        result = compose(
            paths,
            out,
            method=method,
            weights=w,
            rank=rank,
            density=density,
            seed=seed,
            device=device,
            force=force,
            overwrite=overwrite,
            name=name,
            progress=update,
        )
    if as_json:
        emit_json(result.to_json())
        return
    ranks = sorted({m["rank"] for m in result.modules.values()})
    info(
        f"wrote {result.output} ({method}, {len(result.modules)} modules, rank "
        f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}, {result.parameters:,} parameters, "
        f"{human_bytes(result.file_size)}, content {result.content_hash[:16]}, {result.seconds:.2f} s)"
    )
    if method in ("svd", "ties", "dare_linear", "dare_ties"):
        info(_energy_line(result.modules))
    if result.forced:
        info("note: parents were recorded against different bases (--force); no base identity recorded")


@click.command("rescale")
@click.argument("adapter")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=str),
    help="Output native loraformat .safetensors file.",
)
@click.option("--scale", type=float, help="Multiply every module's delta by S (exact; goes into alpha).")
@click.option("--alpha", type=float, help="Set every module's alpha to A (exact; factors unchanged).")
@click.option("--rank", help="Lower ranks to R, or auto:E per module (optimal truncation; never upwards).")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--name", help="Adapter name recorded in the metadata (default: the output's file name).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def rescale_cmd(
    adapter: str,
    out: str,
    scale: float | None,
    alpha: float | None,
    rank: str | None,
    device: str,
    name: str | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Change an adapter's strength and/or shrink its rank, exactly where exactness is possible.

    --scale S multiplies every delta by S (a negative S flips B, since alpha must stay positive); --alpha A
    sets every alpha; alone, either leaves the factors as they are. --rank keeps the best rank-R
    approximation of each module (QR-core SVD; modules already at or below R are kept exactly) and reports
    the energy kept, the new parameter count and file size; the output then uses alpha = rank (scale 1)
    with the scale in the factors, as compose does, so loaders that drop rank/alpha patterns still work.

    \b
    Examples:
      loraformat rescale adapter.safetensors -o half.safetensors --scale 0.5
      loraformat rescale ./peft-adapter -o small.safetensors --rank 8
      loraformat rescale adapter.safetensors -o lean.safetensors --rank auto:0.95 --json
    """
    from loraformat.rescaling import rescale

    with progress(None, "rescaling", unit="module") as update:
        result = rescale(
            resolve_adapter(adapter),
            out,
            scale=scale,
            alpha=alpha,
            rank=rank,
            device=device,
            overwrite=overwrite,
            name=name,
            progress=update,
        )
    if as_json:
        emit_json(result.to_json())
        return
    changed = sum(1 for m in result.modules.values() if m["rank_after"] < m["rank_before"])
    info(
        f"wrote {result.output} ({len(result.modules)} modules, {changed} truncated, parameters "
        f"{result.parameters_before:,} -> {result.parameters_after:,}, size {human_bytes(result.file_size_before)}"
        f" -> {human_bytes(result.file_size_after)}, content {result.content_hash[:16]})"
    )
    if rank is not None:
        info(_energy_line(result.modules))


COMMANDS: list[click.Command] = [compose_cmd, rescale_cmd]
