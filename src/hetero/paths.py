"""Where hetero keeps its cache (synthetic weights, hardware profiles, converted plans)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """~/.cache/hetero, or $HETERO_CACHE when set."""
    root = os.environ.get("HETERO_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "hetero"
    if path.exists() and (not path.is_dir() or not os.access(path, os.W_OK | os.X_OK)):
        from hetero.errors import HeteroError

        what = "not a directory" if not path.is_dir() else "not writable"
        raise HeteroError(f"cache dir {path} is {what}; set HETERO_CACHE to a writable directory")
    return path


def check_output_dir(out: str | Path) -> Path:
    """`out` can become a directory hetero writes: its parent is a writable dir and `out` itself,
    when it exists, is a dir. Checked before hours of work, not after."""
    from hetero.errors import HeteroError

    p = Path(out).expanduser()
    parent = p.resolve().parent
    if p.exists() and not p.is_dir():
        raise HeteroError(f"{p} exists and is not a directory")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or str(parent).startswith(("/proc", "/sys")):
        raise HeteroError(f"cannot write into {parent}: not a writable directory")
    return p


def read_user_text(path: str | Path, what: str, limit: int = 16 << 20) -> str:
    """A small text file the user named (plan, hosts, table): a regular file, at most `limit`
    bytes, UTF-8; anything else (a FIFO, /dev/zero, a binary) is one clear error."""
    from hetero.errors import HeteroError

    p = Path(path).expanduser()
    try:
        if not p.is_file():
            raise HeteroError(f"{what} {p}: {'not a regular file' if p.exists() else 'no such file'}")
        if p.stat().st_size > limit:
            raise HeteroError(f"{what} {p} is over {limit >> 20} MB; is it the right file?")
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise HeteroError(f"{what} {p} is not UTF-8 text (binary?)") from None
    except OSError as e:
        raise HeteroError(f"cannot read {what} {p}: {e.strerror or e}") from None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a temp file named after a dead one is stale and may go)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True
