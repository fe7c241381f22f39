"""Fine-tuning records: JSON lines -> token ids with loss masks -> fixed-size rows -> batches.

One JSONL file holds records of one format (--format, or "auto": the first record's keys decide):

    completion  {"prompt": "...", "completion": "..."}   loss on the completion and the <eos> after it
    text        {"text": "..."}                           loss on every token and the <eos> after it
    chat        {"messages": [{"role": "user", "content": "..."}, ...]}
                                                          loss on the assistant turns only

Contrastive fine-tuning (`--objective contrastive`) reads pairs instead, {"query": "...", "passage": "..."}
(read_pairs); the training package encodes and batches them.

Other keys of a record are ignored. A chat is rendered message by message through the template
(`{role}` and `{content}` placeholders; default DEFAULT_TEMPLATE, "<|{role}|>\\n{content}\\n"). The template's
text before `{content}` is the turn's prefix, the text after it its suffix. An assistant turn is
prefix + content + suffix + <eos>, with content, suffix and <eos> in the loss (the model learns to end its turn
with <eos>, where generation stops); every other turn is masked. The last message must be the assistant's.
To generate, `chat_prompt` renders the conversation so far and the assistant's prefix. Template text is
encoded with the tokenizer's user special tokens recognised (a tokenizer trained with `<|user|>` etc. as
special tokens gets one id each); record text never turns into special tokens. Each piece (prompt,
completion, prefix, content, suffix) is encoded on its own, so the ids of a prompt are those `generate`
sees. No <bos> is added (as in pretraining shards); every example ends with <eos>.

An example is a pair (ids, labels) of equal length: labels[i] = ids[i] where token i is in the loss, else -100.
Examples go into rows of context + 1 tokens: the model reads row[:-1] and is scored on labels[1:] (targets
aligned with positions, as GPT.forward takes them). With `pack` (the default) consecutive examples share a
row, each ending with its own <eos>, until the next one does not fit; a row is never cut inside an example
that fits in one row (at most context + 1 tokens). A longer example is not truncated: it is cut into rows
that overlap by one token, so each of its loss tokens is scored exactly once (a long completion's later rows
then see only the end of its prompt: pick --context above the longest record to avoid it). The rest of a row
is padding (the tokenizer's <pad>, else <eos>) labelled -100. A row without any loss token (a piece of a
long prompt) is dropped. Without `pack`, each example starts a row of its own.

The validation split is a seeded draw of whole records (before packing), so no example is in both.
`RecordSampler` reads rows in the order of a permutation seeded by (seed, epoch), like data.WindowSampler:
a batch is a pure function of (seed, start), and resuming needs no loader state.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from .config import MAX_SEED, Config, setting
from .errors import ConfigError, DataError
from .files import read_jsonl

FORMATS = ("auto", "completion", "text", "chat")
KEYS = {"completion": ("prompt", "completion"), "text": ("text",), "chat": ("messages",)}  # a format's keys
ROLES = ("system", "user", "assistant")
DEFAULT_TEMPLATE = "<|{role}|>\n{content}\n"
MAX_RECORDS = 1 << 40
IGNORE = -100  # the label of a token that is not scored (F.cross_entropy's ignore_index)


def _json_name(value) -> str:
    """What a JSON value is, for errors: "a number", "an object", ..."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


@dataclass(frozen=True)
class RecordsConfig(Config):
    """How fine-tuning records are read, rendered, split and packed."""

    format: str = setting("auto", "Record format: auto (from the first record's keys) | completion "
                                  "({prompt, completion}: loss on the completion) | text ({text}) | chat "
                                  "({messages}: loss on the assistant turns).", choices=FORMATS)
    template: str = setting(DEFAULT_TEMPLATE, "Chat template of one message, with {role} and {content} "
                                              "(an assistant turn ends with <eos> after it).")
    pack: bool = setting(True, "Pack several short examples into one context window (each ends with <eos>).")
    val_fraction: float = setting(0.1, "Share of records drawn (seeded) for validation (0: none).", low=0,
                                  high=0.5)
    seed: int = setting(1337, "Seed of the train/validation draw.", low=0, high=MAX_SEED)
    max_records: int | None = setting(None, "Read only the first N records (none: all).", low=1, high=MAX_RECORDS)

    def __post_init__(self):
        super().__post_init__()
        if self.template.count("{content}") != 1 or "{role}" not in self.template:
            raise ConfigError(f"records config: template must hold {{role}} and exactly one {{content}}, got "
                              f"{self.template!r}; e.g. {DEFAULT_TEMPLATE!r}")


