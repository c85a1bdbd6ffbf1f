"""The default job: a small MoE LM trained on the Python standard library's own source.

Run:   python launch.py --config=configs/default.py --workdir=runs/default
Reach: see README.md ("What the default run produces") for the measured time and validation
       bits per byte on the 2-core CPU.

Any field can be overridden, e.g. `--config.moe.num_experts=16`; unknown fields are an error.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = -1  # -1: take it from the tokenizer
  c.model.d_model = 128  # D
  c.model.num_layers = 4  # Transformer blocks
  c.model.num_heads = 4  # attention heads
  c.model.num_kv_heads = 4  # key/value heads (< num_heads: grouped-query attention)
  c.model.head_dim = 32  # width of one head
  c.model.d_ff = 512  # dense FFN width (dense blocks only)
  c.model.max_len = 256  # longest sequence the model accepts
  c.model.moe_interval = 1  # an MoE block every n-th block (1 = every block)
  c.model.first_moe_layer = 0  # index of the first MoE block
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, router stay float32)
  c.model.scan_layers = False  # nn.scan over blocks (needs moe_interval=1)
  c.model.remat = False  # rematerialize blocks in the backward pass
  c.model.norm = "rms"  # rms | layer (LayerNorm with bias, GPT-2)
  c.model.norm_eps = 1e-6  # normalization epsilon
  c.model.positions = "rope"  # rope | learned (GPT-2)
  c.model.rope_theta = 10000.0  # rotary base
  c.model.rope_type = "default"  # default | llama3 (Llama 3.1+) | yarn (DeepSeek, long Qwen)
  c.model.rope_factor = 1.0  # llama3 / yarn: context extension factor (>= 1)
  c.model.rope_original_max_len = config_dict.placeholder(int)  # llama3/yarn: None = max_len
  c.model.rope_low_freq_factor = 1.0  # llama3: longer wavelengths than original/this: / factor
  c.model.rope_high_freq_factor = 4.0  # llama3: shorter wavelengths than original/this: kept
  c.model.rope_beta_fast = 32.0  # yarn: rotations where the ramp to interpolation starts
  c.model.rope_beta_slow = 1.0  # yarn: rotations where the ramp ends
  c.model.rope_truncate = True  # yarn: round the ramp's ends to whole features
  c.model.rope_attention_factor = config_dict.placeholder(float)  # yarn: cos/sin scale; None = auto
  c.model.rope_mscale = config_dict.placeholder(float)  # yarn: cos/sin scale numerator (DeepSeek)
  c.model.rope_mscale_all_dim = config_dict.placeholder(float)  # yarn: denominator; MLA softmax too
  c.model.mlp_activation = "swiglu"  # dense FFN: swiglu | gelu
  c.model.attention_bias = False  # biases on attention and dense MLP projections (GPT-2)
  c.model.qkv_bias = False  # biases on q/k/v only (Qwen2)
  c.model.qk_norm = config_dict.placeholder(str)  # None | head (Qwen3) | full (OLMoE): RMSNorm of q, k
  c.model.tie_embeddings = False  # output layer shares the embedding matrix
  c.model.sliding_window = config_dict.placeholder(int)  # attend to at most N previous tokens
  c.model.logits_soft_cap = config_dict.placeholder(float)  # tanh cap on the logits
  c.model.attention = "mha"  # mha | mla (multi-head latent attention, DeepSeek-V2/V3)
  c.model.q_lora_rank = config_dict.placeholder(int)  # MLA: low-rank query width; None = none
  c.model.kv_lora_rank = 64  # MLA: width of the cached key/value latent
  c.model.qk_nope_head_dim = 32  # MLA: per-head query/key width without rotary positions
  c.model.qk_rope_head_dim = 16  # MLA: rotary query/key width (one rotary key for all heads)
  c.model.v_head_dim = 32  # MLA: per-head value width
  c.model.rope_interleave = False  # MLA: rotate adjacent feature pairs (DeepSeek checkpoints)

  c.moe = ml_collections.ConfigDict()
  c.moe.enabled = True  # False: every block is dense
  c.moe.num_experts = 8  # E
  c.moe.num_selected = 2  # K, experts per token
  c.moe.expert_hidden = 256  # F, hidden width of one expert
  c.moe.capacity_factor = config_dict.placeholder(float)  # training C factor; None = dropless
  c.moe.capacity_factor = 1.25
  # Eval C factor; None = dropless. Unless set, it follows the training factor: dropless when
  # training is dropless (ml_collections applies no op to None), else max(capacity_factor, 2.0),
  # so evaluation never drops more than training would.
  c.moe.eval_capacity_factor = c.moe.get_ref("capacity_factor")._apply_op(  # noqa: SLF001
      lambda cf: max(cf, 2.0))
  c.moe.min_capacity = 4  # C is at least this
  c.moe.group_size = config_dict.placeholder(int)  # tokens per routing group; None = per device
  c.moe.group_size = 512  # 2 sequences: divides the tokens of 1, 2, 4 or 8 devices (any mesh alike)
  c.moe.router = "token_choice"  # token_choice | expert_choice
  c.moe.priority = "choice_major"  # choice_major | bpr (drop order on overflow)
  c.moe.allow_noncausal_routing = False  # allow bpr / expert_choice in this causal decoder
  c.moe.jitter_eps = 0.0  # router-input jitter U(1-eps, 1+eps), training only
  c.moe.renormalize = True  # top-K weights divided by their sum
  c.moe.num_shared_experts = 0  # always-on experts beside the routed ones
  c.moe.expert_mlp = "swiglu"  # swiglu | gelu
  c.moe.dispatch = "auto"  # auto | reference | einsum | gather | grouped | ragged
  c.moe.load_balance_weight = 1e-2  # weight of L_bal
  c.moe.z_loss_weight = 1e-3  # weight of L_z
  c.moe.bias_balancing = False  # auxiliary-loss-free balancing bias
  c.moe.bias_rate = 1e-3  # bias update rate u
  c.moe.router_dtype = "float32"  # float32 | bfloat16 (matmul) | bfloat16_full (ablations only)
  c.moe.router_logit_scale = 1.0  # router logits x this (stability stress knob)
  c.moe.router_init_scale = 1.0  # router init variance x this (Switch Table 3 uses 0.1)
  c.moe.score_func = "softmax"  # softmax | sigmoid (DeepSeek-V3 per-expert scores)
  c.moe.routed_scale = 1.0  # routed combine weights x this (DeepSeek routed_scaling_factor)
  c.moe.num_groups = 1  # expert groups for group-limited top-K (DeepSeek n_group)
  c.moe.groups_selected = 1  # groups each token keeps (DeepSeek topk_group)
  c.moe.group_score = "max"  # max (DeepSeek-V2) | top2_sum (DeepSeek-V3)
  c.moe.shared_expert_hidden = config_dict.placeholder(int)  # None = moe.expert_hidden
  c.moe.shared_expert_gate = False  # sigmoid gate on the shared experts (Qwen2-MoE)
  c.moe.k_rule = "fixed"  # fixed | top_p | top_p_target (adaptive k; num_selected is then k_max)
  c.moe.top_p = 0.5  # top_p: threshold on the cumulative router prob; top_p_target: start value
  c.moe.k_min = 1  # adaptive k: experts every token takes at least
  c.moe.target_k = config_dict.placeholder(float)  # top_p_target: mean k to steer to
  c.moe.top_p_rate = 1e-3  # top_p_target: threshold step per training step
  c.moe.router_entropy_weight = 0.0  # weight of the router-entropy loss (Huang et al. 2024)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 500  # optimizer steps
  c.train.batch_size = 16  # global batch (sequences)
  c.train.learning_rate = 3e-3  # peak learning rate
  c.train.warmup_steps = 50  # linear warmup
  c.train.min_lr_ratio = 0.1  # cosine decays to peak * this
  c.train.weight_decay = 0.1  # AdamW decoupled weight decay
  c.train.b1 = 0.9  # Adam beta1
  c.train.b2 = 0.95  # Adam beta2
  c.train.grad_clip = 1.0  # global-norm clipping; 0 = off
  c.train.decay_router = True  # AdamW weight decay on the router kernels too (False: exempt)
  c.train.spike_factor = 1.5  # loss spike: step train CE > this x median of the last window
  c.train.spike_window = 50  # steps in that running median (spikes counted after warmup)
  c.train.max_loss_spikes = 5  # more spikes than this: the run ends "diverged"
  c.train.blowup_margin = 1.0  # "diverged": running median CE this far (nats) above its low; 0=off
  c.train.seed = 0  # params, dropout/jitter and data order
  c.train.log_every = 20  # steps between metrics.jsonl records
  c.train.eval_every = 100  # steps between evaluations (and at the end)
  c.train.eval_batches = 8  # validation batches per evaluation
  c.train.checkpoint_every = 100  # steps between checkpoints (and at the end)
  c.train.keep_checkpoints = 2  # keep the last N checkpoints
  c.train.init_from = ""  # fine-tune: checkpoint dir/step to load params from ("" = scratch)
  c.train.upcycle = False  # with init_from: turn a dense checkpoint into this MoE
  c.train.upcycle_noise = 0.0  # relative noise added to upcycled expert copies
  c.train.trainable = "all"  # all | non_moe | moe | router_frozen
  c.train.profile_steps = ""  # "start:end": jax.profiler trace of those steps ("" = off)
  c.train.wandb_project = ""  # Weights & Biases project, if wandb is installed ("" = off)

  c.data = ml_collections.ConfigDict()
  c.data.name = "pystdlib"  # pystdlib | pystdlib_test | textdir | any TFDS text dataset name
  c.data.text_dir = ""  # data.name=textdir: folder of text files
  c.data.tfds_data_dir = ""  # data folder ("" = $TFDS_DATA_DIR if set, else <workdir>/../.tfds)
  c.data.tokenizer = "byte"  # byte | sentencepiece | hf:<tokenizer.json or its folder>
  c.data.sp_vocab_size = 2048  # sentencepiece vocabulary size
  c.data.seq_len = 256  # L, packed sequence length
  c.data.validation_fraction = 0.05  # share of files held out (stable by path hash)
  c.data.num_workers = 0  # grain worker processes (0 = in-process)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size (-1 = fill the remaining devices)
  c.mesh.fsdp = 1  # parameter-sharding axis size
  c.mesh.expert = 1  # expert-parallel axis size (must divide num_experts)
  c.mesh.tensor = 1  # tensor-parallel axis size (must divide F and the head count)
  c.mesh.dcn_data = 1  # data-parallel factor across slices (multi-slice TPU)

  return c
