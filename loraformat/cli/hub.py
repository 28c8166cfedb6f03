"""``push``, ``pull`` and ``list``: a thin click layer over loraformat.hub."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

from loraformat.cli.common import emit_json, human_bytes, info, progress, progress_enabled, settings, warn

if TYPE_CHECKING:
    from loraformat.hub.refs import HubSpec

HUB_HELP = (
    "Hub: a local hub directory (PATH or file://PATH), an http(s):// Hub endpoint, or 'hf'. "
    "Default: $LORAFORMAT_HUB, else the Hugging Face Hub (HF_ENDPOINT, token from HF_TOKEN or `hf auth login`)."
)


def _prepare_hub(hub: str | HubSpec | None) -> HubSpec:
    """Select the hub; for the Hugging Face Hub, align its own progress bars and logging with --quiet/--debug."""
    from loraformat.hub.refs import select_hub

    spec = select_hub(hub)
    if spec.kind == "hf":
        from loraformat.hub.hf import quiet_logging, set_progress_bars

        set_progress_bars(progress_enabled())
        if not settings().debug:
            quiet_logging()
    return spec


@click.command("push")
@click.argument("adapter", type=click.Path(path_type=str))
@click.argument("repo_id")
@click.option("--hub", help=HUB_HELP)
@click.option(
    "--revision",
    "-r",
    metavar="BRANCH",
    help="Branch to commit to (created from main if missing). Default: main.",
)
@click.option("--tag", help="Also tag the new revision (tags are immutable; an existing tag is an error).")
@click.option(
    "--private",
    is_flag=True,
    help="Create the repository private (Hugging Face Hub; recorded only on "
    "a local hub, which has no access control).",
)
@click.option("--message", "-m", help="Commit message (default: a summary of the adapter).")
@click.option("--no-validate", is_flag=True, help="Push even if validation finds errors.")
@click.option(
    "--for",
    "engine",
    type=click.Choice(["vllm", "peft"]),
    help="Publish this engine's exact layout (as 'convert --for'); e.g. --for vllm refuses what vLLM cannot "
    "load. Without it, a push warns about anything vLLM would refuse.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push_cmd(
    adapter: str,
    repo_id: str,
    hub: str | None,
    revision: str | None,
    tag: str | None,
    private: bool,
    message: str | None,
    no_validate: bool,
    engine: str | None,
    as_json: bool,
) -> None:
    """Publish ADAPTER (a loraformat file or a PEFT directory) to REPO_ID (ORG/NAME) as one revision.

    The adapter is validated first (structure, schema, NaN/Inf, content hash). The revision holds
    adapter_model.safetensors (the loraformat file; a PEFT input is converted), adapter_config.json and a model
    card README.md, so PEFT and vLLM load the repository directly. Exit codes: 0 pushed, 1 invalid adapter,
    2 usage error (e.g. the tag exists), 3 not found, 4 authentication refused, 5 network or offline.

    \b
    Examples:
      loraformat push adapter.safetensors acme/summarise --tag v1                   # Hugging Face Hub
      loraformat push ./peft-adapter acme/summarise --hub /shared/lora-hub -r dev   # local hub, branch dev
      LORAFORMAT_HUB=/shared/lora-hub loraformat push adapter.safetensors acme/summarise -m "retrained"
      loraformat push adapter.safetensors acme/summarise --for vllm                 # vLLM's exact layout
    """
    from loraformat.hub import push

    spec = _prepare_hub(hub)
    size = _size(adapter)
    with progress(size, "pushing") as update:
        result = push(
            adapter,
            repo_id,
            hub=spec,
            revision=revision,
            tag=tag,
            private=private,
            message=message,
            validate=not no_validate,
            progress=update,
            engine=engine,
        )
    for note in result.warnings:
        warn(f"{adapter}: {note}")
    if as_json:
        emit_json(result.to_json())
        return
    what = "pushed" if result.created else "unchanged (the branch already holds this adapter)"
    tagged = f", tag {result.tag}" if result.tag else ""
    converted = " (converted from PEFT)" if result.converted else ""
    info(
        f"{what}: {repo_id}@{result.branch}{tagged} -> commit {result.commit[:12]} on {result.hub}{converted}"
    )
    info(f"  {result.url}")


def _size(path: str) -> int | None:
    try:
        if os.path.isdir(path):
            return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
        return os.path.getsize(path)
    except OSError:
        return None


@click.command("pull")
@click.argument("repo_id")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=str),
    help="Output directory (appears complete or not at all).",
)
@click.option("--hub", help=HUB_HELP)
@click.option("--revision", "-r", metavar="REV", help="Branch, tag or commit (default: main).")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output directory (once the new one is complete)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull_cmd(
    repo_id: str, out: str, hub: str | None, revision: str | None, overwrite: bool, as_json: bool
) -> None:
    """Fetch REPO_ID (ORG/NAME, or a hub reference hf://ORG/NAME@REV / lfhub://ORG/NAME@REV) into a directory.

    The download is verified before the directory appears: sizes and hashes against the hub's records, the
    adapter's content hash against its tensor data, the metadata against the schema; a remote file name that
    would escape the directory is refused. Revisions are cached under $LORAFORMAT_CACHE: pulling one again
    transfers nothing. The files are read-only hard links to the cache where the filesystem allows (copy one
    before editing it). Exit codes: 0 pulled, 1 verification failed, 2 usage error (e.g. DIR exists without
    --overwrite), 3 repository/revision/file not found, 4 authentication refused, 5 network or offline.

    \b
    Examples:
      loraformat pull acme/summarise -o ./summarise --revision v1
      loraformat pull acme/summarise -o ./summarise --hub /shared/lora-hub -r 3f9c2a1b
      loraformat pull hf://acme/summarise@v1 -o ./summarise
    """
    from loraformat.errors import UsageError
    from loraformat.hub import pull
    from loraformat.hub.refs import is_hub_ref, parse_hub_ref

    spec_arg: str | HubSpec | None = hub
    if is_hub_ref(repo_id):
        if hub is not None:
            raise UsageError("give either --hub or a hub reference (hf://, lfhub://), not both")
        ref = parse_hub_ref(repo_id)
        if revision is not None and ref.revision is not None and revision != ref.revision:
            raise UsageError(f"--revision {revision} contradicts {repo_id}")
        spec_arg, repo_id, revision = ref.hub, ref.repo_id, revision or ref.revision
    spec = _prepare_hub(spec_arg)
    with progress(None, "pulling") as update:
        result = pull(
            repo_id,
            out,
            hub=spec,
            revision=revision,
            overwrite=overwrite,
            progress=update,
        )
    if result.offline:
        warn(f"hub unreachable: used the cached {repo_id}@{result.revision} (commit {result.commit[:12]})")
    if as_json:
        emit_json(result.to_json())
        return
    source = "from the cache" if result.cached else f"from {result.hub}"
    checked = f", content {result.content_hash[:16]} verified" if result.content_hash else ""
    info(
        f"pulled {repo_id}@{result.revision} (commit {result.commit[:12]}) {source} into {result.output}: "
        f"{len(result.files)} files, {human_bytes(sum(result.files.values()))}{checked}"
    )


@click.command("list")
@click.option("--hub", help="Local hub directory (PATH or file://PATH). Default: $LORAFORMAT_HUB.")
@click.option("--json", "as_json", is_flag=True, help="Print the repositories as JSON.")
def list_cmd(hub: str | None, as_json: bool) -> None:
    """List the repositories of a local hub with their branches and tags.

    \b
    Example:
      loraformat list --hub /shared/lora-hub
    """
    from loraformat.hub import list_repos

    repos = list_repos(hub)
    if as_json:
        emit_json([r.to_json() for r in repos])
        return
    if not repos:
        info("no repositories")
    for repo in repos:
        private = ", private" if repo.private else ""
        info(f"{repo.repo_id}  ({repo.revisions} revision{'s' if repo.revisions != 1 else ''}{private})")
        for kind, refs in (("branch", repo.branches), ("tag", repo.tags)):
            for name, commit in sorted(refs.items()):
                info(f"  {kind:<6} {name:<24} {commit[:12]}")


COMMANDS: list[click.Command] = [push_cmd, pull_cmd, list_cmd]
