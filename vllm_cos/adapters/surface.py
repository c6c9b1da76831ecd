"""Every vLLM-internal name the adapters use (the hook surface), as plain data.

Pure stdlib and no vLLM import: :mod:`vllm_cos.adapters.surface_check` (run by
``scripts/check_hooks.py VLLM_SOURCE_DIR``) checks these entries against any vLLM source tree
with :mod:`ast`.  One :class:`Entry` per name:

* ``module``: the module the adapters reach the name through (for a method or attribute, the
  module of the class they use; an inherited member is found through the class's bases, e.g.
  the ``DraftModelProposer`` methods defined on ``SpecDecodeBaseProposer``);
* ``qualname``: ``Class.member`` or a module-level name;
* ``kind``: ``function`` / ``method`` / ``class`` / ``attribute`` (any definition: a field, an
  assignment, ``self.X = ...`` in a method, a property, an import), or ``string`` (a string
  literal the module must contain: a name vLLM reads with ``getattr`` from our objects);
* ``params``: for functions and methods, the parameter names (less ``self`` / ``cls``) as the
  adapters override or call them; a checked tree must have exactly these.

Written against vLLM 0.32.0 (:data:`vllm_cos.adapters.PINNED_VLLM`); keep it in step with the
"vLLM internals touched" lists in the adapters' docstrings.
"""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    module: str
    qualname: str
    kind: str  # function / method / class / attribute / string
    params: tuple[str, ...] | None = None
    used_by: str = ""  # the adapter module(s) that use it


def _attrs(module: str, cls: str, names: str, used_by: str) -> list[Entry]:
    return [Entry(module, f"{cls}.{n}", "attribute", None, used_by) for n in names.split()]


_RUNNER = "vllm.v1.worker.gpu_model_runner"
_PROPOSER = "vllm.v1.spec_decode.draft_model"
_RS = "vllm.v1.sample.rejection_sampler"
_CPU = "vllm.utils.cpu_triton_utils"
_BUILTIN = "vllm.v1.sample.logits_processor.builtin"
_REGISTRY = "vllm.model_executor.models.registry"
_LOADER = "vllm.model_executor.model_loader.default_loader"
_KV = "vllm.v1.kv_cache_interface"
_ARGS = "vllm.engine.arg_utils"

_SPEC_DECODE = [
    Entry(_RUNNER, "DraftModelProposer", "attribute", None, "spec_decode"),
    Entry(_RUNNER, "apply_grammar_bitmask", "function",
          ("scheduler_output", "grammar_output", "input_batch", "logits"), "spec_decode"),
    Entry(_RUNNER, "build_logitsprocs", "function",
          ("vllm_config", "device", "is_pin_memory", "is_pooling_model", "custom_logitsprocs"), "spec_decode"),
    Entry(_RUNNER, "GPUModelRunner", "class", None, "spec_decode"),
    Entry(_RUNNER, "GPUModelRunner._update_states", "method", ("scheduler_output",), "spec_decode"),
    Entry(_RUNNER, "GPUModelRunner._model_forward", "method",
          ("input_ids", "positions", "intermediate_tensors", "inputs_embeds", "**model_kwargs"), "spec_decode, fusion"),
    Entry(_RUNNER, "GPUModelRunner._get_prompt_logprobs_dict", "method",
          ("hidden_states", "num_scheduled_tokens"), "spec_decode, prompt_logprobs"),
    Entry(_RUNNER, "GPUModelRunner._input_fits_in_drafter", "method", ("common_attn_metadata",), "proposer"),
    Entry(_RUNNER, "GPUModelRunner.get_model", "method", (), "standard_rows"),
    Entry("vllm.distributed.parallel_state", "get_tensor_model_parallel_rank", "function", (), "proposer"),
    *_attrs(_RUNNER, "GPUModelRunner", "rejection_sampler sampler input_batch use_async_scheduling drafter "
            "num_prompt_logprobs requests query_start_loc model model_config", "proposer, prompt_logprobs"),
    Entry("vllm.v1.sample.logits_processor", "BUILTIN_LOGITS_PROCESSORS", "attribute", None, "spec_decode"),
    Entry("vllm.v1.core.sched.output", "SchedulerOutput.finished_req_ids", "attribute", None, "spec_decode"),
    Entry("vllm.v1.core.sched.output", "SchedulerOutput.preempted_req_ids", "attribute", None, "spec_decode"),
    Entry("vllm.v1.core.sched.output", "SchedulerOutput.scheduled_spec_decode_tokens", "attribute", None, "fusion"),
    Entry("vllm.v1.core.sched.output", "SchedulerOutput.num_spec_tokens_to_schedule", "attribute", None, "fusion"),
    Entry(_RUNNER, "GPUModelRunner.propose_draft_token_ids", "method",
          ("scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states", "sample_hidden_states",
           "aux_hidden_states", "spec_decode_metadata", "common_attn_metadata", "slot_mappings"), "fusion"),
    *_attrs(_RUNNER, "GPUModelRunner", "discard_request_mask _draft_probs _draft_prob_req_ids", "fusion"),
    *_attrs("vllm.config.vllm", "VllmConfig", "speculative_config additional_config model_config "
            "scheduler_config", "spec_decode, request_checks, proposer"),
    Entry("vllm.config.scheduler", "SchedulerConfig.max_num_seqs", "attribute", None, "proposer"),
]

