"""Parallel data as users have it: sentence pairs (:class:`~switchformer.data.formatting.Pair`)
from JSONL, TSV, line-aligned text files and ``datasets`` files.

Formats (by the name's suffix, before an optional ``.gz``):

- ``.jsonl``: one object per line with ``source`` and ``target`` strings, optionally
  ``source_lang``/``target_lang`` (language codes such as ``de``);
- ``.tsv``: ``source<TAB>target`` per line, exactly two columns (no quoting); blank lines skipped;
- ``.arrow``/``.parquet``: columns ``source``, ``target``, optionally ``source_lang``/``target_lang``;
- anything else: a line-aligned text file, one sentence per line; line i of a source file and
  line i of its target file are a pair. Files are paired by these rules:

  * named by language (the last suffix before an optional ``.gz``: ``train.de``, ``train.de.gz``):
    the file in the target language (``target_lang``) pairs with every file of the same stem
    (``train``) in another language, which must be one of ``source_lang`` when that is given (a
    comma list: ``de,fr,cs``; unset: every other language present). Several source languages make
    a multilingual set, interleaved line by line (line 1 of each source language, then line 2 ...),
    so that the first rows, which validation is carved from, are the same captions in every
    language. Without ``target_lang``, the target is the one language not in ``source_lang``, or,
    for exactly two files, the second;
  * not named by language (``a.txt b.txt``): exactly two files, the source then the target.

  Each pair carries the languages of its files' names when they are known.

Pairs whose languages the data does not say take ``source_lang``/``target_lang`` when those name one
language; a pair in a language other than the ones given is an error. Every problem names the file,
and the line where there is one: mismatched line counts (both files, both counts), an empty side,
a target file without a source, a language of ``source_lang`` that no file holds, non-UTF-8 text,
a ``.gz`` file that is not gzip.
"""

from __future__ import annotations

import re
from pathlib import Path

from switchformer.data.files import (
    DataError,
    file_kind,
    file_name,
    files_of,
    lines,
    numbered_jsonl,
    read_hf_dataset,
    read_text,
)
from switchformer.data.formatting import Pair, is_language_code, parse_languages

# A language suffix: an ISO 639 code, optionally with a region or script (pt-br, zh_Hans).
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})?")
# Suffixes of that shape that say a file's format or role, not its language.
NOT_LANGUAGES = frozenset(
    "txt md rst csv tsv dat raw tok bpe src tgt ref hyp out log sgm xml htm json yml ini cfg tmp bak".split()
)


def language_of(path: Path, known: set[str] | frozenset[str] = frozenset()) -> str | None:
    """The language a file's name gives (``train.de.gz`` -> ``de``), or ``None``. A suffix among
    ``known`` (the languages the user named) always counts; another only when it looks like a
    language code and is not a format's (``.txt``)."""
    suffix = Path(file_name(path)).suffix[1:]
    if not suffix:
        return None
    if suffix in known:
        return suffix
    if _LANGUAGE.fullmatch(suffix) and suffix.lower() not in NOT_LANGUAGES:
        return suffix
    return None


def _stem(path: Path) -> Path:
    """The file without ``.gz`` and without its language suffix: what its other sides share."""
    return path.parent / Path(file_name(path)).stem


def load_pairs(
    paths: list[str | Path],
    source_lang: str | None = None,
    target_lang: str | None = None,
    *,
    label: str = "--data",
    require_every_language: bool = True,
) -> list[Pair]:
    """The sentence pairs of ``paths`` (files or folders, in order; see the module's rules).

    ``source_lang`` is one code or a comma list, ``target_lang`` one code (either may be ``None``).
    ``label`` names the paths' setting in messages (``--data``, ``--valid``). With
    ``require_every_language``, each code of ``source_lang`` must be the language of some pair (a
    validation or test set may hold fewer). Raises :class:`DataError` naming the file and line."""
    sources = parse_languages(source_lang)
    units: list[tuple[int, list[tuple[Pair, str]]]] = []  # (position of the first file, pairs with where)
    text_files: list[tuple[int, Path]] = []
    for position, path in enumerate(files_of(paths)):
        kind = file_kind(path)
        if kind == "jsonl":
            rows = [(row, f"{path}:{number}") for number, row in numbered_jsonl(path, ("source", "target"))]
        elif kind == "dataset":
            rows = [(row, f"{path}: row {n}") for n, row in enumerate(read_hf_dataset(path, ("source", "target")), 1)]
        elif kind == "tsv":
            rows = _tsv_rows(path)
        else:
            text_files.append((position, path))
            continue
        units.append((position, [(_row_pair(row, where), where) for row, where in rows]))
    if text_files:
        units.extend(_pair_text_files(text_files, sources, target_lang, label))
    pairs = [item for _, unit in sorted(units, key=lambda u: u[0]) for item in unit]
    pairs = [_with_languages(pair, where, sources, target_lang) for pair, where in pairs]
    if require_every_language and sources:
        present = {pair.source_lang for pair in pairs}
        missing = [code for code in sources if code not in present]
        if missing:
            found = ", ".join(sorted(str(c) for c in present if c)) or "none"
            raise DataError(
                f"--source-lang: {missing[0]!r} matches no file or row of {label} (source languages found: {found})"
            )
    return pairs


