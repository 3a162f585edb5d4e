"""What ``brainscan up`` leaves in the var folder for the CLI: the API key and the URL it serves.

The two are a pair: ``var/api-key`` is a key of *that* stack's database, so the client commands use
it only for the URL in ``var/api-url`` (and, for a key file written before URLs were saved, for the
default URL). Calling another URL needs ``--key`` or ``BRAINSCAN_API_KEY``: a stale embedded key
is never sent to someone else's service.
"""

from __future__ import annotations

from pathlib import Path

from brainscan.settings import Settings

URL_FILE = "api-url"


def url_file(settings: Settings) -> Path:
    return settings.var_dir / URL_FILE


def connectable_url(host: str, port: int) -> str:
    """The URL a client on this machine calls for an API bound to ``host:port``."""
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}"


def write_url(settings: Settings, url: str) -> None:
    path = url_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(url + "\n")
    tmp.replace(path)


def saved_url(settings: Settings) -> str | None:
    """The URL the last ``brainscan up`` with this var folder served, if any."""
    path = url_file(settings)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