_PROPOSER_ENTRIES = [
    Entry(_PROPOSER, "DraftModelProposer", "class", None, "proposer"),
    Entry(_PROPOSER, "DraftModelProposer.__init__", "method", ("vllm_config", "device", "runner"), "proposer"),
    Entry(_PROPOSER, "DraftModelProposer.load_model", "method", ("target_model",), "proposer"),
    Entry(_PROPOSER, "DraftModelProposer._get_model", "method", (), "proposer"),
    Entry(_PROPOSER, "DraftModelProposer._create_draft_vllm_config", "method", (), "proposer"),
    Entry(_PROPOSER, "DraftModelProposer.propose", "method",
          ("num_speculative_tokens", "target_token_ids", "target_positions", "target_hidden_states",
           "next_token_ids", "token_indices_to_sample", "common_attn_metadata", "sampling_metadata",
           "mm_embed_inputs", "num_rejected_tokens_gpu", "slot_mappings"), "proposer"),
    Entry(_PROPOSER, "DraftModelProposer.prepare_next_token_ids_padded", "method",
          ("sampled_token_ids", "requests", "gpu_input_batch", "discard_request_mask"), "proposer"),
    Entry(_PROPOSER, "DraftModelProposer.set_inputs_first_pass", "method",
          ("target_token_ids", "next_token_ids", "target_positions", "target_hidden_states",
           "token_indices_to_sample", "cad", "num_rejected_tokens_gpu"), "proposer"),
    Entry(_PROPOSER, "DraftModelProposer.initialize_attn_backend", "method",
          ("kv_cache_config", "kernel_block_sizes"), "proposer"),
    Entry(_PROPOSER, "DraftModelProposer.build_per_group_and_layer_attn_metadata", "method",
          ("common_attn_metadata", "draft_index"), "proposer"),
    Entry(_PROPOSER, "DraftModelProposer.build_model_inputs_first_pass", "method",
          ("num_tokens", "num_input_tokens", "mm_embed_inputs"), "proposer"),
    Entry(_PROPOSER, "DraftModelProposer._determine_batch_execution_and_padding", "method",
          ("num_tokens", "use_cudagraphs"), "proposer"),
    Entry(_PROPOSER, "DraftModelProposer._get_slot_mapping", "method", ("num_tokens", "slot_mapping"), "proposer"),
    Entry(_PROPOSER, "DraftModelProposer._update_positions_dependent_metadata", "method",
          ("positions", "common_attn_metadata", "batch_size", "input_batch_size", "block_size"), "proposer"),
    *_attrs(_PROPOSER, "DraftModelProposer", "model input_ids positions arange token_arange_np block_size "
            "num_speculative_tokens vllm_config device _last_draft_probs", "proposer"),
    Entry("vllm.forward_context", "set_forward_context", "function",
          ("attn_metadata", "vllm_config", "num_tokens", "num_tokens_across_dp", "cudagraph_runtime_mode",
           "batch_descriptor", "ubatch_slices", "slot_mapping", "skip_compiled", "is_padding"), "proposer"),
    Entry("vllm.compilation.backends", "set_model_tag", "function", ("tag", "is_encoder"), "proposer"),
    Entry("vllm.model_executor.model_loader", "get_model", "function",
          ("vllm_config", "model_config", "prefix", "load_config"), "proposer"),
    Entry("vllm.config.utils", "replace", "function", ("dataclass_instance", "**kwargs"),
          "proposer, member_stack, spec_decode"),
    Entry("vllm.v1.attention.backend", "CommonAttentionMetadata.batch_size", "method", (), "proposer"),
    *_attrs("vllm.v1.attention.backend", "CommonAttentionMetadata", "num_actual_tokens max_query_len "
            "query_start_loc query_start_loc_cpu seq_lens max_seq_len slot_mapping", "proposer, prompt_logprobs"),
    *_attrs("vllm.v1.worker.gpu_input_batch", "InputBatch", "req_ids req_id_to_index num_reqs",
            "samplers, prompt_logprobs, fusion"),
]