# --- reading and checking records --------------------------------------------------------


def record_format(record: dict, where: str) -> str:
    """The format whose keys `record` holds: completion, text or chat."""
    found = [fmt for fmt, keys in KEYS.items() if any(k in record for k in keys)]
    if len(found) != 1:
        have = "no key of any" if not found else f"keys of several ({', '.join(found)})"
        raise DataError(f"{where}: the record holds {have} record format; give \"prompt\" and \"completion\", "
                        f"or \"text\", or \"messages\"")
    return found[0]


def _string(record: dict, key: str, where: str, empty: bool = True) -> str:
    if key not in record:
        raise DataError(f"{where}: the record lacks {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {_json_name(value)}")
    if not empty and not value:
        raise DataError(f"{where}: {key!r} is empty")
    return value


def check_record(record: dict, fmt: str, where: str, origin: str = "the first record") -> None:
    """Refuse a record that is not a well-formed record of format `fmt` (its error names `where`)."""
    kind = record_format(record, where)
    if fmt == "completion" and kind != "completion":
        raise DataError(f"{where}: the record has no \"completion\"; format completion (from {origin}) needs "
                        f"{{\"prompt\", \"completion\"}} records")
    if kind != fmt:
        raise DataError(f"{where}: a {kind} record in a file of {fmt} records (from {origin}); keep one format "
                        f"per file")
    if fmt == "completion":
        _string(record, "prompt", where)
        if "completion" not in record:
            raise DataError(f"{where}: the record lacks \"completion\"; format completion trains on it")
        _string(record, "completion", where)
    elif fmt == "text":
        _string(record, "text", where, empty=False)
    else:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        for i, m in enumerate(messages):
            here = f"{where}: message {i + 1}"
            if not isinstance(m, dict):
                raise DataError(f"{here} must be an object {{\"role\", \"content\"}}, got "
                                f"{_json_name(m)}")
            role = _string(m, "role", here)
            if role not in ROLES:
                raise DataError(f"{here}: unknown role {role!r}; use one of {', '.join(ROLES)}")
            _string(m, "content", here)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (the turn to learn), "
                            f"got {messages[-1]['role']!r}")


def read_records(path: str | os.PathLike, cfg: RecordsConfig | None = None) -> tuple[str, list[dict]]:
    """(format, records) of a JSONL file, every record checked; errors name `file:line`."""
    cfg = cfg or RecordsConfig()
    name = f"records file {path}"
    fmt, origin, records = cfg.format, "--format", []
    for number, record in read_jsonl(path, "records file"):
        where = f"{name}:{number}"
        if fmt == "auto":
            fmt, origin = record_format(record, where), f"its first record, line {number}"
        check_record(record, fmt, where, origin)
        records.append(record)
        if cfg.max_records is not None and len(records) >= cfg.max_records:
            break
    if not records:
        raise DataError(f"{name} holds no records; write one JSON object per line")
    return fmt, records


PAIR_KEYS = ("query", "passage")  # a contrastive pair record (`lbdl finetune --objective contrastive`)


def read_pairs(path: str | os.PathLike, max_records: int | None = None) -> list[tuple[str, str]]:
    """(query, passage) of each record {"query": ..., "passage": ...} of a JSONL file (other keys ignored), each
    a non-empty string; errors name `file:line`."""
    name = f"pairs file {path}"
    pairs = []
    for number, record in read_jsonl(path, "pairs file"):
        where = f"{name}:{number}"
        missing = [k for k in PAIR_KEYS if k not in record]
        if missing:
            raise DataError(f"{where}: the record lacks {' and '.join(repr(k) for k in missing)}; a pair is "
                            f'{{"query": "...", "passage": "..."}}')
        pairs.append(tuple(_string(record, k, where, empty=False) for k in PAIR_KEYS))
        if max_records is not None and len(pairs) >= max_records:
            break
    if not pairs:
        raise DataError(f'{name} holds no pairs; write one {{"query": "...", "passage": "..."}} object per line')
    return pairs


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): round(n x val_fraction) records (at least one when val_fraction > 0) drawn by `seed` for
    validation, the rest for training, both in file order."""
    n = len(records)
    n_val = 0 if not val_fraction else max(1, round(n * val_fraction))
    if n_val >= n:
        raise DataError(f"{n} record(s) leave none for training with val_fraction {val_fraction}; add records or "
                        f"lower --val-fraction (0: no validation)")
    val = set(random.Random(f"records-split-{seed}").sample(range(n), n_val))
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


# --- encoding ----------------------------------------------------------------------------
# A record becomes segments (text or a token id, in the loss, template text), then ids and labels.


def template_parts(template: str, role: str) -> tuple[str, str]:
    """(prefix, suffix) of a message of `role`: the template's text before and after {content}."""
    head, tail = template.split("{content}")
    return head.replace("{role}", role), tail.replace("{role}", role)