def _row_pair(row: dict, where: str) -> Pair:
    languages = []
    for name in ("source_lang", "target_lang"):
        value = row.get(name)
        if value is not None and not is_language_code(value):
            raise DataError(f"{where}: field {name!r} must be a language code like 'de', got {value!r}")
        languages.append(value)
    return Pair(row["source"], row["target"], *languages)


def _tsv_rows(path: Path) -> list[tuple[dict, str]]:
    rows = []
    for number, line in enumerate(lines(read_text(path)), 1):
        if not line.strip():
            continue
        columns = line.split("\t")
        where = f"{path}:{number}"
        if len(columns) != 2:
            raise DataError(f"{where}: expected 2 tab-separated columns (source<TAB>target), found {len(columns)}")
        for side, text in zip(("source", "target"), columns):
            if not text.strip():
                raise DataError(f"{where}: empty {side} side")
        rows.append(({"source": columns[0], "target": columns[1]}, where))
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows


def _with_languages(pair: Pair, where: str, sources: list[str], target: str | None) -> Pair:
    """``pair`` with the given languages filled in where the data does not say them; a pair in
    another language than those given is an error."""
    source_lang, target_lang = pair.source_lang, pair.target_lang
    if source_lang is None and len(sources) == 1:
        source_lang = sources[0]
    elif source_lang is None and sources:
        raise DataError(
            f"{where}: the pair does not say its source language, and --source-lang names several "
            f"({','.join(sources)}): give JSONL rows a 'source_lang', or name line-aligned files by language"
        )
    elif sources and source_lang not in sources:
        raise DataError(f"{where}: source language {source_lang!r} is not in --source-lang ({','.join(sources)})")
    if target_lang is None:
        target_lang = target
    elif target is not None and target_lang != target:
        raise DataError(f"{where}: target language {target_lang!r} is not --target-lang ({target})")
    return pair._replace(source_lang=source_lang, target_lang=target_lang)


def _file_lines(path: Path, cache: dict[Path, list[str]]) -> list[str]:
    if path not in cache:
        cache[path] = lines(read_text(path))
        if not cache[path]:
            raise DataError(f"{path}: file is empty")
    return cache[path]


def _zip_lines(source: Path, target: Path, cache: dict) -> list[tuple[str, str, str]]:
    """Line i of ``source`` with line i of ``target`` (and where it is): same counts, no empty side."""
    left, right = _file_lines(source, cache), _file_lines(target, cache)
    if len(left) != len(right):
        raise DataError(
            f"{source} has {len(left)} lines but {target} has {len(right)}: line-aligned files need the same "
            "number of lines (line i of each is one pair)"
        )
    for number, (a, b) in enumerate(zip(left, right), 1):
        for side, path, text in (("source", source, a), ("target", target, b)):
            if not text.strip():
                raise DataError(f"{path}:{number}: empty line (the {side} side of pair {number})")
    return [(a, b, f"{source}:{number}") for number, (a, b) in enumerate(zip(left, right), 1)]


def _pair_text_files(
    text_files: list[tuple[int, Path]], sources: list[str], target: str | None, label: str
) -> list[tuple[int, list[tuple[Pair, str]]]]:
    """Sentence pairs of line-aligned text files: two files not named by language (source, then
    target), or files named by language, grouped by stem (``train.de`` with ``train.en``)."""
    known = set(sources) | ({target} if target else set())
    languages = {path: language_of(path, known) for _, path in text_files}
    paths = [path for _, path in text_files]
    cache: dict[Path, list[str]] = {}
    if any(languages[path] is None for path in paths):
        return _unnamed_pairs(text_files, languages, label, cache)
    target = _target_language(paths, languages, sources, target, label)
    return _grouped_pairs(text_files, languages, sources, target, label, cache)


