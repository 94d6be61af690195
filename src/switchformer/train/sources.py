"""Where a run's settings come from, in order: a preset, a config file (TOML, YAML, JSON), ``--set
key=value``, the flags; and what ``--resume`` may change. One validation of the result, every error
naming the field and its source."""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import fields
from pathlib import Path

from switchformer.data.files import decode_text
from switchformer.train.config import TrainConfig
from switchformer.train.presets import PRESETS


def parse_setting(name: str, text: str):
    """Parse a ``--set key=value`` value with the type of the config field. Spaces around a
    number, a flag, ``none`` or list items are ignored; a string is kept exactly as given."""
    hints = {f.name: str(f.type) for f in fields(TrainConfig)}
    if name not in hints:
        close = difflib.get_close_matches(name, hints, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; docs/configuration.md lists them"
        raise ValueError(f"{name}: no such config field{hint}")
    base = hints[name].replace("| None", "").strip()
    raw, text = text, text.strip()
    if "None" in hints[name] and text.lower() in ("none", "null"):
        return None
    if base.startswith("list"):
        return [part.strip() for part in text.split(",") if part.strip()]
    if base == "bool":
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if base in ("int", "float"):
        try:
            return int(text) if base == "int" else float(text)
        except ValueError:
            raise ValueError(f"{name}: expected {base}, got {text!r}") from None
    return raw


def read_config_file(path: str | Path) -> dict:
    """The settings of a ``.toml``, ``.yaml`` or ``.json`` file. Every error is one line naming the
    file (and the line, for a syntax error)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: config file not found")
    if path.is_dir():
        raise IsADirectoryError(f"--config: {path} is a folder; give a .toml, .yaml or .json file")

    text = decode_text(path.read_bytes(), path)  # as every text file is read: a leading BOM is no setting
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: invalid TOML ({err})") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML configs need `pip install pyyaml`") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{path}: invalid YAML{where}: {problem}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    else:
        raise ValueError(f"{path}: config files are .toml, .yaml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings at the top level")
    return data


# Where a command-line override comes from, for error messages.
FLAG_NAMES = {
    "model": "--model",
    "data": "--data",
    "max_steps": "--max-steps",
    "out_dir": "--out-dir",
    "run_name": "--run-name",
    "expert_parallel": "--expert-parallel",
    "init_from": "--init-from",
    "valid_data": "--valid",
    "source_lang": "--source-lang",
    "target_lang": "--target-lang",
}


def config_from_sources(values: dict, sources: dict[str, str]) -> TrainConfig:
    """``TrainConfig(**values)`` with every error naming the field and where its value came from
    (``sources[field]``: a preset, a file, ``--set``, a flag, a run's ``config.json``)."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = sorted({sources.get(name, "settings") for name in unknown})
        raise ValueError(f"{unknown[0]}: no such config field (from {', '.join(where)}; unknown: {unknown})")
    try:
        return TrainConfig(**values)
    except ValueError as err:
        message = str(err)
        name = message.split(":", 1)[0]
        # every field the message names gets its source: a cross-field error ("num_heads: d_model=7
        # must split ...") blames the value that came from the user, not only the field it is under
        others = [n for n in dict.fromkeys(re.findall(r"\b([a-z_]+)=", message)) if n in sources and n != name]
        where = ([sources[name]] if name in sources else []) + [f"{n} from {sources[n]}" for n in others]
        if where:
            message = f"{message} (from {'; '.join(where)})"
        raise ValueError(message) from None


def resolve_paths(values: dict) -> None:
    """Relative data and tokenizer paths against the working directory, so that the run's
    ``config.json`` holds paths that work from any folder (``eval``, ``--resume``)."""
    for name in ("data", "valid_data"):
        paths = values.get(name)
        if isinstance(paths, str):
            paths = [paths]
        if isinstance(paths, list) and all(isinstance(p, str) and p for p in paths):
            values[name] = [str(Path(p).expanduser().resolve()) for p in paths]
    for name in ("tokenizer", "init_from"):
        path = values.get(name)
        if isinstance(path, str) and path:
            values[name] = str(Path(path).expanduser().resolve())


def settings_given(config_file: str | None, sets: list[str] | None) -> tuple[dict, dict[str, str]]:
    """The settings a config file and ``key=value`` strings give (the later winning), and where
    each came from (the file's path, ``--set key=value``): what a user asked for, before presets."""
    values, sources = {}, {}
    if config_file:
        from_file = read_config_file(config_file)
        values.update(from_file)
        sources.update(dict.fromkeys(from_file, str(config_file)))
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()  # the value is kept as given: a source_prefix ends in a space
        try:
            values[key] = parse_setting(key, text)
        except ValueError as err:
            raise ValueError(f"{err} (from --set {item})") from None
        sources[key] = f"--set {item}"
    return values, sources


def build_config(
    preset: str = "tiny",
    config_file: str | None = None,
    overrides: dict | None = None,
    sets: list[str] | None = None,
    flag_names: dict[str, str] | None = None,
) -> TrainConfig:
    """Preset, then the config file, then ``key=value`` strings, then explicit overrides (flags;
    ``flag_names`` maps their fields to the flags' names for messages). One validation of the
    result, every error naming the field and its source; relative paths resolved."""
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[preset])
    sources = dict.fromkeys(values, f"preset {preset}")
    from_user, user_sources = settings_given(config_file, sets)
    values.update(from_user)
    sources.update(user_sources)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(given)
    sources.update({k: (flag_names or {}).get(k, "overrides") for k in given})
    resolve_paths(values)
    return config_from_sources(values, sources)


# Settings `train --resume` may change: bookkeeping and the run's length. Anything else would make
# the resumed run differ from the one its checkpoints belong to (model, data, optimisation).
RESUMABLE_FIELDS = (
    "max_steps",
    "log_every",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "keep_last",
    "max_bad_steps",
    "tensorboard",
    "sample_prompt",
    "sample_tokens",
    "dist_timeout_s",
    "num_beams",
    "length_penalty",
    "no_repeat_ngram_size",
    # the layout: DCP checkpoints reshard to any; batch_size is per rank, so a run resumed on another
    # number of processes changes it (the trainer checks the global batch stays the same)
    "expert_parallel",
    "fsdp",
    "batch_size",
    "grad_accum",
)


def resume_config(saved: dict, saved_source: str, changes: dict, change_sources: dict[str, str]) -> TrainConfig:
    """The config of a resumed run: the run's own (``saved``, from ``saved_source``) with
    ``changes`` applied. Only :data:`RESUMABLE_FIELDS` may change; any other field given with a
    different value is refused by name (given with the same value, it is accepted)."""
    saved_config = config_from_sources(saved, dict.fromkeys(saved, saved_source))
    current = saved_config.to_dict()
    known = set(current)
    for name in changes:
        if name not in known:
            raise ValueError(f"{name}: no such config field (from {change_sources.get(name, 'settings')})")
    refused = [n for n, v in changes.items() if n not in RESUMABLE_FIELDS and v != current[n]]
    if refused:
        name = refused[0]
        had = "the embedded corpus" if name == "data" and not current[name] else repr(current[name])
        raise ValueError(
            f"{name}: --resume cannot change it (the run has {had}, "
            f"{change_sources.get(name, 'settings')} gives {changes[name]!r}); --resume may change only "
            f"{', '.join(RESUMABLE_FIELDS)}; start a new run to change the rest"
        )
    values = dict(current, **changes)
    return config_from_sources(values, dict(dict.fromkeys(current, saved_source), **change_sources))
