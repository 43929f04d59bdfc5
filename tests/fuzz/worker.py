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


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def run_case(case: dict) -> dict:
    from hetero.errors import HeteroError

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(case.get("timeout", 20)))
    try:
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


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    limit = int(cases[0].get("as_limit", 0)) if cases else 0
    if limit:  # an address-space cap: an allocation sized from a hostile count fails, not the machine
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for case in cases:
        res = run_case(case)
        res["label"] = case.get("label", "")
        print(json.dumps(res), flush=True)
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)


if __name__ == "__main__":
    main()
