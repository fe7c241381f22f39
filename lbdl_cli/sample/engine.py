"""`--engine llama.cpp`: a model directory exported to GGUF (once, into the user's cache) and run by llama.cpp
through llama-cpp-python, behind the interface `generate()` and `perplexity()` use of a GPT: `config`,
`device`, `new_cache(B, max_len)` and `model(idx, cache=..., logits_to_keep=...)` returning float32 logits.
Tokenization, sampling, stop strings and <eos> stay lbdl's, so both engines share every option and output.

    from lbdl_cli.sample.engine import load_llama_cpp
    model = load_llama_cpp("run/best")             # exports to ~/.cache/lbdl/gguf/<hash>.gguf the first time
    logits = model(torch.tensor([[1, 2, 3]]))      # (1, 3, V), computed by llama.cpp

The llama.h calls are llama-cpp-python's ctypes bindings (`llama_cpp.llama_*`). One context serves the model at a
time: a new cache (or a forward without one) clears it. Rows of a batch are llama.cpp sequences decoded together;
rows that repeat a prompt (the samples of one prompt) are prefilled once and copied (llama_memory_seq_cp).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ENGINE_CHOICES
from ..errors import CheckpointError, ConfigError
from ..progress import Progress, report

if TYPE_CHECKING:
    import torch

EXTRA = ("--engine llama.cpp needs llama-cpp-python and gguf: pip install 'lbdl[llama]' (it builds llama.cpp from "
         "source, about 8 minutes on 2 cores)")
GGUF_CACHE = "gguf"  # the exports' folder in kernels.cache_dir()


_ERRORS: list[str] = []  # llama.cpp's latest error lines, for the message of a failure
_LOG_CALLBACK = None  # the ctypes callback installed in llama.cpp (kept alive here)


def require_llama_cpp():
    """The llama_cpp module, llama.cpp's log taken over (kept: its error lines, for our messages; the rest
    dropped); a one-line error naming the extra when it is missing."""
    global _LOG_CALLBACK
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(EXTRA) from None
    if _LOG_CALLBACK is None:
        import ctypes

        @llama_cpp.llama_log_callback
        def keep_errors(level, text, user_data):
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                _ERRORS[:] = [*_ERRORS[-4:], text.decode("utf-8", "replace").strip()]

        _LOG_CALLBACK = keep_errors
        llama_cpp.llama_log_set(keep_errors, ctypes.c_void_p(0))
    return llama_cpp


def _said() -> str:
    """llama.cpp's last error line, as the end of a message."""
    return f" (llama.cpp: {_ERRORS[-1]})" if _ERRORS else ""


def check_engine_options(engine: str, device: str | None, adapter) -> None:
    """What --engine llama.cpp cannot take, refused before anything loads."""
    if engine not in ENGINE_CHOICES:
        raise ConfigError(f"unknown engine {engine!r}; use one of {', '.join(ENGINE_CHOICES)}")
    if engine == "torch":
        return
    if adapter is not None:
        raise ConfigError("--engine llama.cpp runs merged models only: merge the adapter first (lbdl lora merge "
                          "MODEL ADAPTER --out DIR) and run DIR, or use --engine torch")
    if device not in (None, "auto", "cpu"):
        raise ConfigError(f"--engine llama.cpp runs on the CPU here, not on {device}; leave out --device or use "
                          f"--engine torch")


def gguf_key(model_dir: Path, dtype: str | None) -> str:
    """The cache key of a model directory's export: its config, tokenizer and weights' bytes, the float type
    asked for and lbdl's version (the exporter's)."""
    from .. import __version__
    from ..checkpoint import CONFIG_FILE, TOKENIZER_FILE, weights_path
    from ..files import file_sha256

    h = hashlib.sha256(f"lbdl {__version__}\ndtype {dtype or 'auto'}\n".encode())
    for path in (model_dir / CONFIG_FILE, model_dir / TOKENIZER_FILE, weights_path(model_dir)):
        h.update(f"{path.name} {file_sha256(path) if path.is_file() else '-'}\n".encode())
    return h.hexdigest()[:32]


