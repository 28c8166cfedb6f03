"""``validate`` and ``inspect``: thin click layers over loraformat.validation and loraformat.inspection.

Neither imports torch: inspect reads headers; validate's default level, data, tests the raw bits of every tensor
with numpy (torch is imported only for --level base digests of in-memory tensors and for pickles).
"""

from __future__ import annotations

from typing import Any

import click

from loraformat.cli.common import emit_json, info, resolve_adapter
from loraformat.constants import LEVELS


@click.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "--base",
    type=click.Path(path_type=str),
    help="Base model (directory, shards or one .safetensors) to check the targets against.",
)
@click.option(
    "--level",
    type=click.Choice([str(level) for level in LEVELS]),
    help="header: structure, schema, shapes (fast: no tensor data read); data: + NaN/Inf, zero deltas, "
    "content hash; base: + targets, structure hash, digests.  [default: data, or base with --base]",
)
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
@click.option(
    "--for",
    "engine",
    metavar="ENGINE",
    help="Predict what ENGINE (vllm, llama.cpp, peft) would refuse or serve wrong: rank caps, flattened "
    "scales, unsupported features and targets, zero deltas; with --base, the base's fit. Header only.",
)
@click.option(
    "--max-lora-rank",
    type=int,
    help="With --for vllm: the server's max_lora_rank (default vLLM's 16).",
)
@click.option("--json", "as_json", is_flag=True, help="Print every path's findings as JSON.")
@click.option(
    "--config", type=click.Path(path_type=str), help="adapter_config.json for a bare PEFT .safetensors."
)
@click.option(
    "--allow-pickle", is_flag=True, help="Load adapter_model.bin with torch.load(weights_only=True)."
)
@click.option(
    "--jobs",
    type=int,
    metavar="N",
    help="Validate in N local processes (0: one per core); the report is the same as a one-process run.",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="auto",
    default=None,
    metavar="[ADDRESS]",
    help="Validate on a Ray cluster whose nodes see the paths (default address: RAY_ADDRESS or the local "
    "cluster). Put it after the paths, or write --ray=ADDRESS.",
)
def validate_cmd(
    paths: tuple[str, ...],
    base: str | None,
    level: str | None,
    strict: bool,
    engine: str | None,
    max_lora_rank: int | None,
    as_json: bool,
    config: str | None,
    allow_pickle: bool,
    jobs: int | None,
    ray_address: str | None,
) -> None:
    """Check adapters: native .safetensors files, PEFT directories, or directories searched for both.

    Prints one line per finding (PATH: SEVERITY: CODE: LOCATION: MESSAGE) and a summary. Exit codes: 0 valid,
    1 findings at the failing severity (errors; warnings too with --strict), 2 usage or I/O error.

    \b
    Examples:
      loraformat validate adapter.safetensors
      loraformat validate ./adapters/ --strict --json
      loraformat validate ./adapters/ --level header          # the fast path: headers only
      loraformat validate adapter.safetensors --base ./base-model
      loraformat validate /shared/tenants/ --base /shared/base --jobs 8
      loraformat validate /shared/tenants/ --base /shared/base --ray=10.0.0.1:6379
      loraformat validate ./peft-adapter --for vllm --max-lora-rank 32 --json
      loraformat validate adapter.safetensors --for llama.cpp --base ./base-model
    """
    from loraformat.engine_check import format_facts
    from loraformat.validation import ValidationReport, summarize, validate_many

    resolved = [resolve_adapter(p) for p in paths]
    options: dict[str, Any] = dict(base=base, level=level, config=config, allow_pickle=allow_pickle)
    reports: list[ValidationReport]
    if engine is not None:
        from loraformat.engine_check import validate_for

        if level is not None or jobs is not None or ray_address is not None:
            raise click.UsageError(
                "--for checks the header (and --base) in this process: no --level, --jobs, --ray"
            )
        options.pop("level")
        reports = list(validate_for(resolved, engine, max_lora_rank=max_lora_rank, **options))
    elif max_lora_rank is not None:
        raise click.UsageError("--max-lora-rank goes with --for vllm")
    elif jobs is not None or ray_address is not None:
        from loraformat.distributed import validate as validate_distributed

        reports = validate_distributed(resolved, jobs=jobs, address=ray_address, **options)
    else:
        reports = validate_many(resolved, **options)
    summary = summarize(reports, strict=strict)
    ok = summary["invalid"] == 0
    if as_json:
        emit_json(
            {
                "ok": ok,
                "strict": strict,
                "level": reports[0].level if reports else level,
                "summary": summary,
                "reports": [r.to_json(strict) for r in reports],
            }
        )
    else:
        for report in reports:
            for finding in report.findings:
                click.echo(finding.format(report.path))
            facts = format_facts(report)
            if facts:
                info(facts)
            if not report.findings:
                info(
                    f"{report.path}: ok ({report.source_format}, {report.modules} modules, level {report.level})"
                )
        info(
            f"{summary['checked']} checked: {summary['valid']} valid, {summary['invalid']} invalid "
            f"({summary['errors']} errors, {summary['warnings']} warnings{', strict' if strict else ''})"
        )
    if not ok:
        raise click.exceptions.Exit(1)


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option(
    "--json", "as_json", is_flag=True, help="Print the description as JSON (with the module table)."
)
@click.option(
    "--spectrum",
    is_flag=True,
    help="Also show each module's singular-value spectrum and effective rank (reads the tensors).",
)
@click.option(
    "--config", type=click.Path(path_type=str), help="adapter_config.json for a bare PEFT .safetensors."
)
@click.option(
    "--allow-pickle", is_flag=True, help="Load adapter_model.bin with torch.load(weights_only=True)."
)
@click.option(
    "--base",
    type=click.Path(path_type=str),
    help="Resolve a kohya file's underscored module names against this base (pipeline, folder, checkpoint).",
)
def inspect_cmd(
    path: str, as_json: bool, spectrum: bool, config: str | None, allow_pickle: bool, base: str | None
) -> None:
    """Describe an adapter: spec version, base identity and hashes, ranks, alphas, scaling, targets,
    trainable parameters against full fine-tuning, file size, dtypes, provenance; for kohya and diffusers
    files the layout, the pipeline components targeted and kohya's training metadata in plain words. Reads the
    header only.

    \b
    Examples:
      loraformat inspect adapter.safetensors
      loraformat inspect ./peft-adapter --json
      loraformat inspect adapter.safetensors --spectrum
      loraformat inspect civitai_lora.safetensors --base ./sd15-pipeline
    """
    from loraformat.inspection import format_text, inspect

    local = resolve_adapter(path)
    described = inspect(local, config=config, allow_pickle=allow_pickle, base=base)
    spec_result = None
    if spectrum:
        from loraformat.rescaling import spectrum as compute_spectrum

        spec_result = compute_spectrum(local)
    if as_json:
        if spec_result is not None:
            described["spectrum"] = spec_result.to_json()
        emit_json(described)
        return
    click.echo(format_text(described))
    if spec_result is not None:
        click.echo(spec_result.format_text())


COMMANDS: list[click.Command] = [validate_cmd, inspect_cmd]
