"""hf:// dataset URLs: one file of a Hugging Face Hub repository, fetched by huggingface_hub.

The address is the one HfFileSystem and the `hf` command use:

    hf://datasets/<owner>/<name>[@<revision>]/<path in the repository>

huggingface_hub does the fetching, so its cache (HF_HUB_CACHE / HF_HOME), its offline switch
(HF_HUB_OFFLINE) and its token (HF_TOKEN) apply as they do everywhere else. Pin a revision (a
commit hash) to keep the file from changing under the dataset's sha256.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfUri, constants, hf_hub_download, parse_hf_uri
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HfUriError

from snaketune.errors import DownloadError, hub_offline

SCHEME = "hf"
_DOWNLOADABLE_TYPES = ("dataset", "model", "space")


def parse_hub_url(url: str) -> HfUri:
    """The repository, revision and file an hf:// URL names."""
    try:
        target = parse_hf_uri(url)
    except HfUriError as err:
        raise DownloadError(
            f"{err}. Expected hf://datasets/<owner>/<name>[@<revision>]/<file>"
        ) from err
    if target.type not in _DOWNLOADABLE_TYPES or not target.path_in_repo:
        raise DownloadError(
            f"url {url!r} does not name a file in a repository; expected "
            "hf://datasets/<owner>/<name>[@<revision>]/<file>"
        )
    return target


def fetch_from_hub(url: str) -> Path:
    """The local path of the file `url` names: from the cache, or downloaded into it."""
    target = parse_hub_url(url)
    try:
        path = hf_hub_download(
            target.id,
            target.path_in_repo,
            repo_type=target.type,
            revision=target.revision,
        )
    except EntryNotFoundError as err:  # also what a cache miss raises when the Hub is unreachable
        if hub_offline():
            raise DownloadError(offline_message(url, constants.HF_HUB_CACHE)) from err
        raise DownloadError(
            f"{url}: not found on the Hugging Face Hub, nor in the cache at "
            f"{constants.HF_HUB_CACHE} ({err}). Check the repository, revision and file name, "
            "and your network."
        ) from err
    except HfHubHTTPError as err:
        raise DownloadError(f"{url}: the Hugging Face Hub refused the download ({err})") from err
    return Path(path)


def offline_message(url: str, cache: str) -> str:
    return (
        f"{url} is not in the Hugging Face cache at {cache}, and HF_HUB_OFFLINE is set, so the Hub "
        "is not asked for it. Run once with network access and HF_HUB_OFFLINE unset to fill the "
        "cache, or download the file yourself and set the dataset's url to its local path (or a "
        "file:// or http(s):// URL)."
    )