def cached_gguf(model_dir: str | os.PathLike, dtype: str | None = None, progress: Progress | None = None) -> Path:
    """The GGUF file of a model directory in the user's cache (kernels.cache_dir()/gguf), exported on first use;
    `dtype` (float32 | bfloat16; None or auto: as stored) is the type of the float matrices."""
    from ..checkpoint.gguf import export_gguf
    from ..kernels import cache_dir

    model_dir = Path(model_dir)
    dtype = None if dtype in (None, "auto") else dtype
    path = cache_dir() / GGUF_CACHE / f"{gguf_key(model_dir, dtype)}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        report(progress, "load", message=f"exporting {model_dir} to GGUF for llama.cpp: {path}")
        export_gguf(model_dir, path, dtype=dtype, force=True)
    return path


def load_llama_cpp(model_dir: str | os.PathLike, dtype: str | None = None, progress: Progress | None = None,
                   threads: int | None = None, config: dict | None = None) -> LlamaCppModel:
    """A model directory run by llama.cpp (exported to the cache first when it is not there); `config`: its
    config.json when the caller has read it."""
    from ..checkpoint import model_config, read_config

    require_llama_cpp()
    model_dir = Path(model_dir)
    config = config if config is not None else read_config(model_dir)
    path = cached_gguf(model_dir, dtype, progress)
    return LlamaCppModel(path, model_config(config, model_dir), threads=threads)


