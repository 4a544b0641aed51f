"""Uploading a saved quantized folder to the Hugging Face Hub."""
from __future__ import annotations

import fnmatch
from pathlib import Path

from .serialization import WEIGHTS_NAME

# What an upload carries: the model, its config and card, tokenizer/processor files, and results.json.
UPLOAD_PATTERNS = ["config.json", WEIGHTS_NAME, "README.md", "results.json", "reconstruction.png", "tokenizer*", "vocab*", "merges.txt",
                   "special_tokens_map.json", "spiece.model", "preprocessor_config.json"]


def upload_files(folder: str | Path) -> list[str]:
    """The files of ``folder`` that ``push_to_hub`` uploads (sorted)."""
    names = [p.name for p in Path(folder).iterdir() if p.is_file()]
    return sorted(n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in UPLOAD_PATTERNS))


def push_to_hub(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create ``repo_id`` if needed and upload the quantized folder through huggingface_hub; returns the URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=upload_files(folder),
                               commit_message="Upload QDrop-quantized model")
    return str(getattr(commit, "commit_url", commit))