def _chat_segments(messages: list, template: str, eos_id: int) -> list:
    segments = []
    for m in messages:
        prefix, suffix = template_parts(template, m["role"])
        scored = m["role"] == "assistant"
        segments += [(prefix, False, True), (m["content"], scored, False), (suffix, scored, True)]
        if scored:
            segments.append((eos_id, True, False))
    return segments


def _segments(record: dict, fmt: str, template: str, eos_id: int) -> list:
    if fmt == "completion":
        return [(record["prompt"], False, False), (record["completion"], True, False), (eos_id, True, False)]
    if fmt == "text":
        return [(record["text"], True, False), (eos_id, True, False)]
    return _chat_segments(record["messages"], template, eos_id)


def _encode_segments(tok, examples: list[list]) -> list[tuple[list[int], list[int]]]:
    """Encode every text segment (in two batched calls: template text with special tokens, record text
    without) and lay out ids and labels."""
    texts = {True: [], False: []}
    for segments in examples:
        for seg, _, special in segments:
            if isinstance(seg, str):
                texts[special].append(seg)
    encoded = {k: iter(tok.encode_batch(v, allow_special=k)) for k, v in texts.items()}
    out = []
    for segments in examples:
        ids, labels = [], []
        for seg, scored, special in segments:
            part = next(encoded[special]) if isinstance(seg, str) else [seg]
            ids += part
            labels += part if scored else [IGNORE] * len(part)
        out.append((ids, labels))
    return out


def encode_records(records: list[dict], tok, cfg: RecordsConfig | None = None,
                   fmt: str | None = None) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each record (checked records: see read_records); labels[i] = ids[i] where token i is in
    the loss, else -100. The format is `fmt`, else cfg.format, else (auto) the first record's."""
    cfg = cfg or RecordsConfig()
    if tok.eos_id < 0:
        raise DataError(f"tokenizer {tok.path} has no <eos> token to end examples; use an lbdl tokenizer")
    if not records:
        return []
    fmt = fmt or (cfg.format if cfg.format != "auto" else record_format(records[0], "record 1"))
    for i, r in enumerate(records):
        check_record(r, fmt, f"record {i + 1}", "the records' format")
    return _encode_segments(tok, [_segments(r, fmt, cfg.template, tok.eos_id) for r in records])


