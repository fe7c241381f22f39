"""Pipeline files: lbdl steps in a TOML file, ordered by their references, run with a cache (issue #17).

    [pipeline]                      # optional
    workdir = ".."                  # where the steps run, relative to this file (default: its folder)
    state = "runs/example/.state"   # fingerprints and results, relative to workdir (default: .lbdl-pipeline/STEM)

    [vars]                          # optional: {work} in any value below
    work = "runs/example"

    [report]                        # optional: report.md + report.json after every successful run
    out = "runs/example/report"     # relative to workdir
    title = "Example"

    [steps.tok]
    command = "tokenizer train"     # the words after `lbdl`
    files = ["data/tinyshakespeare.txt"]     # a positional argument by its parameter name; lists are arrays
    vocab_size = 512                # a flag by its config field name (--vocab-size -> vocab_size)
    out = "{work}/tok"

    [steps.shards]
    command = "data prepare"
    files = ["data/tinyshakespeare.txt"]
    tokenizer = "{steps.tok.out}"   # another step's out: this step runs after it
    out = "{work}/shards"

The rules:

- A step's fields are its command's parameters, by the parameter's name or its long flag with - as _ (so
  `--eval FILE` of `quantize sweep` is `eval`); booleans are true/false (--x / --no-x); --json is the
  runner's. Values are checked as the flags are (click's types, then the command's config: type, range,
  choices), before anything runs: `lbdl pipeline validate FILE` lists every problem with its TOML line.
- `{steps.NAME.out}` is that step's `out` value (plain substitution: `{steps.run.out}/best` works); a step
  without out but with png (`lbdl plot --png FILE`) has that file for its out;
  `{NAME}` is a [vars] value; `{{` and `}}` are literal braces. The references order the steps (ties in file
  order); a cycle is an error that names it.
- The pipeline owns its steps' outputs: a command that has --force gets it (unless the step says
  force = false), so a rerun replaces its out; an out that exists but was not written by this step is left
  alone (the step fails) unless the step is forced (`--force STEP`) or says force = true.
- Relative paths are relative to the workdir; the steps run there as `python -m lbdl_cli ... --json`,
  their output captured, their JSON result (the last line) kept. `--dry-run` prints the same command lines
  as a shell script (`cd WORKDIR`, then `lbdl ...`; without --json).

The cache. A step's fingerprint is the sha256 of its command line (options after substitution, so a changed
upstream out path counts), lbdl's version, and the content of every input: each text value of the step that
names an existing file or directory in the workdir (globs expanded), its own out excluded; a directory is its
files' relative paths and contents (hidden entries left out). File hashes are cached in STATE/hashes.json by
(size, mtime_ns, inode): an unchanged file costs one stat, a rewritten one (every lbdl output is a new file)
is read again. A step is cached when STATE/STEP.json holds the same fingerprint and out and its out exists;
that record is written atomically only after the step succeeded. So a changed option (in the file or by
`--set STEP.field=value`) reruns its step, and the steps after it rerun only if its output's content
changed. `--force` forces every step, `--force STEP` one; `--only STEP` runs just that step and
`--from STEP` it and every step after it in the order (both forced; the others skipped).

The report. With a [report] table, a run that succeeded writes report.md and report.json into its out
(atomically) from every step's JSON result (a step not run now: its last recorded one): every model the steps
made or read (a run's best/, a base with an adapter, a merged or quantized directory, a sweep's variants) with
its parameters, size, bits per weight, perplexity on each text and score on each task set; the training runs;
the PNGs (`lbdl plot --png`, the sweep's); the generations. Unchanged results leave the report as it is.

Modules: spec (read, order, check: steps as command lines), run (fingerprints, state, show, run) and report.
"""

from .run import fingerprint, run_pipeline, selection, shell_script, show, subprocess_runner
from .spec import Pipeline, PipelineError, Problem, Step, StepLine, check, command_lines, parse_set, read_pipeline

__all__ = ["Pipeline", "PipelineError", "Problem", "Step", "StepLine", "check", "command_lines", "fingerprint",
           "parse_set", "read_pipeline", "run_pipeline", "selection", "shell_script", "show", "subprocess_runner"]
