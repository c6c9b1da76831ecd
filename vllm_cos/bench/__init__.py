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
(concurrent requests through ``LLM.generate``) and prompt sets (code, prose).  Peers:
``ref_standard`` (:class:`vllm_cos.reference.ReferenceDecoder`, a plain transformers loop doing
standard collaborative decoding with KV caches) and ``hf_ensemble`` (transformers' assisted
generation with ``assistant_ensemble_weight``, a static 2-model ensemble verification).

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

Durations on the 2-core dev box (1 thread): ``--preset smoke`` 40-60 s (4 engines);
``--quick`` 5.8 min measured at load 1 (7.3 min at load 4-6; 18 engine starts, 57 engine
measurements + 10 peer measurements, 3 repetitions each); ``--full`` 57 min measured at load 1 (57 engine
starts, 321 engine + 76 peer measurements with longer generations).

Theory (what ``predicted`` means): :mod:`vllm_cos.bench.theory`.

Layout: ``settings`` (presets, prompts, command line), ``environment`` (re-exec, threads, load),
``theory`` (formulas), ``rows`` (:class:`Row`, c, speedups, predictions), ``jobs`` (the plan),
``engine_rows`` (engine measurements), ``peers`` (transformers baselines), ``report`` (tables,
JSON, plots), ``suite`` (:func:`main`).
"""

from __future__ import annotations

# every name of the former single module, for its callers (scripts/bench.py, scripts/bench_profile.py,
# tests/test_bench.py)
from vllm_cos.bench.theory import (  # noqa: F401
    acceptance_from_counters, expected_tokens_per_round, theorem_3_1, theorem_3_6,
)
from vllm_cos.bench.settings import (  # noqa: F401
    build_parser, DEFAULT_TEMPERATURES, parse_args, PRESETS, PROMPTS, Settings, _float_list,
    _int_list, _str_list,
)
from vllm_cos.bench.environment import (  # noqa: F401
    default_threads, load_average, maybe_reexec, performance_env, REEXEC_FLAG, _find_iomp,
    _find_tcmalloc,
)
from vllm_cos.bench.rows import CLOCKS, cost_ratios, derive, rate, Row, _set_timing  # noqa: F401
from vllm_cos.bench.jobs import (  # noqa: F401
    cd_rule, cos_spec, EngineJob, job_measurements, plan, swapped_spec, we_rule, _models, _repo_root,
)
from vllm_cos.bench.engine_rows import (  # noqa: F401
    cos_counters, ENGINE_KWARGS, generate_timed, KV_CACHE_BYTES, measure_on_engine, run_engine_job,
    spec_counters, start_engine, _diff,
)
from vllm_cos.bench.peers import (  # noqa: F401
    count_peer_measurements, hf_ensemble_available, run_hf_ensemble_peer, run_peers,
    run_reference_peer, _hf_ensemble_once, _reference_models,
)
from vllm_cos.bench.report import (  # noqa: F401
    load_rows, markdown_table, replot, TABLE_COLUMNS, targets_summary, write_outputs, write_plots,
    _fmt, _main_gamma, _mean_by_x, _plot_speedup_curves,
)
from vllm_cos.bench.suite import main, progress_bar, tokenize_prompts, _NoBar  # noqa: F401