_SAMPLING = [
    *_attrs("vllm.v1.spec_decode.metadata", "SpecDecodeMetadata", "num_draft_tokens max_spec_len "
            "draft_token_ids target_logits_indices bonus_logits_indices", "samplers"),
    Entry("vllm.v1.outputs", "SamplerOutput", "class", None, "samplers"),
    *_attrs("vllm.v1.outputs", "SamplerOutput", "sampled_token_ids logprobs_tensors", "samplers"),
    Entry("vllm.v1.outputs", "LogprobsTensors.empty_cpu", "method",
          ("num_positions", "num_tokens_per_position"), "prompt_logprobs"),
    *_attrs("vllm.v1.outputs", "LogprobsTensors", "logprob_token_ids logprobs selected_token_ranks",
            "proposer, prompt_logprobs"),
    Entry("vllm.v1.sample.sampler", "Sampler.gather_logprobs", "method",
          ("logprobs", "num_logprobs", "token_ids"), "core, prompt_logprobs"),
    Entry("vllm.v1.sample.sampler", "Sampler.logprobs_mode", "attribute", None, "proposer"),
    Entry("vllm.v1.sample.sampler", "Sampler.forward", "method",
          ("logits", "sampling_metadata", "predict_bonus_token", "logprobs_mode_override"), "samplers"),
    Entry(_RS, "RejectionSampler.forward", "method",
          ("metadata", "draft_probs", "logits", "sampling_metadata"), "samplers"),
    *_attrs("vllm.v1.sample.metadata", "SamplingMetadata", "temperature top_k top_p generators "
            "allowed_token_ids_mask bad_words_token_ids output_token_ids spec_token_ids no_penalties "
            "prompt_token_ids presence_penalties frequency_penalties repetition_penalties logitsprocs "
            "max_num_logprobs thinking_budget_state_holder", "controls, samplers"),
    *_attrs("vllm.v1.sample.logits_processor.state", "LogitsProcessors",
            "all argmax_invariant non_argmax_invariant", "controls, spec_decode"),
    Entry(_BUILTIN, "MinTokensLogitsProcessor.min_toks", "attribute", None, "controls"),
    Entry(_BUILTIN, "LogitBiasLogitsProcessor.biases", "attribute", None, "controls"),
    Entry(_BUILTIN, "MinPLogitsProcessor.min_p_cpu_tensor", "attribute", None, "controls"),
    Entry(_BUILTIN, "MinPLogitsProcessor.min_p_count", "attribute", None, "controls"),
    Entry("vllm.v1.sample.ops.bad_words", "apply_bad_words", "function",
          ("logits", "bad_words_token_ids", "past_tokens_ids"), "controls"),
    Entry("vllm.v1.sample.ops.penalties", "apply_all_penalties", "function",
          ("logits", "prompt_token_ids", "presence_penalties", "frequency_penalties", "repetition_penalties",
           "output_token_ids"), "controls"),
    *_attrs("vllm.v1.worker.gpu_input_batch", "CachedRequestState",
            "prompt_token_ids num_computed_tokens in_progress_prompt_logprobs_cpu", "prompt_logprobs"),
    *_attrs("vllm.v1.worker.gpu_input_batch", "CachedRequestState", "output_token_ids sampling_params",
            "samplers, core"),
    Entry("vllm.v1.utils", "CpuGpuBuffer.np", "attribute", None, "prompt_logprobs"),
]

_ENGINE = [
    Entry("vllm.v1.engine.input_processor", "InputProcessor._validate_params", "method",
          ("params", "supported_tasks"), "request_checks"),
    Entry("vllm.v1.engine.input_processor", "InputProcessor.vllm_config", "attribute", None, "request_checks"),
    Entry("vllm.sampling_params", "SamplingParams._validate_spec_decode", "method", ("speculative_config",),
          "request_checks"),
    Entry("vllm.sampling_params", "SamplingParams.thinking_token_budget", "attribute", None, "request_checks"),
    Entry("vllm.sampling_params", "SamplingParams.extra_args", "attribute", None, "request_checks, core"),
    Entry("vllm.exceptions", "VLLMValidationError.__init__", "method", ("message", "parameter", "value"),
          "request_checks"),
    Entry(_ARGS, "EngineArgs.add_cli_args", "method", ("parser",), "engine_args"),
    Entry(_ARGS, "EngineArgs.create_engine_config", "method", ("usage_context", "headless"), "engine_args"),
    *_attrs(_ARGS, "EngineArgs", "speculative_config model async_scheduling dtype worker_extension_cls "
            "hf_overrides additional_config pipeline_parallel_size tensor_parallel_size data_parallel_size "
            "distributed_executor_backend",
            "engine_args"),
    Entry("vllm.envs", "VLLM_USE_V2_MODEL_RUNNER", "attribute", None, "engine_args"),
    Entry("vllm.config.parallel", "ParallelConfig.worker_extension_cls", "attribute", None, "worker_ext"),
]

