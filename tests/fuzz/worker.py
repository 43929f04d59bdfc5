"""Runs fuzz cases in one process (imports once) and prints one JSON line per case, then the peak RSS.

A case is `info` (the spec from headers only) or `run` (the spec, then, if it passed, load and
two greedy tokens). Outcomes:
ok (with tokens for `run`), error (a HeteroError: the clean refusal), bug (any other exception),
hang (over the per-case time limit). Usage: worker.py CASES.json
"""
from __future__ import annotations

import json
import resource
import signal
import sys

PROMPT = "hello there"


class _Hang(BaseException):
    """Not an Exception: the CLI's error boundary must not report it as a bug line."""


def _alarm(signum, frame):
    raise _Hang()


def run_case(case: dict) -> dict:
    from hetero.errors import HeteroError

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(case.get("timeout", 20)))
    try:
        if case["mode"] == "cli":
            return _cli(case["args"])
        from hetero.model.sources import resolve_spec

        try:
            resolve_spec(case["path"]).summary()
        except HeteroError as e:
            return {"outcome": "error", "stage": "info", "msg": str(e)[:200]}
        if case["mode"] == "info":
            return {"outcome": "ok"}
        import hetero

        m = hetero.load(case["path"], threads=1)
        ids = []
        for rec in m.stream(PROMPT, max_new_tokens=2, chat=case.get("chat", False)):
            ids += rec.token_ids
        m.close() if hasattr(m, "close") else None
        return {"outcome": "ok", "tokens": ids}
    except HeteroError as e:
        msg = str(e)
        return {"outcome": "error" if "\n" not in msg else "bug", "stage": "run", "msg": msg[:200]}
    except _Hang:
        return {"outcome": "hang"}
    except BaseException as e:  # noqa: BLE001 (the point: anything else is a bug)
        return {"outcome": "bug", "msg": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        signal.alarm(0)


def _cli(args: list[str]) -> dict:
    """`hetero ARGS` in this process: error = exit 2 with one `error:` line; bug = anything else
    that is not exit 0 (a traceback, exit 1's bug line)."""
    import contextlib
    import io

    from hetero.cli import main as cli_main

    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            cli_main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    lines = [x for x in err.getvalue().strip().splitlines() if x.strip() and not x.startswith(("note:", "warning:"))]
    if code == 0:
        return {"outcome": "ok"}
    if code == 2 and "Traceback" not in err.getvalue() and (
            len(lines) == 1 and lines[0].startswith("error:") or _usage_error(lines)):
        return {"outcome": "error", "stage": "cli", "msg": lines[-1][:200] if lines else ""}
    return {"outcome": "bug", "msg": f"exit {code}: {err.getvalue()[-300:]}"}


def _usage_error(lines: list[str]) -> bool:
    # click's own usage errors (a bad option value) are a box of a few lines ending in the reason.
    return bool(lines) and lines[0].lstrip().startswith(("Usage:", "╭")) and "Traceback" not in "".join(lines)


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    limit = int(cases[0].get("as_limit", 0)) if cases else 0
    if limit:  # an address-space cap: an allocation sized from a hostile count fails, not the machine
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for case in cases:
        res = run_case(case)
        res["label"] = case.get("label", "")
        print(json.dumps(res), flush=True)
    print(json.dumps({"peak_rss_bytes": _peak_rss()}), flush=True)


def _peak_rss() -> int:
    """This process image's peak RSS (VmHWM). Not ru_maxrss: Linux keeps that across fork+exec,
    so it would report the (large) parent's size at the fork."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