def chat_prompt(messages: list[dict], tok, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """The ids that ask the model for the next assistant turn: the messages rendered as in training (each
    assistant turn closed by <eos>), then the assistant's prefix. Generation stops at <eos>; the reply is
    the content followed by the template's suffix."""
    if not isinstance(messages, list):
        raise DataError("messages must be a list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or _string(m, "role", f"message {i + 1}") not in ROLES:
            raise DataError(f"message {i + 1}: needs a role among {', '.join(ROLES)}")
        _string(m, "content", f"message {i + 1}")
    prefix, _ = template_parts(template, "assistant")
    segments = _chat_segments(messages, template, tok.eos_id) + [(prefix, False, True)]
    return _encode_segments(tok, [segments])[0][0]


# --- rows and batches --------------------------------------------------------------------


def pack_examples(examples: list[tuple[list[int], list[int]]], context: int, pad_id: int, pack: bool = True):
    """(ids, labels), each (rows, context + 1) int64: the examples laid into rows (see the module's docstring),
    padding labelled -100, rows without a loss token dropped."""
    import torch

    width = context + 1
    rows: list[tuple[list[int], list[int]]] = []
    ids_row: list[int] = []
    labels_row: list[int] = []

    def close():
        if ids_row and any(label != IGNORE for label in labels_row):
            pad = width - len(ids_row)
            rows.append((ids_row + [pad_id] * pad, labels_row + [IGNORE] * pad))
        ids_row.clear()
        labels_row.clear()

    for ids, labels in examples:
        if not pack or len(ids_row) + len(ids) > width:
            close()
        start = 0
        while len(ids) - start > width:  # too long for a row: rows overlapping by one token
            ids_row += ids[start:start + width]
            labels_row += labels[start:start + width]
            close()
            start += context
        ids_row += ids[start:]
        labels_row += labels[start:]
    close()
    if not rows:
        return torch.zeros(0, width, dtype=torch.long), torch.zeros(0, width, dtype=torch.long)
    return (torch.tensor([r[0] for r in rows], dtype=torch.long),
            torch.tensor([r[1] for r in rows], dtype=torch.long))


class RecordSampler:
    """The Sampler of fine-tuning (train/parts.py): rows in the order of a permutation seeded by (seed, epoch)."""

    def __init__(self, rows, seed: int, name: str = "training"):
        self.ids, self.labels = rows
        self.seed = seed
        self.n_samples = int(self.ids.shape[0])
        self.context = int(self.ids.shape[1]) - 1
        if self.n_samples < 1:
            raise DataError(f"the {name} records make no row with a token to learn; add records")
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int):
        import torch

        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_samples, generator=g), epoch
        return self._perm

    def rows(self, start: int, count: int) -> list[int]:
        """The row indices of samples [start, start + count)."""
        out = []
        for i in range(start, start + count):
            epoch, j = divmod(i, self.n_samples)
            out.append(int(self._permutation(epoch)[j]))
        return out

    def batch(self, start: int, count: int, device="cpu"):
        """Samples [start, start + count) of the run: (x, y), each (count, context) int64, y -100 where no loss."""
        import torch

        index = torch.tensor(self.rows(start, count), dtype=torch.long)
        ids, labels = self.ids[index], self.labels[index]  # (count, context + 1)
        if device != "cpu":
            ids = ids.pin_memory().to(device, non_blocking=True)
            labels = labels.pin_memory().to(device, non_blocking=True)
        return ids[:, :-1], labels[:, 1:]  # y[t]: the label of the token after position t


def val_batches(rows, batch_size: int, n_batches: int, seed: int) -> list:
    """A fixed set of validation batches (x, y) (the same at every evaluation), like data.eval_batches."""
    sampler = RecordSampler(rows, seed + 1, name="validation")
    count = min(n_batches * batch_size, sampler.n_samples)
    return [sampler.batch(i, min(batch_size, count - i)) for i in range(0, count, batch_size)]


# --- all at once --------------------------------------------------------------------------


@dataclass
class RecordSet:
    """A records file, read, split, encoded and laid into rows."""

    format: str
    train: tuple  # (ids, labels), each (rows, context + 1) int64
    val: tuple | None  # the same for the validation records, None when val_fraction is 0
    stats: dict  # records, examples longer than a row, tokens, loss tokens, rows of each split


def load_records(path: str | os.PathLike, tok, context: int, cfg: RecordsConfig | None = None) -> RecordSet:
    """Read `path` (checked: errors name file:line), split it, encode it with `tok` and lay it into rows of
    context + 1 tokens."""
    cfg = cfg or RecordsConfig()
    fmt, records = read_records(Path(path), cfg)
    train, val = split_records(records, cfg.val_fraction, cfg.seed)
    pad_id = tok.pad_id if tok.pad_id >= 0 else tok.eos_id
    stats = {"format": fmt, "context": context, "template": cfg.template if fmt == "chat" else None}
    splits = {}
    for split, part in (("train", train), ("val", val)):
        if not part:
            continue
        examples = encode_records(part, tok, cfg, fmt)
        splits[split] = pack_examples(examples, context, pad_id, cfg.pack)
        stats[split] = {"records": len(part), "rows": int(splits[split][0].shape[0]),
                        "tokens": sum(len(ids) for ids, _ in examples),
                        "scored_tokens": int((splits[split][1][:, 1:] != IGNORE).sum()),
                        "longer_than_a_row": sum(len(ids) > context + 1 for ids, _ in examples)}
    return RecordSet(format=fmt, train=splits["train"], val=splits.get("val"), stats=stats)
