"""CoS benchmark suite: ``python -m vllm_cos.bench`` (or ``scripts/bench.py``).

One run measures, on the same vLLM engine settings and the same models:

* ``single``    - the served model alone (and the proposer alone, to measure c);
* ``sd``        - plain speculative decoding of the served model (vLLM ``draft_model``,
                  the small model drafts from its own distribution);
* ``standard``  - standard collaborative decoding (every model once per token);
* ``naive``     - naive CoS (fixed proposer = the small model, gamma drafts);
* ``alternate`` - CoS with the alternate proposal framework (APF);
* for WE, ``naive`` / ``alternate`` once more with the roles swapped (the small model served,
  the large one proposing; column ``proposer``): the second proposer choice of the lambda plot;

for weighted ensembles (lambda grid with 2 models; equal weights with 3 models) and
contrastive decoding (mu in {0.1, 0.3}), temperatures 0 and 1, a gamma grid, batch sizes
(concurrent requests through ``LLM.generate``) and prompt sets (code, prose).  Next to each
fixed-gamma ``naive`` / ``alternate`` row of the main configurations (WE lambda=0.5, CD mu=0.1,
3-model WE) a ``gamma: auto`` row (adaptive draft length; ``gamma`` is "auto" in the JSON).  Peers:
``ref_standard`` (:class:`vllm_cos.reference.ReferenceDecoder`, a plain transformers loop doing
standard collaborative decoding with KV caches); for WE lambda=0.5 at T=1, in the same loop,
``ref alternate`` (the same decoder with the bench's alternate schedule and gamma) and ``mixture
(reference)`` (:class:`vllm_cos.mixture.MixtureDecoder`: model k ~ w, then the token from p_k),
with their speedup over ``ref_standard`` in column ``×ref_std``; and ``hf_ensemble`` (transformers'
assisted generation with ``assistant_ensemble_weight``, a static 2-model ensemble verification).

Output (``--out``, default ``bench_out/``): ``bench.json`` (every figure and the environment),
``bench.md`` (tables), PNG plots (speedup vs lambda per proposer choice, vs gamma, vs batch
size) when matplotlib is importable.

Clocks: every measurement records wall time and this process's CPU time (``time.process_time``,
all threads).  With one OpenMP thread and the engine in-process (no engine-core subprocess) CPU
time is the work done and excludes the time other processes held the cores, so on the shared
dev box speedups, c and the targets use it (``--clock cpu``, default; ``--clock wall`` for an
idle machine, where the two agree).  Both tok/s columns are in the table.

Timing: every measurement is repeated (``--repeats``, 3 in quick/full) with the same seeds and
tok/s is the fastest repetition (the least disturbed by other processes); all repetitions are in
the JSON.  The 1-minute load average is recorded with every row.  Performance environment: the
bench re-execs itself with ``LD_PRELOAD`` = tcmalloc (if installed; a warning otherwise) + Intel
OpenMP (``libiomp5.so`` of the venv's intel-openmp), ``OMP_NUM_THREADS`` (``--threads``, see
:func:`default_threads`), ``KMP_BLOCKTIME=1`` and ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
(``--no-reexec`` skips this).  Engines: float32, eager, prefix caching off, 256 MiB KV cache.

Presets: ``smoke`` (tests), ``quick`` (batch 1, 8, 32; 32 for the main rows only, not sd / peers /
the gamma grid), ``paper`` (the paper's main rows, batch 1 and 8, short generations: meant for
the forward-dominated widened models, ``--models models/wide`` from scripts/widen_models.py),
``full``.  Durations on the 2-core dev box (1 thread): ``--preset smoke`` 40-60 s (5 engines);
``--quick`` was 5.8 min measured at load 1 with batch 1 and 8 only (18 engine starts, 57 engine +
10 peer measurements); with batch 32 and the auto rows it has 25 engine starts and 120 engine +
18 peer measurements (3 repetitions each; 10 before mixture / ref alternate), ~15 min estimated
(not yet timed); ``--preset paper``
on models/wide: 19 engine starts, 44 measurements (2 repetitions), ~10-15 min estimated from a
smoke run on the widened pair (161 s for 5 engines, 10 measurements at load 5-6); ``--full``
57 min measured at load 1 before batch 32 for 3 models and the auto rows (57 engine starts, 321
engine + 76 peer measurements with longer generations; now 64 starts, 384 + 84).

Theory (what ``pred (ours)`` and ``pred (paper)`` mean): :mod:`vllm_cos.bench.theory`.

Layout: ``settings`` (presets, prompts, command line), ``environment`` (re-exec, threads, load),
``theory`` (formulas), ``rows`` (:class:`Row`, c, speedups, predictions), ``jobs`` (the plan),
``engine_rows`` (engine measurements), ``peers`` (transformers baselines), ``report`` (tables,
JSON, plots), ``suite`` (:func:`main`).
"""

from __future__ import annotations

# every name of the former single module, for its callers (scripts/bench.py, scripts/bench_profile.py,
# tests/test_bench.py)
from vllm_cos.bench.theory import (  # noqa: F401
    acceptance_from_counters, expected_tokens_per_round, paper_theorem_3_1, paper_theorem_3_6,
    PREDICTION_NOTES, SERVED_GAMMA, theorem_3_1, theorem_3_6,
)
from vllm_cos.bench.settings import (  # noqa: F401
    build_parser, DEFAULT_TEMPERATURES, parse_args, PRESETS, PROMPTS, Settings, _float_list,
    _int_list, _str_list,
)
from vllm_cos.bench.environment import (  # noqa: F401
    default_threads, load_average, maybe_reexec, performance_env, REEXEC_FLAG, _find_iomp,
    _find_tcmalloc,
)
from vllm_cos.bench.rows import CLOCKS, cost_ratios, derive, MIXTURE, rate, REF_PEERS, Row, _set_timing  # noqa: F401
from vllm_cos.bench.jobs import (  # noqa: F401
    AUTO, cd_rule, cos_spec, engine_groups, EngineJob, job_measurements, MAIN_CONFIGS, plan, swapped_spec, we_rule, we3_rule, _models,
    _repo_root,
)
from vllm_cos.bench.engine_rows import (  # noqa: F401
    cos_counters, Engine, ENGINE_KWARGS, generate_timed, KV_CACHE_BYTES, measure_side_by_side, run_engine_group,
    SpecCounts, start_engine, _diff,
)
from vllm_cos.bench.peers import (  # noqa: F401
    count_peer_measurements, hf_ensemble_available, MIXTURE_LAMBDA, MIXTURE_TEMPERATURE, run_hf_ensemble_peer,
    run_peers, run_reference_peer, _hf_ensemble_once, _reference_models,
)
from vllm_cos.bench.report import (  # noqa: F401
    column_notes, COLUMN_NOTES, load_rows, markdown_table, replot, TABLE_COLUMNS, targets_summary,
    write_outputs, write_plots, _fmt, _main_gamma, _mean_by_x, _plot_speedup_curves,
)
from vllm_cos.bench.suite import main, progress_bar, tokenize_prompts, _NoBar  # noqa: F401
