"""Where MLflow runs go: the configured store or MLFLOW_TRACKING_URI, checked before any job
and again before an upload, with one message per way it can fail, each saying what to do.
Credentials in a URI are used but never written anywhere (`redact`).
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from snaketune.errors import TrackingError

TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SERVER_SCHEMES = ("http", "https")
HOSTED_SCHEMES = ("databricks", "databricks-uc", "uc")
USABLE = (*DATABASE_SCHEMES, *SERVER_SCHEMES, *HOSTED_SCHEMES)
KEPT = "Every result is complete under results/; "


def store_uri(configured: str | None, default_store: Path) -> str:
    """The config's mlflow.tracking_uri, or the SQLite store in the results folder."""
    return configured or f"sqlite:///{Path(default_store).resolve()}"


def effective_tracking_uri(configured: str) -> str:
    """MLFLOW_TRACKING_URI wins over the config."""
    return os.environ.get(TRACKING_URI_VARIABLE) or configured


def redact(uri: str) -> str:
    """The URI without credentials (user:password@ or a token in the userinfo part)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def scheme_of(uri: str) -> str:
    return urlsplit(uri).scheme.split("+")[0]  # postgresql+psycopg2 is postgresql


def uri_problem(uri: str) -> str | None:
    """Why runs cannot be written at `uri`, or None; needs no network."""
    scheme = scheme_of(uri)
    if scheme in ("", "file"):
        return (
            f"{redact(uri)} is a file store, which MLflow 3 no longer takes new runs in: use "
            "sqlite:///<folder>/mlflow.db (an empty mlflow.tracking_uri means "
            "results/mlflow.db) or an http(s) tracking server"
        )
    if scheme not in USABLE:
        return f"{redact(uri)} has scheme {scheme!r}; MLflow stores are {list(USABLE)}"
    return None


def tracking_problems(configured: str) -> list[str]:
    """Before any job: the configured store and MLFLOW_TRACKING_URI, each by its name."""
    problems = []
    if configured and (problem := uri_problem(configured)):
        problems.append(f"mlflow.tracking_uri: {problem}")
    from_env = os.environ.get(TRACKING_URI_VARIABLE)
    if from_env and (problem := uri_problem(from_env)):
        problems.append(f"{TRACKING_URI_VARIABLE} (environment): {problem}")
    return problems


def check_usable(uri: str) -> None:
    """Before an upload: a store MLflow can write, and for a server, one that answers."""
    problem = uri_problem(uri)
    if problem:
        raise TrackingError(f"{problem}. {KEPT}fix the tracking URI and rerun snakemake.")
    if scheme_of(uri) in SERVER_SCHEMES:
        check_reachable(uri)


def check_reachable(uri: str) -> None:
    parts = urlsplit(uri)
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    health = urlunsplit(parts._replace(netloc=netloc)).rstrip("/") + "/health"
    request = urllib.request.Request(health)
    if parts.username is not None:  # urllib takes credentials as a header, not in the URL
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise TrackingError(refused_credentials(uri, err.code)) from err
        raise TrackingError(unreachable(uri, err)) from err
    except OSError as err:
        raise TrackingError(unreachable(uri, err)) from err


def unreachable(uri: str, err: Exception) -> str:
    return (
        f"MLflow tracking server {redact(uri)} is unreachable ({err}). {KEPT}start the server "
        "(or fix MLFLOW_TRACKING_URI / mlflow.tracking_uri) and rerun snakemake to upload them."
    )


def refused_credentials(uri: str, status: int) -> str:
    return (
        f"MLflow tracking server {redact(uri)} refused the credentials (HTTP {status}). {KEPT}"
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
        "to an account of that server and rerun snakemake."
    )


def write_failed(uri: str, err: Exception) -> str:
    """What a failed write to the store means, from what MLflow raised."""
    text = str(err)
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403) or any(f"error code {c}" in text for c in (401, 403)):
        return refused_credentials(uri, status or (401 if "401" in text else 403))
    return (
        f"writing to MLflow at {redact(uri)} failed: {text.splitlines()[0] if text else err!r}. "
        "Results on disk are complete; rerun snakemake to retry the upload."
    )
