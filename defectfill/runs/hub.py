"""Uploading a run or a synthesis folder to the Hub. The token is used for the upload only; temporary and
hidden files never go up."""

from __future__ import annotations

from pathlib import Path


def upload_folder_to_hub(folder: Path, repo_id: str | None, token: str | None, repo_type: str = "model",
                         ignore_patterns: list[str] | None = None, commit_message: str = "DefectFill") -> str:
    """Create (or reuse) a Hub repo and upload `folder`; temporary files and hidden files never go up.
    Returns the repo id. Errors propagate: the caller says what is safe on disk."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id or folder.name, repo_type=repo_type, exist_ok=True, token=token).repo_id
    upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=str(folder), token=token, commit_message=commit_message,
                  ignore_patterns=["*.tmp", ".*", *(ignore_patterns or [])])
    return repo_id
