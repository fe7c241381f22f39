"""The tokenizer in a GGUF file: lbdl's sentencepiece model <-> llama.cpp's `llama` (SPM) vocabulary keys.

Export writes what llama.cpp's SPM tokenizer reads: every piece, its score and its type (the sentencepiece
piece types and ggml's token types are the same numbers: 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte), the unk/bos/eos/pad ids, add_bos/add_eos false (lbdl adds neither when it encodes) and
add_space_prefix / remove_extra_whitespaces as the model's normalizer has them (false and false for lbdl's
own tokenizers). It also writes `lbdl.tokenizer.spec`: the sentencepiece model with its pieces left out (its
trainer and normalizer settings, a few hundred bytes), so that import rebuilds the very tokenizer.model
(same bytes, same sha256) from the file's pieces; a file without it (llama.cpp's converter) gets the settings
llama.cpp itself assumes.
"""

from __future__ import annotations

from ..errors import CheckpointError

PIECE_TYPES = {1: "normal", 2: "unknown", 3: "control", 4: "user-defined", 5: "unused", 6: "byte"}
BPE = 2  # sentencepiece TrainerSpec.ModelType


def _pb():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def vocab_metadata(model_bytes: bytes) -> dict:
    """The GGUF tokenizer keys of a sentencepiece model: {'tokens', 'scores', 'types', 'unk', 'bos', 'eos', 'pad',
    'add_space_prefix', 'remove_extra_whitespaces', 'spec'} (ids are None when the model has no such token)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    ids = {key: (i if i >= 0 else None) for key, i in
           (("unk", sp.unk_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()))}
    proto = _pb().ModelProto()
    proto.ParseFromString(model_bytes)
    n = proto.normalizer_spec
    tokens, scores, types = ([p.piece for p in proto.pieces], [p.score for p in proto.pieces],
                             [int(p.type) for p in proto.pieces])
    del proto.pieces[:]
    return {"tokens": tokens, "scores": scores, "types": types, **ids,
            "add_space_prefix": n.add_dummy_prefix if n.HasField("add_dummy_prefix") else True,
            "remove_extra_whitespaces": n.remove_extra_whitespaces if n.HasField("remove_extra_whitespaces") else True,
            "spec": proto.SerializeToString()}


def write_vocab(writer, model_bytes: bytes) -> int:
    """Add the `llama` tokenizer keys of a sentencepiece model to a GGUFWriter; the vocabulary size."""
    v = vocab_metadata(model_bytes)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(v["tokens"])
    writer.add_token_scores(v["scores"])
    writer.add_token_types(v["types"])
    for key, add in (("unk", writer.add_unk_token_id), ("bos", writer.add_bos_token_id),
                     ("eos", writer.add_eos_token_id), ("pad", writer.add_pad_token_id)):
        if v[key] is not None:
            add(v[key])
    writer.add_add_bos_token(False)  # lbdl never adds <bos> or <eos> when it encodes text
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(v["add_space_prefix"])
    writer.add_remove_extra_whitespaces(v["remove_extra_whitespaces"])
    writer.add_array("lbdl.tokenizer.spec", v["spec"])
    return len(v["tokens"])


def read_vocab(fields: dict, where) -> bytes | None:
    """A sentencepiece tokenizer.model rebuilt from a GGUF file's `llama` vocabulary (None: the file has no
    tokenizer); a GPT-2 BPE or any other vocabulary is refused."""
    kind = fields.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind == "gpt2":
        raise CheckpointError(f"{where} holds a GPT-2 byte-level BPE vocabulary (tokenizer.ggml.model = gpt2), which "
                              f"lbdl's sentencepiece tokenizer cannot represent exactly; only `llama` (sentencepiece) "
                              f"vocabularies import")
    if kind != "llama":
        raise CheckpointError(f"{where} holds a {kind!r} vocabulary (tokenizer.ggml.model); lbdl imports only `llama` "
                              f"(sentencepiece) vocabularies")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{where} names a llama vocabulary but has no tokenizer.ggml.tokens; the file is "
                              f"incomplete")
    scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(scores) != len(tokens) or len(types) != len(tokens):
        raise CheckpointError(f"{where}: {len(tokens)} tokens but {len(scores)} scores and {len(types)} token types; "
                              f"the vocabulary is damaged")
    bad = sorted({int(t) for t in types} - set(PIECE_TYPES))
    if bad:
        raise CheckpointError(f"{where}: token type {bad[0]} is not a sentencepiece piece type (1-6)")
    pb = _pb()
    proto = pb.ModelProto()
    spec = fields.get("lbdl.tokenizer.spec")
    if spec is not None:  # lbdl's own file: its sentencepiece settings as they were
        try:
            proto.ParseFromString(bytes(int(b) for b in spec))
        except Exception:  # protobuf's DecodeError
            raise CheckpointError(f"{where}: lbdl.tokenizer.spec is not a sentencepiece model; the file is "
                                  f"damaged") from None
        del proto.pieces[:]
    else:
        _default_spec(proto, fields, tokens, types)
    for piece, score, kind in zip(tokens, scores, types):
        p = proto.pieces.add()
        p.piece, p.score = piece, float(score)
        if int(kind) != 1:  # sentencepiece leaves a normal piece's type unset (the default)
            p.type = int(kind)
    if sum(1 for t in types if t == 2) != 1:
        raise CheckpointError(f"{where}: a sentencepiece vocabulary needs exactly one unknown token (type 2); the "
                              f"file has {sum(1 for t in types if t == 2)}")
    return proto.SerializeToString()


def _default_spec(proto, fields: dict, tokens: list[str], types: list) -> None:
    """The settings llama.cpp's SPM tokenizer assumes for a file that has only the vocabulary: BPE merges by score,
    byte fallback when byte pieces are there, spaces escaped, a leading space unless add_space_prefix is false."""
    t, n = proto.trainer_spec, proto.normalizer_spec
    t.model_type = BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = any(int(k) == 6 for k in types)
    for key, field, piece in (("unknown", "unk", "unk_piece"), ("bos", "bos", "bos_piece"),
                              ("eos", "eos", "eos_piece"), ("padding", "pad", "pad_piece")):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        valid = i is not None and 0 <= int(i) < len(tokens)
        setattr(t, f"{field}_id", int(i) if valid else -1)
        if valid:
            setattr(t, piece, tokens[int(i)])
    if t.unk_id < 0:  # sentencepiece's own default is 0; take the one unknown piece where there is one
        unknown = [i for i, k in enumerate(types) if int(k) == 2]
        t.unk_id = unknown[0] if unknown else 0
        t.unk_piece = tokens[t.unk_id]
    n.name = "identity"
    n.add_dummy_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    n.remove_extra_whitespaces = bool(fields.get("tokenizer.ggml.remove_extra_whitespaces", False))
    n.escape_whitespaces = True