_MODELS = [
    Entry(_REGISTRY, "ModelRegistry", "attribute", None, "member_stack"),
    Entry(_REGISTRY, "_ModelRegistry.register_model", "method", ("model_arch", "model_cls"), "member_stack"),
    Entry(_REGISTRY, "_ModelRegistry.resolve_model_cls", "method", ("architectures", "model_config"),
          "member_stack"),
    Entry(_REGISTRY, "_ModelRegistry.get_supported_archs", "method", (), "member_stack"),
    Entry("vllm.config", "ModelConfig", "class", None, "member_stack"),
    Entry("vllm.config.model", "ModelConfig.get_vocab_size", "method", (), "member_stack"),
    *_attrs("vllm.config.model", "ModelConfig", "model tokenizer tokenizer_mode trust_remote_code dtype seed "
            "max_model_len enforce_eager max_logprobs hf_overrides architectures logprobs_mode",
            "member_stack, prompt_logprobs"),
    Entry(_LOADER, "DefaultModelLoader.Source", "class", None, "member_stack"),
    *_attrs(_LOADER, "DefaultModelLoader.Source", "model_or_path revision prefix", "member_stack"),
    Entry(_LOADER, "secondary_weights", "string", None, "member_stack"),
    *_attrs(_KV, "KVCacheConfig", "kv_cache_groups num_blocks", "kv_share"),
    *_attrs(_KV, "KVCacheGroupSpec", "layer_names kv_cache_spec", "kv_share"),
    *_attrs(_KV, "KVCacheSpec", "block_size page_size_bytes", "kv_share"),
]

_CPU_FIXES = [
    Entry(_CPU, "_expand_kernel_impl", "function",
          ("output", "input_val", "cu_num_tokens", "replace_from", "replace_to", "MAX_NUM_TOKENS"), "cpu_expand"),
    Entry(_CPU, "_rejection_random_sample_kernel_impl", "function",
          ("output_token_ids", "cu_num_draft_tokens", "draft_token_ids", "draft_probs", "target_probs",
           "bonus_token_ids", "recovered_token_ids", "uniform_probs", "is_greedy", "max_spec_len", "vocab_size",
           "synthetic_conditional_rates", "NO_DRAFT_PROBS", "SYNTHETIC_MODE"), "cpu_random_reject"),
    Entry(_RS, "expand_kernel", "function",
          ("output_ptr", "input_ptr", "cu_num_tokens_ptr", "replace_from", "replace_to", "MAX_NUM_TOKENS"),
          "cpu_expand"),
    Entry(_RS, "rejection_random_sample_kernel", "function",
          ("output_token_ids_ptr", "cu_num_draft_tokens_ptr", "draft_token_ids_ptr", "draft_probs_ptr",
           "target_probs_ptr", "bonus_token_ids_ptr", "recovered_token_ids_ptr", "uniform_probs_ptr",
           "is_greedy_ptr", "max_spec_len", "vocab_size", "synthetic_conditional_rates_ptr", "NO_DRAFT_PROBS",
           "SYNTHETIC_MODE"), "cpu_random_reject"),
    Entry(_RS, "expand_batch_to_tokens", "function",
          ("x", "cu_num_tokens", "num_tokens", "replace_from", "replace_to"), "cpu_expand"),
    Entry("vllm.triton_utils", "HAS_TRITON", "attribute", None, "cpu_expand, cpu_random_reject"),
    Entry("vllm.triton_utils.dispatcher", "_registry", "attribute", None, "cpu_expand, cpu_random_reject"),
    *_attrs("vllm.triton_utils.dispatcher", "KernelOverride", "_impl func _forward_by_name arg_names",
            "cpu_expand, cpu_random_reject"),
    Entry("vllm.platforms", "current_platform", "attribute", None, "cpu_expand, cpu_random_reject"),
    Entry("vllm.platforms.cpu", "CpuPlatform.register_triton_kernel_overrides", "method", (),
          "cpu_expand, cpu_random_reject"),
    Entry("vllm.platforms.interface", "Platform.is_cpu", "method", (), "cpu_expand, cpu_random_reject"),
    Entry("vllm.platforms.interface", "Platform.import_kernels", "method", (), "cpu_expand, cpu_random_reject"),
]

SURFACE: list[Entry] = [*_SPEC_DECODE, *_PROPOSER_ENTRIES, *_SAMPLING, *_ENGINE, *_MODELS, *_CPU_FIXES]
