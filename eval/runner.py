"""The resumable evaluation runner: answers go to a JSON Lines file as they are produced.

Each batch's records are appended and flushed (and fsync-ed) at once, so a killed run loses at most the batch
in flight; a re-run reads the file, skips the requests already answered and carries on. A truncated last line
(the process died mid-write) is dropped, and error records (e.g. an unreadable image) are dropped too so that
they are tried again: the file ends up with every request exactly once.

The settings that produced the answers (model, prompt, decoding settings, mitigation, a LookupViT's compressed
grid) are kept in a sidecar JSON, `<answers file>.settings.json`, so the answers file itself keeps the plain
format that the official scripts read (e.g. POPE's `question_id` + `answer`). A re-run with other settings
refuses to mix answers unless told to overwrite.

Under `accelerate launch` the requests are split across the processes (`eval.shards`): each appends to its own
shard file, and the main process merges them into the answers file in request order.
"""

import dataclasses
import glob
import hashlib
import json
import logging
import os
from pathlib import Path

from data.images import DEFAULT_MAX_PIXELS

from .inference import Request, generate_answers
from .shards import Shard, current_shard

SETTINGS_SUFFIX = ".settings.json"


class SettingsMismatchError(ValueError):
    """An answers file produced with other settings than the current run's."""


def _jsonable(value):
    """A JSON form of settings values that are not plain JSON (a mitigation config, a torch dtype...)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **dataclasses.asdict(value)}
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def normalise_settings(settings: dict) -> dict:
    """Settings as they read back from JSON (tuples become lists, objects their JSON form)."""
    return json.loads(json.dumps(settings, default=_jsonable, sort_keys=True))


def weights_fingerprint(model, samples: int = 64) -> str:
    """A short hash of the model's weights: every tensor's name, shape and `samples` values spread over it, so
    that answers made by other weights in the same folder (a newer checkpoint) are never resumed from. Cheap
    for any size: a 7B model costs a few thousand small reads."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples].float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_description(model, name: str | None = None) -> dict:
    """What identifies a model in the settings: its folder (or `name`), a fingerprint of its weights and the
    config fields that change answers."""
    config = getattr(model, "config", None)
    description = {"name": name or getattr(model, "name_or_path", "") or type(model).__name__}
    if hasattr(model, "state_dict"):
        description["weights"] = weights_fingerprint(model)
    for key in ("attention_mode", "vision", "connector", "vision_feature_layer"):
        if hasattr(config, key):
            description[key] = getattr(config, key)
    grid = getattr(getattr(model, "vision_tower", None), "compressed_grid", None)
    if grid is not None:  # a LookupViT's grid changes the answers, not the weights' fingerprint
        description["compressed_grid"] = grid
    if hasattr(model, "dtype"):  # bfloat16 and float32 weights decode differently
        description["dtype"] = str(model.dtype)
    return description