class LlamaCppCache:
    """What generate() holds of a cache: `length` (positions filled; set back to 0 when the window slides)."""

    def __init__(self):
        self.length = 0
        self.filled = 0  # positions llama.cpp's memory holds: above `length` after a slide, until cleared


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp, called like lbdl's GPT for inference (float32 logits on the CPU)."""

    def __init__(self, path: str | os.PathLike, config, threads: int | None = None):
        import torch

        lc = require_llama_cpp()
        lc.llama_backend_init()
        self._lc, self.path, self.config = lc, Path(path), config
        self.device = torch.device("cpu")
        self.threads = threads or torch.get_num_threads()
        self._model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        if not self._model:
            raise CheckpointError(f"llama.cpp could not load {path}{_said()}; export the model again (lbdl export "
                                  f"MODEL --to gguf) to see why")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        self._ctx = self._batch = None
        self._seqs = self._seq_len = self._batch_len = 0
        self._context(1, config.block_size)  # made now, so that the first call's timing is the model's

    @property
    def file_type(self) -> str:
        """The file's type as llama.cpp names it (general.file_type: "F32", "BF16", "Q8_0", "Q4_K_M", ...)."""
        import ctypes

        from gguf import LlamaFileType

        buf = ctypes.create_string_buffer(32)
        if self._lc.llama_model_meta_val_str(self._model, b"general.file_type", buf, len(buf)) < 0:
            return "unknown"
        return LlamaFileType(int(buf.value)).name.removeprefix("MOSTLY_").removeprefix("ALL_")

    # --- the context -------------------------------------------------------------------

    def _context(self, seqs: int, seq_len: int):
        """A context for `seqs` sequences of `seq_len` positions (reused, emptied, when it is big enough)."""
        lc = self._lc
        top = lc.llama_max_parallel_sequences()
        if seqs > top:
            raise ConfigError(f"--engine llama.cpp runs at most {top} sequences at once, not {seqs}; generate fewer "
                              f"samples or prompts per call, or use --engine torch")
        if self._ctx is not None and seqs <= self._seqs and seq_len <= self._seq_len:
            lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
            return
        self._free_context()
        params = lc.llama_context_default_params()
        params.n_ctx = seqs * seq_len
        params.n_seq_max = seqs
        params.kv_unified = seqs == 1  # one stream per sequence: attention reads only its own cells
        params.n_batch = max(seq_len, seqs)
        params.n_ubatch = min(512, params.n_batch)
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise CheckpointError(f"llama.cpp could not make a context of {seqs} x {seq_len} positions for "
                                  f"{self.path}{_said()}")
        self._batch_len = params.n_batch
        self._batch = lc.llama_batch_init(self._batch_len, 0, 1)
        self._seqs, self._seq_len = seqs, seq_len

    def _free_context(self):
        if self._batch is not None:
            self._lc.llama_batch_free(self._batch)
        if self._ctx:
            self._lc.llama_free(self._ctx)
        self._ctx = self._batch = None
        self._seqs = self._seq_len = 0

    def close(self):
        """Free llama.cpp's context and model (also done when the object is collected)."""
        if getattr(self, "_model", None):
            self._free_context()
            self._lc.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except TypeError:  # at interpreter exit the bindings may be gone before this object
            pass

    # --- decoding ------------------------------------------------------------------------

    def _decode(self, tokens: list[int], positions: list[int], seqs: list[int], wants: list[bool]) -> torch.Tensor:
        """Decode tokens (at their positions, in their sequences) as one batch: the logits (n, V) of those that
        want them, in order, float32, copied out of llama.cpp's buffer (which the next decode reuses); ids the
        file's vocabulary lacks (none in lbdl's exports) at -inf."""
        import ctypes

        import torch

        lc, b = self._lc, self._batch
        token, pos, n_seq_id, seq_id, logits = b.token, b.pos, b.n_seq_id, b.seq_id, b.logits
        for i, t in enumerate(tokens):
            token[i], pos[i], n_seq_id[i], logits[i] = t, positions[i], 1, wants[i]
            seq_id[i][0] = seqs[i]
        b.n_tokens = len(tokens)
        code = lc.llama_decode(self._ctx, b)
        if code != 0:
            raise CheckpointError(f"llama.cpp could not decode a batch of {len(tokens)} tokens (llama_decode "
                                  f"returned {code}) with {self.path}{_said()}")
        out = torch.empty(sum(wants), self.n_vocab)
        if out.numel():
            ctypes.memmove(out.data_ptr(), lc.llama_get_logits(self._ctx), out.nbytes)
        if self.n_vocab < self.config.vocab_size:
            out = torch.cat([out, out.new_full((len(out), self.config.vocab_size - self.n_vocab), -float("inf"))], 1)
        return out

    def _prefill(self, ids: list[int], seq: int, start: int, keep: int) -> torch.Tensor:
        """Decode one sequence's tokens from position `start`, in pieces of the batch's length: the logits
        (keep, V) of its last `keep` tokens."""
        import torch

        out, n, step = [], len(ids), self._batch_len
        for lo in range(0, n, step):
            piece = ids[lo:lo + step]
            out.append(self._decode(piece, range(start + lo, start + lo + len(piece)), [seq] * len(piece),
                                    [lo + j >= n - keep for j in range(len(piece))]))
        return torch.cat(out) if len(out) > 1 else out[0]

    def __call__(self, idx: torch.Tensor, cache: LlamaCppCache | None = None, logits_to_keep: int = 0):
        """idx (B, T) token ids -> float32 logits (B, keep, V): keep = logits_to_keep, or T when 0. Without a
        cache every row is scored from position 0; with one, the rows continue from `cache.length`."""
        import torch

        B, T = idx.shape
        keep = min(logits_to_keep, T) if logits_to_keep > 0 else T
        rows = idx.tolist()
        lc = self._lc
        if cache is None:
            self._context(1, T)
            memory = lc.llama_get_memory(self._ctx)
            out = []
            for row in rows:
                lc.llama_memory_clear(memory, True)
                out.append(self._prefill(row, 0, 0, keep))
            return torch.stack(out)
        start = cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} positions is longer than block_size {self.config.block_size}")
        if cache.filled > start:  # the window slid: forget what is past the new length
            lc.llama_memory_seq_rm(lc.llama_get_memory(self._ctx), -1, start, -1)
        cache.length = cache.filled = start + T
        if T == 1:  # one decode step of every row, together
            return self._decode([row[0] for row in rows], [start] * B, range(B), [True] * B)[:, None]
        first: dict[tuple, int] = {}  # a row's tokens -> the sequence that decoded them
        logits = []
        for s, row in enumerate(rows):
            done = first.get(tuple(row)) if start == 0 else None
            if done is None:
                first[tuple(row)] = s
                logits.append(self._prefill(row, s, start, keep))
            else:  # the same prompt: share its cells
                lc.llama_memory_seq_cp(lc.llama_get_memory(self._ctx), done, s, -1, -1)
                logits.append(logits[done])
        return torch.stack(logits)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> LlamaCppCache:
        """An empty cache of `batch_size` rows (the context is emptied: one cache at a time)."""
        self._context(batch_size, max_len or self.config.block_size)
        return LlamaCppCache()
