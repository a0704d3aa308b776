"""Command line: ``bms-gateway run | demo | replay | check-config | status``.

Exit codes are a contract with systemd: 0 clean stop; 78 configuration error (the unit does not
restart on it); anything else is a crash and systemd restarts the daemon.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import CREDENTIALS_PREFIX, Config, load_config
from gateway.errors import ConfigError, SourceError, StoreError
from gateway.supervisor import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bms-gateway", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"bms-gateway {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", required=True, type=Path, help="configuration file (TOML)")

    demo = sub.add_parser("demo", help="simulator → gateway → MQTT, with a live view of records")
    demo.add_argument("--seconds", type=float, default=None,
                      help="stop after this many seconds (default: until Ctrl-C)")
    demo.add_argument("--broker", metavar="HOST:PORT", default=None,
                      help="publish here (default: localhost:1883 if a broker answers, else a "
                           "private mosquitto on a free port)")
    demo.add_argument("-c", "--config", type=Path, default=None,
                      help="demo configuration (default: config/demo.toml of this checkout)")

    check = sub.add_parser("check-config", help="validate a configuration, its profile and DBC")
    check.add_argument("-c", "--config", required=True, type=Path)

    status = sub.add_parser("status", help="the daemon's counters (works whether it runs or not)")
    status.add_argument("-c", "--config", required=True, type=Path)
    status.add_argument("--json", action="store_true", help="one JSON object, for machines")

    replay = sub.add_parser("replay", help="run the pipeline over recorded traces")
    replay.add_argument("-c", "--config", required=True, type=Path)
    replay.add_argument("--fast", action="store_true", help="as fast as possible, not real time")
    replay.add_argument("--out", type=Path, default=None, metavar="RECORDS.jsonl",
                        help="write each envelope as a JSON line instead of publishing")
    replay.add_argument("traces", nargs="+", type=Path, metavar="TRACE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "demo":
            from gateway.demo import run_demo
            return run_demo(seconds=args.seconds, broker=args.broker, config_path=args.config)
        if args.command == "check-config":
            return _check_config(args)
        if args.command == "status":
            return _status(args)
        if args.command == "replay":
            return _replay(args)
    except ConfigError as exc:
        print(f"bms-gateway: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (SourceError, StoreError) as exc:
        print(f"bms-gateway: {exc}", file=sys.stderr)
        return EXIT_SOFTWARE
    except KeyboardInterrupt:
        return EXIT_OK
    raise AssertionError(args.command)


def _start(config: Config, **kwargs: Any) -> int:
    from gateway.app import Gateway
    from gateway.logging import configure_logging

    configure_logging(config.gateway.log_level, config.gateway.log_format)
    gateway = Gateway(config, **kwargs)
    gateway.supervisor.install_signal_handlers()
    return gateway.run()


def _run(args: argparse.Namespace) -> int:
    return _start(load_config(args.config))


def _replay(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    source = dataclasses.replace(
        config.source, kind="replay", files=[str(t.resolve()) for t in args.traces],
        replay_speed=0.0 if args.fast else config.source.replay_speed)
    config = dataclasses.replace(config, source=source)
    return _start(config, out_jsonl=args.out)


def _check_config(args: argparse.Namespace) -> int:
    from gateway.decode.profile import load_profile

    config = load_config(args.config)
    profile = load_profile(config.profile.path, dbc_override=config.profile.dbc or None)
    problems = []
    for key, value in (("mqtt.password_file", config.mqtt.password_file),
                       ("mqtt.tls.ca_file", config.mqtt.tls.ca_file),
                       ("mqtt.tls.cert_file", config.mqtt.tls.cert_file),
                       ("mqtt.tls.key_file", config.mqtt.tls.key_file)):
        if value.startswith(CREDENTIALS_PREFIX):
            # CREDENTIALS_DIRECTORY is unset: not run by the service, which alone can read it
            print(f"bms-gateway: note: {key} is a systemd credential, checked when the service "
                  "starts", file=sys.stderr)
        elif value and not os.access(value, os.R_OK):
            problems.append(f"{config.file}, key '{key}': cannot read {value}")
    if config.source.kind == "replay":
        from gateway.sources.replay import check_trace
        for f in config.source.files:
            check_trace(Path(f))
    if problems:
        for p in problems:
            print(f"bms-gateway: configuration error: {p}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{config.file}: OK — gateway {config.gateway.id}, source {config.source.kind}, "
          f"profile {profile.name}, store {config.store.path}, "
          f"broker {config.mqtt.host}:{config.mqtt.port}")
    return EXIT_OK


# -- status ------------------------------------------------------------------------------------

#: a status document older than this means the daemon is not running (it writes every few s)
_STALE_S = 30.0
#: dead letters ``status`` lists, newest first (the counts by reason cover them all)
_RECENT_DEAD_LETTERS = 5


def status_summary(config: Config) -> dict[str, Any]:
    """Everything ``status`` shows, as one flat-ish dict (also the ``--json`` output)."""
    from gateway.app import STATUS_META_KEY
    from gateway.metrics import flatten
    from gateway.store.sqlite import MOVED_ASIDE_META_KEY, read_dead_letters, read_status

    stats, meta = read_status(config.store.path)
    recent = read_dead_letters(config.store.path, _RECENT_DEAD_LETTERS) if stats.dead_letters \
        else []
    doc = json.loads(meta.get(STATUS_META_KEY) or "{}")
    flat = flatten(doc.get("metrics", {}))
    updated = doc.get("updated_at")
    pid = doc.get("pid")
    running = bool(updated and time.time() - updated < _STALE_S and pid and _pid_alive(pid))
    out: dict[str, Any] = {
        "gateway_id": config.gateway.id,
        "daemon_running": running,
        "status_updated_at": updated,
        "frames_rx_total": flat.get("frames_rx_total", 0),
        "frames_rejected_total": flat.get("frames_rejected_total", 0),
        "frames_dropped_total": flat.get("frames_dropped_total", 0),
        "records_committed_total": stats.committed_total,
        "records_acked_total": stats.acked_total,
        "records_dropped_total": sum(stats.dropped_total.values()),
        "records_dead_lettered_total": stats.dead_letters,
        "store_records": stats.records,
        "store_bytes": stats.bytes,
        "oldest_unsent_age_s": (None if stats.oldest_unsent_ts is None
                                else round(time.time() - stats.oldest_unsent_ts, 3)),
        "broker_state": flat.get("broker_state", "unknown") if running else "daemon not running",
        # a corrupt store was moved aside (kept there) and this one made in its place
        "store_moved_aside": meta.get(MOVED_ASIDE_META_KEY),
    }
    # the store's own counts are exact over its life: they win over the daemon's snapshot
    for name, by_label in (("records_committed_total", stats.committed_by_kind),
                           ("records_dropped_total", stats.dropped_total),
                           ("records_dead_lettered_total", stats.dead_lettered_by_reason)):
        for label, n in sorted(by_label.items()):
            out[f"{name}{{{label}}}"] = n
    for key, value in flat.items():
        out.setdefault(key, value)
    out["dead_letters_recent"] = [
        {"seq": d.seq, "serial": d.serial, "kind": d.kind, "reason": d.reason,
         "attempts": d.attempts, "ts": d.ts} for d in recent]
    out["packs"] = doc.get("packs", {})
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    summary = status_summary(config)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return EXIT_OK
    print(format_status(summary))
    return EXIT_OK


def _age(ts: float | None) -> str:
    if ts is None:
        return "-"
    age = time.time() - ts
    return f"{age:.1f} s ago" if age < 120 else time.strftime("%Y-%m-%d %H:%M:%S",
                                                              time.gmtime(ts)) + "Z"


def format_status(s: dict[str, Any]) -> str:
    lines = [f"gateway {s['gateway_id']}: daemon "
             f"{'running' if s['daemon_running'] else 'not running'}, "
             f"broker {s['broker_state']}"]
    rows = [
        ("frames received", s["frames_rx_total"]),
        ("frames rejected", s["frames_rejected_total"]),
        ("frames dropped", s["frames_dropped_total"]),
        ("records committed", s["records_committed_total"]),
        ("records acked", s["records_acked_total"]),
        ("records dropped", s["records_dropped_total"]),
        ("records dead-lettered", s["records_dead_lettered_total"]),
        ("store depth", f"{s['store_records']} records, {s['store_bytes']} bytes"),
        ("oldest unsent", "-" if s["oldest_unsent_age_s"] is None
         else f"{s['oldest_unsent_age_s']:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    for key in sorted(k for k in s if "{" in k):
        lines.append(f"  {key:<{width}}  {s[key]}")
    if s.get("store_moved_aside"):
        lines.append(f"  note: a corrupt store was moved aside and kept: {s['store_moved_aside']}")
    if s["dead_letters_recent"]:
        lines.append("")
        lines.append(f"  newest dead letters (of {s['records_dead_lettered_total']}):")
        for d in s["dead_letters_recent"]:
            lines.append(f"    seq {d['seq']}  {d['serial']}/{d['kind']}  {d['reason']}  "
                         f"measured {_age(d['ts'])}, {d['attempts']} retries")
    if s["packs"]:
        lines.append("")
        lines.append(f"  {'serial':<20} {'last seen':<22} {'last record':<22} {'SOC %':>6} "
                     f"{'SOH %':>6}")
        for serial, p in sorted(s["packs"].items()):
            soc = p.get("soc_pct")
            soh = p.get("soh_pct")
            lines.append(
                f"  {serial:<20} {_age(p.get('last_seen_wall')):<22} "
                f"{_age(p.get('last_record_ts')):<22} "
                f"{'-' if soc is None or soc != soc else format(soc, '.1f'):>6} "
                f"{'-' if soh is None else format(soh, '.1f'):>6}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
