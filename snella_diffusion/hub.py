"""The one way this package fetches a file from the Hugging Face Hub.

``huggingface_hub`` is imported only when a download is asked for, so importing the package
(or running its tests, which build every model from configs) never reaches the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import SnellaError

# Keyword arguments passed through to ``huggingface_hub.hf_hub_download``.
HUB_DOWNLOAD_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "force_download", "proxies")


class HubDownloadError(SnellaError):
    """A file could not be fetched from the Hugging Face Hub (offline, unknown repo or file,
    no access); the message names the repo id and the file."""


def download_hub_file(repo_id: str, filename: str, **hub_kwargs: Any) -> Path:
    """Local path of ``filename`` in the Hub repository ``repo_id`` (downloaded or cached).

    Args:
        repo_id: ``"owner/name"`` (or ``"name"``).
        filename: the file's path inside the repository.
        hub_kwargs: any of ``HUB_DOWNLOAD_KWARGS``.
    Raises:
        HubDownloadError: an unknown keyword, or the download failed; the message names
            ``repo_id`` and ``filename`` and carries the Hub's reason.
    """
    unknown = sorted(set(hub_kwargs) - set(HUB_DOWNLOAD_KWARGS))
    if unknown:
        raise HubDownloadError(f"unknown keyword argument(s) for a Hub download: {', '.join(unknown)}")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename=filename, **hub_kwargs))
    except Exception as error:  # huggingface_hub raises many types (offline, 404, auth, ...)
        raise HubDownloadError(
            f"{repo_id}: {filename!r} could not be fetched from the Hugging Face Hub "
            f"({type(error).__name__}: {error})"
        ) from error
