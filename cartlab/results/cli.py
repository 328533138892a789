"""`cartlab results export`: the whole results database as one file per table, for other tools.

    cartlab results export --format parquet exports/        # runs.parquet, train_log.parquet, ... manifest.json
    cartlab results export --format csv exports/ --db lab.db --force

Every table (runs, train_log, eval_log, downstream, artifacts, probes) is read as `cartlab.results`
reads it (`ResultsDB(path, readonly=True)`: the database is never changed, and a run may be
writing it meanwhile), all in one read transaction, so the files are one consistent snapshot.
`manifest.json` says what they are: format, schema version, cartlab version, the source
database, and each table's file and row count.

The files are written into a temporary folder next to DIR and moved in only once all of them
are written: an error leaves DIR as it was and nothing behind. DIR must be new or empty; with
--force, an earlier export in it is replaced (its table files, of either format, and its
manifest; other files stay).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

FORMATS = ("parquet", "csv")


def register(subparsers) -> None:
    p = subparsers.add_parser("results", description="The results database (runs, logs, evaluations, probes): "
                                                     "export it for other tools, merge run shards into it.")
    sub = p.add_subparsers(dest="results_command", metavar="ACTION", required=True)
    e = sub.add_parser("export", help="write every table to parquet or CSV files, with a manifest",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("dir", type=Path, metavar="DIR", help="the folder to write (new or empty)")
    e.add_argument("--format", choices=FORMATS, default="parquet", help="file format (default: parquet)")
    e.add_argument("--db", default="runs/results.db", help="results database (default: runs/results.db)")
    e.add_argument("--force", action="store_true", help="replace an earlier export in DIR")
    e.set_defaults(func=_export)
    m = sub.add_parser("merge", help="fold run shards (cluster jobs' databases) into a study's database",
                       description=_merge_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("shards", nargs="+", metavar="SHARD", help="run shards, e.g. runs/*/results.db")
    m.add_argument("--db", default="runs/results.db", help="the database merged into (default: runs/results.db)")
    m.set_defaults(func=_merge)


def _merge_doc() -> str:
    from cartlab.results import merge

    return merge.__doc__


def _merge(args: argparse.Namespace) -> int:
    from cartlab.results.merge import merge

    for done in merge(args.shards, args.db):
        print(f"cartlab: merged {done.summary()}")
    return 0


def _export(args: argparse.Namespace) -> int:
    manifest = export(args.db, args.dir, args.format, force=args.force)
    rows = ", ".join(f"{name} {t['rows']:,}" for name, t in manifest["tables"].items())
    print(f"cartlab: exported {args.db} to {args.dir} ({args.format}); rows: {rows}")
    return 0


def export(db: str | os.PathLike, out: str | os.PathLike, fmt: str = "parquet", force: bool = False) -> dict:
    """Write every table of the results database `db` to `out`/<table>.<fmt> plus manifest.json
    (see the module docstring); returns the manifest."""
    from cartlab import __version__
    from cartlab.results.db import TABLES, ResultsDB

    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not allowed: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file, not a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out}: is not empty; export into a new or empty folder, or pass --force to replace "
                         f"an earlier export in it")
    with closing(ResultsDB(db, readonly=True)) as reader:  # refuses a missing file or one that is no results db
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
        stage.mkdir()
        try:
            tables = {}
            reader.conn.execute("BEGIN")  # one snapshot of every table, even while a run writes
            for table in TABLES:
                frame = reader.frame(table)
                name = f"{table}.{fmt}"
                if fmt == "parquet":
                    frame.to_parquet(stage / name, index=False)
                else:
                    frame.to_csv(stage / name, index=False)
                tables[table] = {"file": name, "rows": len(frame)}
            manifest = {"format": fmt, "schema_version": reader.schema_version, "cartlab_version": __version__,
                        "source": str(Path(db).resolve()),
                        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tables": tables}
            reader.conn.execute("COMMIT")
            (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            _move_in(stage, out, [f"{t}.{f}" for t in TABLES for f in FORMATS if f != fmt])
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _move_in(stage: Path, out: Path, stale: list[str]) -> None:
    """Put the staged files in `out`: the whole folder at once when `out` is new; else file by file
    (each replace atomic), then remove an earlier export's files of the other format."""
    if not out.exists():
        stage.rename(out)
        return
    for path in sorted(stage.iterdir()):
        os.replace(path, out / path.name)
    for name in stale:
        (out / name).unlink(missing_ok=True)
