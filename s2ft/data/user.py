"""A user's own data: a local file (JSON, JSONL, CSV, Parquet), a dataset folder or a Hugging Face hub dataset,
read through `datasets` into `Example`s.

A source is a path string (``my/train.jsonl``) or a dict::

    {path: my.jsonl, format: alpaca, columns: {instruction: q, output: a}, name: mine}
    {hub: org/name, config: main, split: train}

Formats (``format``; detected from the columns when left out):

- ``alpaca``: ``instruction``, ``output``, optional ``input``.
- ``chat``: ``messages``, a list of ``{role, content}``; the last assistant message is the response, the user message
  before it the instruction, and any earlier turns (a system message included) become the input as
  ``role: content`` lines, so both prompt templates see them.
- ``prompt_completion``: ``prompt`` and ``completion``.

Every format may carry an ``answer`` (the gold answer an evaluation task scores; without one the response is the
gold). ``columns`` maps these field names to the file's own column names. Relative paths are read from the working
directory, else from the data directory. Every record is checked; the first bad one fails with the file, its line
(JSONL, CSV) or record index (JSON, Parquet, datasets) and the field.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

from s2ft.data.records import DataError, Example

FORMATS = ("alpaca", "chat", "prompt_completion")
# field -> required (a training record needs its response; an evaluation record may give an answer instead)
FIELDS = {
    "alpaca": ("instruction", "input", "output", "answer"),
    "chat": ("messages", "answer"),
    "prompt_completion": ("prompt", "completion", "answer"),
}
REQUIRED = {"alpaca": ("instruction", "output"), "chat": ("messages",), "prompt_completion": ("prompt", "completion")}
RESPONSE = {"alpaca": "output", "chat": "messages", "prompt_completion": "completion"}
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# The data files datasets reads from a plain folder: these, and its own .arrow shards.
FOLDER_SUFFIXES = {*BUILDERS, ".arrow"}
SOURCE_KEYS = ("path", "hub", "config", "split", "format", "columns", "name")


@dataclass(frozen=True)
class UserSource:
    """Where a user's data lives and how its records read.

    Attributes:
        name: The name the items carry (the ``name`` given, else the file's stem or the hub id's last part).
        path: A local file or dataset folder (None for a hub dataset).
        hub: A hub dataset id (or a local folder of data files) for `datasets.load_dataset`; None for a path.
        config: The hub dataset's configuration (``name`` of `load_dataset`), or None.
        split: The split to read (a folder's or hub dataset's; a single file is one split).
        format: alpaca, chat or prompt_completion; None: detected from the columns.
        columns: Field -> the file's column name, as ``((field, column), ...)``.
    """

    name: str
    path: str | None = None
    hub: str | None = None
    config: str | None = None
    split: str = "train"
    format: str | None = None
    columns: tuple[tuple[str, str], ...] = ()

    @property
    def where(self) -> str:
        """The file, folder or hub id, for messages."""
        return self.path if self.path is not None else f"hub dataset {self.hub} ({self.split})"


def is_data_file(name: str) -> bool:
    """Whether a ``data.train`` or ``eval.tasks`` string names a data file (by its suffix), not a registered set."""
    return Path(name).suffix.lower() in BUILDERS


def parse_source(spec: str | dict, default_split: str = "train", extra_keys: tuple[str, ...] = ()) -> UserSource:
    """Reads a source spec (a path string or a dict, see the module docstring) without opening the data.

    Args:
        spec: The spec.
        default_split: The split read when the spec names none.
        extra_keys: Further keys the caller reads itself (task definitions), accepted here.

    Raises:
        DataError: Not a string or dict, unknown keys, neither or both of path/hub, an unknown format or suffix, or
            a column mapping for fields the format does not have.
    """
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict):
        raise DataError(f"a data source is a path or a dict with path or hub, got {spec!r}")
    unknown = sorted(set(spec) - set(SOURCE_KEYS) - set(extra_keys))
    if unknown:
        raise DataError(f"data source {spec!r}: unknown keys {unknown}; allowed: {', '.join(SOURCE_KEYS + extra_keys)}")
    path, hub = spec.get("path"), spec.get("hub")
    if (path is None) == (hub is None):
        raise DataError(
            f"data source {spec!r} needs exactly one of path (a local file or folder) or hub (a dataset id)"
        )
    for key in ("path", "hub", "config", "split", "name"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise DataError(f"data source {spec!r}: {key} must be a string")
    if hub is not None and is_data_file(hub) and Path(hub).expanduser().is_file():
        # load_dataset takes a file for a hub id: it tries the network (retrying ~40 s offline) before failing.
        raise DataError(f"data source {spec!r}: hub {hub!r} is a local data file; give it as path: {hub}")
    fmt = spec.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"data source {path or hub}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if path is not None and Path(path).suffix and not is_data_file(path):
        raise DataError(
            f"data file {path}: unknown file type {Path(path).suffix!r}; use one of {', '.join(BUILDERS)} "
            "(or a folder saved with datasets' save_to_disk)"
        )
    columns = spec.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        raise DataError(f"data source {path or hub}: columns must map field names to column names, got {columns!r}")
    # Multiple-choice evaluation tasks read an options column too.
    known = (set(FIELDS[fmt]) if fmt else {field for fields in FIELDS.values() for field in fields}) | {"options"}
    stray = sorted(set(columns) - known)
    if stray:
        raise DataError(
            f"data source {path or hub}: columns maps unknown fields {stray}; the {fmt or 'known'} fields are "
            f"{', '.join(sorted(known))}"
        )
    name = spec.get("name") or (Path(path).stem if path is not None else hub.rstrip("/").split("/")[-1])
    return UserSource(
        name=name,
        path=path,
        hub=hub,
        config=spec.get("config"),
        split=spec.get("split") or default_split,
        format=fmt,
        columns=tuple(sorted(columns.items())),
    )


def resolve_path(path: str, data_dir: str | Path | None) -> Path:
    """The local file or folder: as given (relative to the working directory), else under the data directory.

    Raises:
        DataError: Neither exists.
    """
    given = Path(path).expanduser()
    if given.exists():
        return given
    if data_dir is not None and not given.is_absolute() and (Path(data_dir) / given).exists():
        return Path(data_dir) / given
    where = f" (nor under the data directory {data_dir})" if data_dir is not None else ""
    raise DataError(f"data file {path} does not exist{where}")


def load_rows(source: UserSource, data_dir: str | Path | None = None) -> datasets.Dataset:
    """Opens the source with `datasets`: a file with its builder, a `save_to_disk` folder, or `load_dataset(hub)`.

    Raises:
        DataError: A missing file, a file `datasets` cannot read, a missing split, or a hub dataset that cannot be
            loaded (offline, unknown id).
    """
    try:
        if source.hub is not None:
            rows = datasets.load_dataset(source.hub, source.config, split=source.split)
        else:
            path = resolve_path(source.path, data_dir)
            if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
                rows = datasets.load_from_disk(str(path))
                if isinstance(rows, datasets.DatasetDict):
                    rows = rows[source.split]
            elif path.is_dir():
                # Compressed ones too: data.jsonl.gz.
                if not any(
                    FOLDER_SUFFIXES & {x.lower() for x in file.suffixes} for file in path.rglob("*") if file.is_file()
                ):
                    # datasets' own message for it is about resolving the pattern ** (or reads .txt files as text).
                    raise DataError(
                        f"{source.where}: the folder holds no data file ({', '.join(BUILDERS)}) and is not a folder "
                        "saved with datasets' save_to_disk; point the path at the data file or its folder"
                    )
                _check_folder(path, source)
                # Resolved: datasets takes "." for no dataset name at all ("dataset_name should be specified").
                rows = datasets.load_dataset(str(path.resolve()), source.config, split=source.split)
            elif path.suffix.lower() not in BUILDERS:
                raise DataError(f"data file {path}: unknown file type; use one of {', '.join(BUILDERS)}")
            else:
                # datasets refuses an empty split with an obscure message, and reads some non-UTF-8 files as mojibake.
                if not _check_text(path, source.where):
                    raise DataError(f"{source.where} holds no records")
                # datasets parses a JSON array with Python's json, whose last value of a field named twice wins
                # silently; it is parsed wholly in memory either way.
                if path.suffix.lower() == ".json" and (problem := _json_problem(path, source.where)):
                    raise DataError(problem)
                options = _csv_options(path, source.where) if path.suffix.lower() == ".csv" else {}
                rows = datasets.load_dataset(
                    BUILDERS[path.suffix.lower()], data_files=str(path), split="train", **options
                )
    except DataError:
        raise
    except KeyError as err:
        raise DataError(f"{source.where}: no split {source.split!r} ({err}); set split: NAME") from err
    except Exception as err:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ConnectionError ...)
        if isinstance(err, ValueError) and str(err).startswith("Unknown split"):
            # load_dataset of a folder (or hub id) without that split: a folder's files name its splits (train.jsonl,
            # test.jsonl; a file of any other name is train), and an evaluation task reads test unless told.
            raise DataError(f"{source.where}: no split {source.split!r} ({err}); set split: NAME") from err
        problem = None
        if source.hub is None and path.is_dir():  # a folder's files: the first bad one, named (datasets names none)
            files = (file for file in _folder_files(path)[1].get(source.split, []) if file.suffix.lower() in JSON)
            problem = next((found for file in files if (found := _json_problem(file, str(file)))), None)
        elif source.hub is None and path.suffix.lower() in JSON:
            problem = _json_problem(path, source.where)
        raise DataError(problem or f"could not read {source.where}: {_cause(err)}") from err
    return rows


def _folder_files(path: Path) -> tuple[list[Path], dict[str, list[Path]]]:
    """A plain folder's data files (those datasets would consider: not under a name starting with "." or "_"), and
    the files of each split as datasets assigns them from their names (train.jsonl, test/..., else all train)."""
    path = path.resolve()  # as datasets names the files
    found = [
        file
        for file in sorted(path.rglob("*"))
        if file.is_file()
        and FOLDER_SUFFIXES & {x.lower() for x in file.suffixes}
        and not any(part.startswith((".", "_")) for part in file.relative_to(path).parts)
    ]
    base = str(path)
    try:
        splits = DataFilesDict.from_patterns(get_data_patterns(base), base_path=base)
    except EmptyDatasetError:  # no data file at all: datasets' own message follows
        return found, {}
    return found, {str(split): [Path(file) for file in files] for split, files in splits.items()}


def _check_folder(path: Path, source: UserSource) -> None:
    """Refuse a plain folder that datasets would read in part, silently, and check each file of the split read as
    a single file is checked (datasets fails on a non-UTF-8 one only when a record is read, past every check).

    Raises:
        DataError: Data files of no split (a more.jsonl beside train.jsonl), a split of several file types (datasets
            reads the most common one), or a file that is not UTF-8 text or holds no records.
    """
    found, splits = _folder_files(path)
    path = path.resolve()
    assigned = {file.resolve() for files in splits.values() for file in files}
    unread = [file for file in found if file.resolve() not in assigned]
    if splits and unread:
        named = ", ".join(f"{name}: {len(files)} file{'s' * (len(files) > 1)}" for name, files in splits.items())
        raise DataError(
            f"{source.where}: datasets reads a folder's files by split, from their names (train*, test*, validation*, "
            f"dev*, eval* ...; any other name is train only when no file names a split), here {named}, so "
            f"{len(unread)} data file(s) would not be read: {', '.join(str(f.relative_to(path)) for f in unread[:5])}"
            "; name each by its split (train_2.jsonl), or give each file as a source of its own"
        )
    files = splits.get(source.split, [])
    # By the data suffix, a compression one aside (train.jsonl.gz is json).
    kinds = sorted(
        {
            next((BUILDERS.get(x.lower(), "arrow") for x in file.suffixes if x.lower() in FOLDER_SUFFIXES), "")
            for file in files
        }
    )
    if len(kinds) > 1:
        raise DataError(
            f"{source.where}: split {source.split!r} mixes file types ({', '.join(kinds)}: "
            f"{', '.join(str(f.relative_to(path)) for f in files[:5])}), and datasets reads only the most common one; "
            "save them as one type, or give each file as a source of its own"
        )
    for file in files:
        if file.suffix.lower() in BUILDERS and not _check_text(file, str(file)):
            raise DataError(f"{file} (in {source.where}) holds no records; remove it or fill it")


JSON = (".json", ".jsonl")


def _check_text(path: Path, where: str) -> bool:
    """Whether a data file holds any records; a text file must be UTF-8.

    Raises:
        DataError: A text file that is not UTF-8 (the line of the first bad byte is named).
    """
    if path.suffix.lower() == ".parquet":
        # datasets fails on a Parquet file of no rows ("ArrowInvalid: BatchSize must be greater than 0, got 0").
        try:
            return pq.ParquetFile(path).metadata.num_rows > 0
        except Exception:  # not Parquet (ArrowInvalid, OSError): datasets' own error names it
            return True
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{where}: line {line} is not UTF-8 text (byte {raw[err.start]:#04x}); save the file as UTF-8, e.g. "
            f"iconv -f latin1 -t utf-8 {path.name} > utf8_{path.name}"
        ) from None
    if path.suffix.lower() == ".csv":
        return len([line for line in text.splitlines() if line.strip()]) > 1  # more than a header
    value = text.lstrip("\ufeff").lstrip()
    if value and value[:1] not in ("[", "{"):
        # Not a list or object of records (null, 42, "text", or not JSON): datasets crashes the process on a file
        # holding only null (a segmentation fault) and names the rest obscurely.
        raise DataError(
            _json_problem(path, where)
            or f"{where}: holds the JSON value {value[:40]}, not records; write a list [{{field: value, ...}}, ...] "
            "(.json) or one {field: value, ...} per line (.jsonl)"
        )
    return "".join(value.split()) not in ("", "[]", "{}")  # datasets: 'Instruction "train" corresponds to no data!'


def _csv_options(path: Path, where: str) -> dict:
    """pandas options that read every CSV cell as the text written: by default a column of numbers becomes floats
    (an answer ``7`` trains as ``7.0``, ``01234`` as ``1234.0``) and ``None``, ``NA`` or ``null`` become missing.

    Raises:
        DataError: A record with more fields than the header (an unquoted comma, a trailing comma). When the first
            record has one, pandas silently takes every record's first field as its index and reads the rest one
            column to the left (the output as the instruction); later ones fail with a tokenizer error. Or a header
            naming a column twice, which pandas renames (``output``, ``output.1``) and the first one trains.
    """
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file)
        header = next(reader, [])
        twice = next((name for index, name in enumerate(header) if name in header[:index]), None)
        if twice is not None:
            raise DataError(f"{where}: the header names the column {twice!r} twice; keep one (or rename the other)")
        columns, end = len(header), 1
        for row in reader:
            if len(row) > columns:
                raise DataError(
                    f"{where}: line {end + 1} has {len(row)} fields but the header {columns}; quote a field that "
                    'holds a comma ("a, b") and remove trailing commas'
                )
            end = reader.line_num
    return {"converters": {index: str for index in range(columns)}, "keep_default_na": False, "na_values": [""]}


def _json_problem(path: Path, where: str) -> str | None:
    """The first line (JSONL) or place (JSON) that is not valid JSON or not a record, for a file datasets refused."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(text, object_pairs_hook=_pairs)
        except json.JSONDecodeError as err:
            return f"{where}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); fix the file"
        except _RepeatedKey as err:
            return f"{where}: an object names the field {err.args[0]!r} twice; keep one"
        records = content if isinstance(content, list) else []
        bad = next((i for i, record in enumerate(records) if not isinstance(record, dict)), None)
        if bad is not None:
            return f"{where}: record {bad} is not an object {{field: value, ...}}: {json.dumps(records[bad])[:80]}"
        return None
    # Lines end at \n only, as for datasets and file_lines: splitlines() also splits at U+2028, U+0085 ... in strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_pairs)
        except json.JSONDecodeError as err:
            return f"{where}: line {number} is not valid JSON ({err.msg} at column {err.colno}); fix or remove it"
        except _RepeatedKey as err:
            # arrow refuses the line ("Column(/instruction) was specified twice"), datasets then fails in pandas.
            return f"{where}: line {number} has the field {err.args[0]!r} twice; keep one"
        if not isinstance(record, dict):
            return f"{where}: line {number} is not a record {{field: value, ...}} but {line.strip()[:80]}"
    return None