def _unnamed_pairs(text_files, languages, label, cache):
    """Files without a language in their names: exactly two, the source and then the target."""
    paths = [path for _, path in text_files]
    unnamed = [path for path in paths if languages[path] is None]
    if len(unnamed) == len(paths) == 2:  # a.txt b.txt: source then target
        source, target_file = paths
        rows = _zip_lines(source, target_file, cache)
        return [(text_files[0][0], [(Pair(a, b), where) for a, b, where in rows])]
    if len(unnamed) < len(paths):
        named = next(path for path in paths if languages[path] is not None)
        raise DataError(
            f"{unnamed[0]}: no language in its name (like train.de or train.de.gz), while {named.name} has one: "
            "name every line-aligned file by its language"
        )
    raise DataError(
        f"{label}: {len(paths)} line-aligned text file(s) ({', '.join(p.name for p in paths[:4])}"
        f"{' ...' if len(paths) > 4 else ''}) without a language in their names: seq2seq pairs come from "
        "two text files (source, then target), from files named by language (train.de train.en, with "
        "--source-lang/--target-lang), from .tsv (source<TAB>target) or from .jsonl ('source' and 'target')"
    )


def _target_language(paths, languages, sources, target, label) -> str:
    """The target language of files named by language (the one not among ``sources``, or by order for
    two files), every file's language checked against ``--source-lang`` and ``--target-lang``."""
    present = list(dict.fromkeys(languages[path] for path in paths))
    absent = [code for code in sources if code not in present]
    no_file = (
        DataError(
            f"--source-lang: {absent[0]!r} matches no file of {label} (the files' languages: {', '.join(present)}; "
            "a language is the last suffix of a name, before an optional .gz: train.de.gz is de)"
        )
        if absent
        else None
    )
    if target is None:
        rest = [code for code in present if code not in sources]
        if sources and len(rest) == 1:
            target = rest[0]
        elif not sources and len(paths) == 2 and len(present) == 2:
            target = languages[paths[1]]  # two files named by language, no languages given: by order
        elif no_file:
            raise no_file
        elif len(present) == 1:
            raise DataError(
                f"{label}: line-aligned files in one language only ({present[0]}): sentence pairs need the "
                "target language's file too (train.de.gz with train.en.gz)"
            )
        else:
            raise DataError(
                f"{label}: line-aligned files in {len(present)} languages ({', '.join(present)}): say which is the "
                "target with --target-lang (and the sources with --source-lang, or every other language)"
            )
    if target not in present:
        raise DataError(
            f"--target-lang: {target!r} matches no file of {label} (the files' languages: {', '.join(present)}; "
            "a language is the last suffix of a name, before an optional .gz: train.de.gz is de)"
        )
    for path in paths:
        code = languages[path]
        if code != target and sources and code not in sources:
            if no_file:  # the likelier mistake: a code of --source-lang misspelt or not the files'
                raise no_file
            raise DataError(
                f"{path}: language {code!r} is neither --source-lang ({','.join(sources)}) nor --target-lang "
                f"({target}); leave it out of {label}, or add it to --source-lang"
            )
    return target


def _grouped_pairs(text_files, languages, sources, target, label, cache):
    """Files named by language, grouped by stem; each stem's source files interleaved line by line."""
    present = list(dict.fromkeys(languages[path] for _, path in text_files))
    groups: dict[Path, dict[str, Path]] = {}
    first: dict[Path, int] = {}
    for position, path in text_files:
        stem = _stem(path)
        group = groups.setdefault(stem, {})
        first.setdefault(stem, position)
        code = languages[path]
        if code in group:
            raise DataError(f"{group[code]} and {path}: two files of {stem.name} in the language {code!r}")
        group[code] = path
    order = {code: i for i, code in enumerate(sources or present)}
    units = []
    for stem, group in groups.items():
        target_file = group.get(target)
        source_codes = sorted((code for code in group if code != target), key=order.__getitem__)
        if target_file is None:
            path = group[source_codes[0]]
            raise DataError(
                f"{path}: no target-language file of the same name ({stem.name}.{target} or {stem.name}.{target}.gz) "
                f"in {label}"
            )
        if not source_codes:
            wanted = ",".join(sources) if sources else "another language"
            raise DataError(
                f"{target_file}: a target-language ({target}) file without a source file of the same name "
                f"({stem.name}.<{wanted}>[.gz]) in {label}"
            )
        columns = [_zip_lines(group[code], target_file, cache) for code in source_codes]
        pairs = [
            (Pair(rows[i][0], rows[i][1], code, target), rows[i][2])
            for i in range(len(columns[0]))
            for code, rows in zip(source_codes, columns)
        ]
        units.append((first[stem], pairs))
    return units