class AnswerStore:
    """A JSON Lines answers file keyed by `key_field`, with its settings in a sidecar JSON.

    Args:
        path: the answers file (created with its parent folder when missing).
        key_field: the record field that identifies a request (e.g. "question_id", "image_id").
        settings: the run's settings; they must equal the stored ones unless `overwrite`.
        overwrite: delete previous answers (and their settings) instead of resuming.
    """

    def __init__(self, path, key_field: str, settings: dict, overwrite: bool = False):
        self.path = Path(path)
        self.settings_path = self.path.with_name(self.path.name + SETTINGS_SUFFIX)
        self.key_field = key_field
        self.settings = normalise_settings(settings)
        if overwrite:
            for path in [self.path, self.settings_path, *self.shard_files()]:
                path.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_settings()
        self.records = self._load()

    def _check_settings(self):
        if self.settings_path.is_file():
            stored = json.loads(self.settings_path.read_text(encoding="utf-8"))
            if stored != self.settings:
                changed = sorted(key for key in stored.keys() | self.settings.keys()
                                 if stored.get(key) != self.settings.get(key))
                details = "; ".join(f"{key}: stored {stored.get(key)!r}, now {self.settings.get(key)!r}"
                                    for key in changed)
                raise SettingsMismatchError(
                    f"{self.path} holds answers made with other settings ({details}); refusing to mix them: "
                    "use another output folder or --overwrite (overwrite=True) to start over"
                )
        elif self.path.is_file() and self.path.stat().st_size:
            raise SettingsMismatchError(
                f"{self.path} has answers but no {self.settings_path.name}: their settings are unknown; "
                "use --overwrite (overwrite=True) to start over"
            )
        else:
            self.settings_path.write_text(json.dumps(self.settings, indent=1, sort_keys=True), encoding="utf-8")

    def shard_path(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.name}.rank{rank}")

    def shard_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(glob.escape(self.path.name) + ".rank*"))

    def _read(self, path: Path) -> tuple[list[dict], bool]:
        """The complete records of a JSON Lines file, and whether its last line was cut short by a kill."""
        lines = path.read_bytes().split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # "" after a final newline
        records = []
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON ({error.msg}); fix or delete that line") from None
            if record.get(self.key_field) is None:
                raise ValueError(f"{path}:{number}: record has no {self.key_field!r} field")
            records.append(record)
        return records, bool(tail.strip())

    def _write(self, records) -> None:
        """Replace the answers file with `records` (atomically), and drop the shard files merged into it."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(temporary, self.path)
        for path in self.shard_files():
            path.unlink()

    def _read_all(self) -> tuple[dict, bool]:
        """Every record by key, from the answers file and then the shards of a sharded run (an answer wins over
        an error record of the same request), and whether the file needs rewriting (shards to merge, a line cut
        short by a kill)."""
        records, dirty = {}, False
        for path in ([self.path] if self.path.is_file() else []) + self.shard_files():
            lines, cut = self._read(path)
            dirty = dirty or cut or path != self.path
            for record in lines:
                key = record[self.key_field]
                if key not in records or "error" in records[key]:
                    records[key] = record
                elif path == self.path and "error" not in record:
                    raise ValueError(f"{self.path}: {self.key_field}={key!r} is answered twice "
                                     "(were two runs writing to the same file?)")
        return records, dirty

    def _load(self) -> dict:
        """Answered records by key. The shards of an interrupted sharded run are merged in, and the file is
        rewritten without them, without a truncated last line and without error records (retried now)."""
        records, dirty = self._read_all()
        answered = {key: record for key, record in records.items() if "error" not in record}
        if dirty or len(answered) < len(records):
            self._write(answered.values())
        return answered

    def append(self, records: list[dict], shard: Shard | None = None):
        """Append records (one write, flushed and synced to disk) to the answers file, or to this process's
        shard file in a sharded run; error records are written but not kept as done."""
        if not records:
            return
        path = self.shard_path(shard.rank) if shard is not None and shard.world_size > 1 else self.path
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        for record in records:
            if "error" not in record:
                self.records[record[self.key_field]] = record

    def merge_shards(self, keys: list) -> dict:
        """Main process, after a sharded run: the shards into the answers file, in request order (`keys` first,
        answers of other requests after them), this run's errors included; returns every record by key."""
        records, _ = self._read_all()
        wanted = set(keys)
        self._write([records[key] for key in keys if key in records]
                    + [record for key, record in records.items() if key not in wanted])
        return records

    def every_record(self) -> dict:
        """Every record of the answers file by key, error records included."""
        return self._read_all()[0]


def run_requests(model, processor, requests: list[Request], answers_path, key_field: str, settings: dict,
                 generation_kwargs: dict | None = None, batch_size: int = 8, overwrite: bool = False,
                 progress: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[dict]:
    """Answer the requests not yet in `answers_path` and return one record per request, in request order.

    Records are `{**request.record, "answer"}` or, for requests that failed this time, `{..., "error"}`.
    `settings` (with `generation_kwargs` added) is what the answers file must have been made with.
    """
    generation_kwargs = dict(generation_kwargs or {})
    keys = [request.record[key_field] for request in requests]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"{key_field}={duplicate!r} appears more than once among the requests")
    shard = current_shard()
    settings = {**settings, "generation": generation_kwargs}
    if shard.is_main:  # checks the settings, merges an interrupted run's shards: one process only
        store = AnswerStore(answers_path, key_field, settings, overwrite)
    shard.barrier(f"opening {answers_path}")
    if not shard.is_main:
        store = AnswerStore(answers_path, key_field, settings)
    pending = shard.take([request for request in requests if request.record[key_field] not in store.records])
    missing = [image for request in pending for image in request.images
               if isinstance(image, (str, Path)) and not Path(image).is_file()]
    if missing:  # said before the long part starts; they are answered as errors, each naming its file
        logging.getLogger(__name__).warning(
            "%d of the %d images to answer are missing (e.g. %s)", len(missing),
            sum(len(request.images) for request in pending), missing[0])
    failed = {}
    for results in generate_answers(model, processor, pending, generation_kwargs, batch_size, max_pixels,
                                    progress=progress and shard.is_main):
        store.append(results, shard)
        failed.update({record[key_field]: record for record in results if "error" in record})
    if shard.world_size == 1:
        return [store.records.get(key) or failed[key] for key in keys]
    shard.barrier(f"answering into {answers_path}")
    if shard.is_main:
        merged = store.merge_shards(keys)
    shard.barrier(f"merging {answers_path}")
    if not shard.is_main:
        merged = store.every_record()
    return [merged[key] for key in keys]


def split_errors(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """`(answered, errors)` from a list of result records."""
    return [r for r in records if "error" not in r], [r for r in records if "error" in r]
