"""`kblam kb ...`: inspect KB files and stores; import, edit, verify, compact, export and index stores.

A store is a folder made by ``KBStore`` (kblam.store). Commands that encode triples (import, add,
update) load the store's encoder (by the name in its manifest, or ``--encoder`` for a new store);
import from parquet shards with precomputed embeddings loads none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PREFILTER_ABOVE = 20_000  # the size above which ask() pre-filters (KBLaM.prefilter_above's default)


def add_parser(commands) -> None:
    kb = commands.add_parser("kb", help="knowledge base files and stores")
    sub = kb.add_subparsers(dest="kb_command", required=True, metavar="KB_COMMAND")

    p = sub.add_parser("inspect", help="counts, duplicates, conflicts and problems of a KB file; or a store's state")
    p.add_argument("path", help="a KB file (CSV, JSON, JSONL, parquet) or a store folder")

    p = sub.add_parser("import", help="add KB files to a store (made if missing), resumably, with a progress bar",
                       description="Add the triples of each SOURCE to STORE, committed --commit-every at a time. "
                                   "Interrupted? Run the same command again: it goes on where it stopped, and no "
                                   "triple is stored twice. A SOURCE is a KB file (CSV/TSV, JSON, JSONL, parquet) or "
                                   "a folder of parquet shards; shards with key_emb/value_emb columns are stored "
                                   "without encoding (docs/scale.md).")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--encoder", default=None,
                   help="sentence encoder for a new store (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--key-template", default=None, help="key sentence template for a new store")
    p.add_argument("--value-template", default=None, help="value template for a new store")
    p.add_argument("--commit-every", type=int, default=65_536, help="triples per commit (default 65536)")
    p.add_argument("--strict", action="store_true", help="refuse a file with conflicting values")
    p.add_argument("--index", choices=["auto", "yes", "no"], default="auto",
                   help=f"build the pre-filter index and row checksums at the end (auto: above {PREFILTER_ABOVE:,} triples)")

    for name, what in (("add", "add one triple"), ("update", "change the value of a stored (name, property)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("store", metavar="STORE")
        p.add_argument("name")
        p.add_argument("property")
        p.add_argument("value")
    p = sub.add_parser("remove", help="remove one (name, property), or every triple of an entity")
    p.add_argument("store", metavar="STORE")
    p.add_argument("name")
    p.add_argument("property", nargs="?", default=None)

    p = sub.add_parser("verify", help="re-read every byte of a store against its checksums; check its index")
    p.add_argument("store", metavar="STORE")
    p = sub.add_parser("compact", help="rewrite a store without replaced or removed rows (and rebuild its index)")
    p.add_argument("store", metavar="STORE")
    p = sub.add_parser("export", help="write a store's triples to a .jsonl, .json, .csv or .tsv file")
    p.add_argument("store", metavar="STORE")
    p.add_argument("file", metavar="FILE")
    p = sub.add_parser("index", help="build and save a store's pre-filter index, name index and row checksums")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--kind", choices=["auto", "exact", "ivf", "hnsw"], default=None,
                   help="build this kind now, replacing the saved one (default: build only if none is usable)")


def run(args: argparse.Namespace) -> int:
    command = {"inspect": _inspect, "import": _import, "add": _edit, "update": _edit, "remove": _edit,
               "verify": _verify, "compact": _compact, "export": _export, "index": _index}[args.kb_command]
    return command(args)


# ------------------------------------------------------------------------------------------ helpers


def _say(text: str) -> None:
    """One or more lines of output, KB text and paths escaped for the terminal (kblam.display)."""
    from kblam.display import printable

    print("\n".join(printable(line) for line in str(text).split("\n")))


def _store_path(path: str) -> Path:
    from kblam.store import is_store

    if not is_store(path):
        what = "a KB file, not a store" if Path(path).is_file() else "not a KB store (no manifest.json in it)"
        raise ValueError(f"{path}: {what}; `kblam kb import FILE {path}` makes a store from KB files")
    return Path(path)


def _encoder(name: str):
    from kblam import defaults

    return defaults.load_encoder(name)


def _writer(path: str, *, encode: bool = False):
    """The store opened for writing; with the encoder its manifest names when triples are encoded."""
    from kblam.store import KBStore
    from kblam.store.files import _read_manifest

    folder = _store_path(path)
    encoder = _encoder(_read_manifest(folder)["encoder"]) if encode else None
    return KBStore.open(folder, encoder)


def _size(folder: Path, prefix: str) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(prefix) and p.is_file())


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


# ----------------------------------------------------------------------------------------- commands


def _inspect(args) -> int:
    from kblam.store import is_store

    if not is_store(args.path):
        from kb_builders.inspect import format_inspect, inspect_file

        _say(format_inspect(inspect_file(args.path)))
        return 0
    from kblam.store import KBStore, rowsums
    from kblam.store import index as store_index
    from kblam.store import names as store_names
    from kblam.store.files import _pid_alive, _read_lock_pid

    folder = Path(args.path)
    with KBStore.open(folder, readonly=True) as store:
        m = store._manifest
        hidden = int(m["rows"]) - len(store)
        writer = _read_lock_pid(folder)
        _say("\n".join([
            f"{folder} (KB store, format {m['version']}, generation {store.generation})",
            f"  triples:          {len(store):,}"
            + (f" ({hidden:,} replaced or removed rows kept until `kblam kb compact`)" if hidden else ""),
            f"  encoder:          {store.encoder_name} ({store.dim}-d)",
            f"  templates:        key {store.key_template!r}, value {store.value_template!r}",
            f"  on disk:          triples {_mb(_size(folder, 'triples-'))}, keys {_mb(_size(folder, 'keys-'))}, "
            f"values {_mb(_size(folder, 'values-'))}, index {_mb(_size(folder, 'prefilter-'))}, "
            f"names {_mb(_size(folder, 'names-'))}, row checksums {_mb(_size(folder, 'rowsums-'))}",
            f"  pre-filter index: {store_index.status(store)}",
            f"  name index:       {store_names.status(store)}",
            f"  row checksums:    {rowsums.status(store)}",
            f"  writer:           {f'process {writer}' if writer and _pid_alive(writer) else 'none'}",
        ]))
    return 0


def _import(args) -> int:
    from kblam.defaults import DEFAULT_ENCODER
    from kblam.kb import KEY_TEMPLATE, VALUE_TEMPLATE
    from kblam.store import KBStore, is_store
    from kblam.store.files import _read_manifest
    from kblam.store.importer import _has_embeddings, import_sources

    paths = [Path(s) for s in args.sources]
    precomputed = all(p.exists() and _has_embeddings(p) for p in paths)
    if is_store(args.store):
        manifest = _read_manifest(Path(args.store))
        if args.encoder and args.encoder != manifest["encoder"]:
            raise ValueError(f"{args.store} was encoded with {manifest['encoder']!r}, not {args.encoder!r}")
        for given, stored, what in ((args.key_template, manifest["key_template"], "key"),
                                    (args.value_template, manifest["value_template"], "value")):
            if given is not None and given != stored:
                raise ValueError(f"{args.store} uses the {what} template {stored!r}, not {given!r}")
        encoder = None if precomputed else _encoder(manifest["encoder"])
        store = KBStore.open(args.store, encoder)
    else:
        name = args.encoder or DEFAULT_ENCODER
        if precomputed:  # nothing to encode: a stand-in that only knows the name and the dimension
            from kblam.encoder import KBEncoder
            from kblam.store.importer import _Precomputed, _shard_batches

            dim = next(_shard_batches(paths[0], True))[1].shape[1]
            encoder = KBEncoder(_Precomputed(dim), name=name)
        else:
            encoder = _encoder(name)
        store = KBStore.create(args.store, encoder, key_template=args.key_template or KEY_TEMPLATE,
                               value_template=args.value_template or VALUE_TEMPLATE)
        if precomputed:
            store.encoder = None
    with store:
        before = len(store)
        stats = import_sources(store, args.sources, commit_every=args.commit_every, strict=args.strict)
        _say(f"{args.store}: {stats['rows']:,} rows read, {stats['changed']:,} triples new or changed, "
              f"{stats['unchanged']:,} already stored; {before:,} -> {len(store):,} triples "
              f"(generation {store.generation})")
        if args.index == "yes" or (args.index == "auto" and len(store) > PREFILTER_ABOVE):
            _say(f"pre-filter index: {repr(store.prefilter())}")
            store.check()  # and the rows' checksums (kblam.store.rowsums), as `kblam kb index` does
    return 0


def _edit(args) -> int:
    with _writer(args.store, encode=args.kb_command != "remove") as store:
        if args.kb_command == "add":
            if store.get(args.name, args.property) is not None:
                raise ValueError(f"({args.name!r}, {args.property!r}) is already in {args.store}; "
                                 "`kblam kb update` changes its value")
            store.add([(args.name, args.property, args.value)], progress=False)
            done = "added"
        elif args.kb_command == "update":
            store.update(args.name, args.property, args.value)
            done = "updated"
        else:
            done = f"removed {store.remove(args.name, args.property)} triple(s):"
        what = args.name if args.property is None else f"({args.name!r}, {args.property!r})"
        _say(f"{args.store}: {done} {what}; {len(store):,} triples (generation {store.generation})")
    return 0


def _verify(args) -> int:
    from kblam.store import KBStore, rowsums
    from kblam.store import index as store_index

    with KBStore.open(_store_path(args.store), readonly=True) as store:
        store.verify()  # raises KBStoreError naming every damaged file and row range
        status = store_index.status(store)
        m = store._manifest
        blocks = sum(len(m["files"][k]["blocks"]) for k in ("triples", "keys", "values"))
        _say(f"{args.store}: ok: {len(store):,} triples, generation {store.generation}, all {blocks} blocks "
              f"match their checksums\npre-filter index: {status}\nrow checksums: {rowsums.status(store)}")
    return 0  # an unusable index or checksum file is derived data: the status lines say what happens


def _compact(args) -> int:
    with _writer(args.store) as store:
        rows = int(store._manifest["rows"])
        store.compact()
        _say(f"{args.store}: {rows:,} rows -> {len(store):,} (generation {store.generation})")
    return 0


def _export(args) -> int:
    from kblam.kb import save_triples
    from kblam.store import KBStore

    with KBStore.open(_store_path(args.store), readonly=True) as store:
        triples = store.triples()
        save_triples(args.file, triples)
        _say(f"{args.file}: {len(triples):,} triples from {args.store} (generation {store.generation})")
    return 0


def _index(args) -> int:
    from kblam.store import index as store_index
    from kblam.store import names as store_names
    from kblam.store import rowsums

    with _writer(args.store) as store:
        if args.kind is not None:
            store_index.build(store, kind=args.kind)
        pre = store.prefilter()
        store_names.build(store)  # saved too, every row of it, so that no question or edit waits for it
        store.check()  # and each row's checksum: a question then checks its candidates' rows, not their blocks
        _say(f"{args.store}: {pre!r}\npre-filter index: {store_index.status(store)}\n"
             f"name index: {store_names.status(store)}\nrow checksums: {rowsums.status(store)}")
    return 0
