"""The commented starter spec written by `gptoss-cloud init` (tests load it and check every key)."""

STARTER_SPEC = """\
# gptoss-cloud run spec. Every key is optional; the value shown is the default unless noted.
# Precedence: CLI flag > environment (GPTOSS_*) > this file > ~/.config/gptoss-cloud/config.yaml > default.
# `submit` resolves it once; the pods train that resolved spec as written (no GPTOSS_* settings there).
version: 1
name: my-finetune            # prefixes the run id: <name>-<yyyymmdd-hhmmss>-<suffix>

model:
  name: 20b                  # 20b | 120b | tiny | safeguard-20b | safeguard-120b | folder | hub id | s3:// prefix
  init: pretrained           # pretrained | random (random weights at the real shape: benchmarks)
  dtype: bfloat16

data:
  datasets:
    - path: sample           # .jsonl / .json / .parquet file, s3://bucket/key, hub id, or the built-in 'sample'
      weight: 1.0            # mixing weight when several datasets are listed
      # field_messages: messages
      # field_thinking: thinking   # reasoning_content is also accepted
  # validation: 0.05         # a held-out fraction, or a source like the entries above
  max_seq_len: 2048          # packed sequence length
  train_on: all              # all | last : which responses are trained
  thinking_turns: expand     # expand | last | drop : how analysis in earlier turns is handled (docs/data.md)
  reasoning_effort: medium   # low | medium | high ; a row's own reasoning_effort wins
  knowledge_cutoff: 2024-06
  # conversation_date: 2025-06-28   # rendered only when set
  overlong: drop             # drop | truncate samples longer than max_seq_len
  on_error: fail             # fail | skip malformed rows
  max_skip_fraction: 0.01    # with skip: fail when more than this fraction is skipped

method:
  kind: lora                 # lora | full
  lora:
    r: 16
    alpha: 32
    target_modules: [q_proj, k_proj, v_proj, o_proj]
    experts: false           # also adapt the experts (gate_up_proj / down_proj)
    # expert_layers: [0, 1]  # only these layers' experts
    router: false
  # qat: mxfp4               # train the experts as the MXFP4 export writes them (needs full or lora.experts)

optim:
  lr: 0.0002
  schedule: cosine           # cosine | constant
  warmup_steps: 10
  epochs: 1
  # max_steps: 1000          # overrides epochs
  micro_batch_size: 1        # packed sequences per GPU per micro-step
  grad_accum: 1
  max_grad_norm: 1.0
  # router_aux_loss_coef: 0.01   # MoE load-balancing loss (off unless set)
  # eval_every: 100
  # step_split: false        # time each step's data / forward+backward / optimizer phases (syncs the GPU)

parallelism:
  nodes: 1
  gpus_per_node: 8
  cpu_offload: false
  activation_checkpointing: auto   # off when the run fits without recomputation (faster), else on
  # cpu_threads: auto        # host threads per rank for the offloaded optimizer step; auto: this rank's share
  # activation_offload: false   # long sequences: checkpointed layer inputs in pinned host memory

kernels:                     # auto: the fast paths on GPU, the eager references on CPU
  # experts_compile: true    # compile the fused experts' SwiGLU into one kernel each way (GPU)
  # mxfp4_dequant: auto      # MXFP4 experts: auto | torch | triton | gemm (decoded inside the GEMM)
  # moe_tile_tokens: 32768   # long sequences: the experts over token tiles, each recomputed in backward

checkpoint:
  # every_steps: 200
  keep_last: 2
  resume: auto               # auto | never | a checkpoint URI

output:
  # store: s3://my-bucket/gptoss-runs   # default ./runs ; GPTOSS_STORE or --store override
  merge: true                # write a servable Hugging Face folder at the end
  # report_to: [tensorboard] # any of tensorboard, mlflow, wandb (docs/tracking.md)

cluster:
  # backend: k8s             # local | k8s | truss ; default from the user config, else local
  # namespace: ml
  # image: ghcr.io/gptoss-cloud/trainer:0.1.0
  # store_secret: {name: s3-credentials}
  # hf_token_secret: {name: hf-token, key: token}
  # secret_env: {WANDB_API_KEY: {name: wandb, key: api-key}}   # credentials, as Secret references
  # env: {NCCL_DEBUG: WARN}  # plain settings only: credential-looking entries are refused
  # queue: gpu-queue         # Kueue LocalQueue
  # gpu_price_per_hour: 2.5  # for plan's cost estimate

# Recurring runs that promote only what is better (docs/gitops-promotion.md). Dataset paths may name
# the tick's data: s3://bucket/data/{date}/ ({date} {yesterday} {hour} {tick} {name}, UTC, at submit).
# promote:
#   name: support-bot        # the record promoted/<name>.json; serve --promoted support-bot follows it
#   eval_data: s3://my-bucket/held-out.jsonl   # the same held-out file for every tick
#   max_eval_loss_regression: 0.0   # eval loss no worse than the promoted run's by more than this
#   min_format_valid_rate: 0.9      # share of generated replies passing every harmony check
#   # max_eval_loss: 2.0            # an absolute ceiling, also for the first run
"""
