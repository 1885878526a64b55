"""Push an output folder to the Hub: create the repo, upload everything in one commit.

Never writes to the source repo. On failure the local folder is kept and the error says how to retry.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from .errors import PushError

UNPUSHED_REPO = "path/to/this/folder"  # the card's usage snippet names this path until the folder is pushed
UNPUSHED_NOTE = f"# {UNPUSHED_REPO}: this folder; pushing it (hfcompress push) writes the repo id here\n"


def _files(folder: str, repo_id: str, named_repo: str | None) -> list[Any]:
    """Every file of `folder` except git's and the Hub client's own folders. In the card, the model path of the usage
    snippet (a placeholder, or `named_repo` the run meant to push to) becomes `repo_id`; the rest of the card,
    including any hand edits, is uploaded as it is."""
    from huggingface_hub import CommitOperationAdd

    operations = []
    for path in sorted(Path(folder).rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or relative.parts[0] in (".git", ".cache"):
            continue
        content: str | bytes = str(path)
        if relative.as_posix() == "README.md":
            content = path.read_bytes()
            for old in filter(None, (UNPUSHED_REPO, named_repo)):
                content = content.replace(f'"{old}"'.encode(), f'"{repo_id}"'.encode())
            content = content.replace(UNPUSHED_NOTE.encode(), b"")
        operations.append(CommitOperationAdd(path_in_repo=relative.as_posix(), path_or_fileobj=content))
    return operations


def check_push_target(repo_id: str, *sources: str | None) -> None:
    """`repo_id` must be `namespace/name` and none of `sources` (Hub ids are case-insensitive)."""
    if repo_id.count("/") != 1:
        raise PushError(f"push target {repo_id!r} must be a repo id of the form `namespace/name`")
    if any(source and repo_id.strip("/").lower() == source.strip("/").lower() for source in sources):
        raise PushError(f"refusing to push to {repo_id!r}: it is the source model; choose a new repo id")


def check_token(token: str | None = None) -> None:
    """Fail before any heavy work when a push could not authenticate."""
    from huggingface_hub import get_token

    if not (token or get_token()):
        raise PushError("pushing needs a Hub token: run `hf auth login` or set HF_TOKEN (a token with write access)")


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
         endpoint: str | None = None, commit_message: str | None = None) -> str:
    """Upload `folder` to the model repo `repo_id` (created if missing) in one commit; return the commit URL.

    Args:
        folder: a saved hfcompress output.
        repo_id: `namespace/name` to push to; must differ from the model the folder was made from.
        private: create the repo as private (an existing repo keeps its visibility).
        token: Hub token; default: HF_TOKEN or the stored login.
        endpoint: Hub URL; default: HF_ENDPOINT or huggingface.co.
    """
    from huggingface_hub import HfApi

    from .formats import read_metadata

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise PushError(f"nothing to push: {folder!r} is not a folder")
    metadata = read_metadata(folder) or {}
    check_push_target(repo_id, metadata.get("recipe", {}).get("model", {}).get("id"), metadata.get("base_model"))
    files = _files(folder, repo_id, metadata.get("output", {}).get("push_to"))
    api = HfApi(endpoint=endpoint, token=token)
    retry = f"hfcompress push {shlex.quote(folder)} --to {shlex.quote(repo_id)}" + (" --private" if private else "")
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if private and not api.repo_info(repo_id, repo_type="model").private:
            raise PushError(f"{repo_id!r} already exists and is public, and --private does not change an existing "
                            "repo: make it private on the Hub first, or push to a new name. The compressed model is "
                            f"kept in {folder!r}")
        commit = api.create_commit(repo_id, files, repo_type="model",
                                   commit_message=commit_message or "Upload model compressed with hfcompress")
    except PushError:
        raise
    except Exception as error:  # HTTP errors, but also the HTTP client's own (no network, DNS, TLS, timeouts)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PushError(f"push to {repo_id!r} failed ({type(error).__name__}: {reason}). The compressed model is "
                        f"kept in {folder!r}; retry with: {retry}") from None
    return commit.commit_url