def _repeated_field(path: Path, where: str) -> str | None:
    """The first line of a JSONL file holding an object (at any depth) that names a field twice, which arrow refuses
    only at the top level: in a record's message, datasets reads another shape (the list as one struct)."""
    with path.open(encoding="utf-8-sig") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line, object_pairs_hook=_pairs)
            except _RepeatedKey as err:
                return f"{where}: line {number} has the field {err.args[0]!r} twice; keep one"
            except json.JSONDecodeError:
                return None  # not one record per line (a JSON array saved as .jsonl): its records are named
    return None


class _RepeatedKey(Exception):
    """A JSON object that names one key twice (the key is the argument)."""


def _pairs(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = next((key for key in keys if keys.count(key) > 1), None)
    if repeated is not None:
        raise _RepeatedKey(repeated)
    return dict(pairs)


def _cause(err: BaseException) -> str:
    """The innermost error datasets' own wraps ("An error occurred while generating the dataset") hide."""
    while (err.__cause__ or err.__context__) is not None and str(err.__cause__ or err.__context__).strip():
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {str(err).strip()}"


def file_lines(source: UserSource, data_dir: str | Path | None, count: int | None = None) -> list[str] | None:
    """Per record, where it is in the file: "line N" for JSONL and CSV, None (record indices) otherwise.

    Args:
        source: The source.
        data_dir: The data directory.
        count: The number of records datasets read; when the file's lines give another number (a pretty-printed
            JSON array saved as .jsonl, which datasets reads too), lines would name the wrong records: None.
    """
    if source.path is None:
        return None
    path = resolve_path(source.path, data_dir)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as file:
            lines = [f"line {number}" for number, line in enumerate(file, start=1) if line.strip()]
    elif suffix == ".csv":
        # datasets' CSV reader (pandas) takes the first record as the header and skips blank lines; a record whose
        # quoted field spans lines starts at the line after the previous record's end.
        starts, end = [], 0
        with path.open(encoding="utf-8", newline="") as file:
            reader = csv.reader(file)
            for row in reader:
                if len(row) > 1 or (row and row[0].strip()):
                    starts.append(f"line {end + 1}")
                end = reader.line_num
        lines = starts[1:]
    else:
        return None
    return lines if count is None or len(lines) == count else None


def detect_format(source: UserSource, column_names: list[str]) -> str:
    """The format a source's columns say (``messages``: chat; ``prompt`` + ``completion``; ``instruction``: alpaca).

    Raises:
        DataError: No format fits; the message lists the columns and how to say the format and mapping.
    """
    if source.format is not None:
        return source.format
    mapped = {field: column for field, column in source.columns}
    for fmt in ("chat", "prompt_completion", "alpaca"):
        if mapped.get(REQUIRED[fmt][0], REQUIRED[fmt][0]) in column_names:
            return fmt
    raise DataError(
        f"{source.where}: cannot tell the format from its columns {column_names}; set format: "
        f"{'|'.join(FORMATS)} and map other names with columns: {{instruction: COLUMN, output: COLUMN}}"
    )


def _text(value, field: str, where: str) -> str:
    # `field` is the display name: "'output'", or "'output' (column 'a')" under a column mapping.
    if value is None:
        raise DataError(f"{where}: missing field {field}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{where}: field {field} must be text, got {type(value).__name__}")
    return _as_text(value)


def _field(value):
    """A record's value, None where it is missing: Python's json.dumps writes pandas' missing value (NaN, as
    ``df.to_dict("records")`` holds it) as NaN, which datasets reads as a float; str() would make it the text "nan"."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _as_text(value: str | int | float) -> str:
    # Arrow reads a JSON column that mixes ints and floats as floats: the 4 of {"answer": 4} beside {"answer": 0.5}
    # arrives as 4.0, and str() would make the gold "4.0" (a text answer "4" scored wrong) and the target "4.0".
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


ROLES = "system, user, assistant"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def _chat_parts(messages, where: str, need_response: bool) -> tuple[str, str, str]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or message.get("content") is None:
            raise DataError(f"{where}: every message needs a role and a content, got {message!r}")
        content = message["content"]
        if isinstance(content, bool) or not isinstance(content, str | int | float):
            # str() of content parts ([{type: text, text: ...}]) would train on their Python repr.
            raise DataError(
                f"{where}: a {message['role']} message's content is a {type(content).__name__}, not text; give each "
                "message's content as a string (content parts such as [{type: text, text: ...}] are not read)"
            )
    roles = {message["role"] for message in messages}
    if roles & SHAREGPT_ROLES.keys():
        # ShareGPT's names: read as they are, "human"/"gpt" were neither the prompt nor the response.
        renames = ", ".join(f"{old} -> {new}" for old, new in SHAREGPT_ROLES.items() if old in roles)
        raise DataError(f"{where}: messages use ShareGPT's role names; rename them ({renames}): roles are {ROLES}")
    response = ""
    if messages[-1]["role"] == "assistant":
        response, messages = _as_text(messages[-1]["content"]), messages[:-1]
    elif need_response:
        raise DataError(
            f"{where}: the last message must be the assistant's response (role 'assistant'), not a "
            f"{messages[-1]['role']!r} message"
        )
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: the response must follow a user message (role 'user'; roles are {ROLES})")
    context = "\n".join(f"{m['role']}: {_as_text(m['content'])}" for m in messages[:-1])
    return _as_text(messages[-1]["content"]), context, response


def to_examples(
    source: UserSource,
    rows: datasets.Dataset,
    lines: list[str] | None = None,
    need_response: bool = True,
    data_dir: str | Path | None = None,
) -> list[Example]:
    """Converts rows into `Example`s by the source's format and column mapping, checking every record.

    Args:
        source: The source (its name becomes the items' task and id prefix).
        rows: The rows (`load_rows`).
        lines: Per row, its place in the file ("line N"); None names record indices.
        need_response: Training and held-out records must have a non-empty response; evaluation records may give
            only an ``answer``.
        data_dir: The data directory the source's file was read from.

    Raises:
        DataError: No records, an unknown format, or the first record that lacks a field or has an empty one (the
            file, line or record index and the field are named).
    """
    if len(rows) == 0:
        raise DataError(f"{source.where} holds no records")
    fmt = detect_format(source, rows.column_names)
    mapped = {field: column for field, column in source.columns}
    column = {field: mapped.get(field, field) for field in FIELDS[fmt]}
    missing = [f for f in REQUIRED[fmt] if column[f] not in rows.column_names and (need_response or f != RESPONSE[fmt])]
    if missing:
        names = [f"{f!r}" + (f" (column {column[f]!r})" if column[f] != f else "") for f in missing]
        raise DataError(
            f"{source.where}: no field {', '.join(names)} in any record (columns: {rows.column_names}); {fmt} records "
            f"need {', '.join(REQUIRED[fmt])}; map other names with columns: {{FIELD: COLUMN}}"
        )
    # A mapping to a column no record has would leave an optional field empty in every record: no input, or the
    # response taken as the gold answer.
    absent = [
        f"{field!r} to {col!r}" for field, col in mapped.items() if field in column and col not in rows.column_names
    ]
    if absent:
        raise DataError(
            f"{source.where}: columns maps {', '.join(absent)}, but no record has that column (columns: "
            f"{rows.column_names}); fix the column name or leave the field out of columns"
        )
    shown = {field: f"{field!r}" + (f" (column {col!r})" if col != field else "") for field, col in column.items()}
    try:
        return [
            _example(source, index, row, lines, fmt, column, shown, need_response) for index, row in enumerate(rows)
        ]
    except DataError:
        # A field named twice inside a record (a chat message's content) is read as something else (the messages
        # list as one struct), which the record's own problem names misleadingly.
        path = None if source.path is None else resolve_path(source.path, data_dir)
        if path is not None and path.is_file() and path.suffix.lower() == ".jsonl":
            if problem := _repeated_field(path, source.where):
                raise DataError(problem) from None
        raise


def _example(source, index, row, lines, fmt, column, shown, need_response) -> Example:
    """One row of `to_examples` as an `Example`, checked."""
    where = f"{source.where}: {lines[index] if lines and index < len(lines) else f'record {index}'}"
    values = {field: _field(row.get(column[field])) for field in FIELDS[fmt]}
    if fmt == "chat":
        instruction, context, response = _chat_parts(values["messages"], where, need_response)
    else:
        first, second = ("instruction", "output") if fmt == "alpaca" else ("prompt", "completion")
        instruction = _text(values[first], shown[first], where)
        context = _text(values["input"], shown["input"], where) if values.get("input") is not None else ""
        response = values[second]
        response = "" if response is None and not need_response else _text(response, shown[second], where)
    answer = "" if values["answer"] is None else _text(values["answer"], shown["answer"], where)
    if not instruction.strip():
        raise DataError(f"{where}: empty {'instruction' if fmt == 'alpaca' else 'prompt'}")
    if need_response and not response.strip():
        raise DataError(f"{where}: empty response ({RESPONSE[fmt]})")
    if not need_response and not (answer.strip() or response.strip()):
        raise DataError(f"{where}: no gold answer (give an answer field or a response)")
    return Example(f"{source.name}-{index}", source.name, instruction, context, response, answer)


def load_user_source(
    spec: str | dict | UserSource, data_dir: str | Path | None = None, need_response: bool = True
) -> list[Example]:
    """Reads a user's source into checked `Example`s (see the module docstring).

    Raises:
        DataError: A bad spec, a missing or unreadable file, an empty set or a bad record (named).
    """
    source = spec if isinstance(spec, UserSource) else parse_source(spec)
    rows = load_rows(source, data_dir)
    return to_examples(source, rows, file_lines(source, data_dir, len(rows)), need_response, data_dir)


def source_digest(source: UserSource, data_dir: str | Path | None = None) -> str:
    """SHA-256 of a local file (of a folder: of its files' relative names and contents, sorted); for a hub dataset,
    the `datasets` fingerprint of the loaded split (its cache identity)."""
    if source.path is None:
        return load_rows(source, data_dir)._fingerprint
    return file_digest(resolve_path(source.path, data_dir))


def file_digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
