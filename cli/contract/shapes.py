"""GPT-OSS model shapes and parameter arithmetic (no torch).

The planner, the trainer's presets, the benchmark's MFU and the serve TP sizing all read shapes from
here, so a shape is written down once. 20b is the published config of openai/gpt-oss-20b; 120b is the
same with 36 layers and 128 local experts; ``tiny`` is a small random model with the real vocabulary
(201,088 tokens, harmony special tokens included) for tests and the local demo.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

HARMONY_VOCAB_SIZE = 201088
PAD_TOKEN_ID = 199999  # <|endoftext|>
EOS_TOKEN_IDS = (200002, 199999, 200012)  # <|return|>, <|endoftext|>, <|call|>


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    vocab_size: int = HARMONY_VOCAB_SIZE
    sliding_window: int = 128
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False

    # ---- parameter counts -------------------------------------------------------------------
    @property
    def attention_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return (h * q + q) + 2 * (h * kv + kv) + (q * h + h) + self.num_attention_heads  # + sinks

    @property
    def expert_params(self) -> int:
        """One expert: gate_up (H x 2I, bias) and down (I x H, bias)."""
        h, i = self.hidden_size, self.intermediate_size
        return (h * 2 * i + 2 * i) + (i * h + h)

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_local_experts + self.num_local_experts

    @property
    def layer_params(self) -> int:
        return self.attention_params + self.router_params + self.num_local_experts * self.expert_params + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + head + self.num_hidden_layers * self.layer_params + self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters touched per token (top-k experts), without the input embedding lookup."""
        per_layer = self.attention_params + self.router_params + self.num_experts_per_tok * self.expert_params + 2 * self.hidden_size
        return self.num_hidden_layers * per_layer + self.embedding_params + self.hidden_size

    @property
    def expert_params_total(self) -> int:
        return self.num_hidden_layers * self.num_local_experts * self.expert_params

    def with_layers(self, layers: int) -> "ModelShape":
        """A reduced- (or increased-) depth copy, for benchmarks and projections."""
        return replace(self, name=f"{self.name}-L{layers}", num_hidden_layers=layers)

    def layer_types(self) -> list[str]:
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)]

    def hf_config_dict(self) -> dict:
        """Keyword arguments for transformers' GptOssConfig."""
        d = asdict(self)
        d.pop("name")
        d["layer_types"] = self.layer_types()
        d["experts_per_token"] = self.num_experts_per_tok
        d["pad_token_id"] = PAD_TOKEN_ID
        d["eos_token_id"] = EOS_TOKEN_IDS[0]
        d["rope_theta"] = 150000
        d["rope_scaling"] = {
            "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "truncate": False,
        }
        d["swiglu_limit"] = 7.0
        d["rms_norm_eps"] = 1e-5
        d["attention_bias"] = True
        d["router_aux_loss_coef"] = 0.9
        d["initial_context_length"] = 4096
        return d


GPT_OSS_20B = ModelShape(
    name="20b", num_hidden_layers=24, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
    num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
)
GPT_OSS_120B = replace(GPT_OSS_20B, name="120b", num_hidden_layers=36, num_local_experts=128)
# head_dim 64 as in the real model: vLLM's CPU attention refuses 16 ("Unsupported CPU attention
# configuration"), and the tiny model is what the real-vLLM serving test serves.
TINY = ModelShape(
    name="tiny", num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=8192,
)

PRESETS: dict[str, ModelShape] = {"20b": GPT_OSS_20B, "120b": GPT_OSS_120B, "tiny": TINY}

# Published weights each preset name means. The safeguard models share the architecture.
HUB_IDS: dict[str, str] = {
    "20b": "openai/gpt-oss-20b",
    "120b": "openai/gpt-oss-120b",
    "safeguard-20b": "openai/gpt-oss-safeguard-20b",
    "safeguard-120b": "openai/gpt-oss-safeguard-120b",
}
ALIASES: dict[str, str] = {"safeguard-20b": "20b", "safeguard-120b": "120b"}


def shape_for(model_name: str, layers: int | None = None, config: dict | None = None) -> ModelShape:
    """The shape of a model name from the spec.

    A preset or alias maps to its published shape; for a local folder or hub id, pass its parsed
    ``config.json`` as ``config``. ``layers`` overrides the depth (benchmarks, projections).
    """
    key = ALIASES.get(model_name, model_name)
    if key in PRESETS:
        shape = PRESETS[key]
    elif config is not None:
        shape = shape_from_config(config, name=model_name)
    elif "120b" in model_name:
        shape = GPT_OSS_120B
    elif "20b" in model_name:
        shape = GPT_OSS_20B
    else:
        raise ValueError(
            f"unknown model shape for {model_name!r}: use 20b, 120b, tiny, safeguard-20b, safeguard-120b, "
            "or a folder/hub id whose config.json can be read"
        )
    return shape.with_layers(layers) if layers else shape


def shape_from_config(config: dict, name: str = "custom") -> ModelShape:
    return ModelShape(
        name=name,
        num_hidden_layers=int(config["num_hidden_layers"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_attention_heads=int(config["num_attention_heads"]),
        num_key_value_heads=int(config["num_key_value_heads"]),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]),
        num_local_experts=int(config["num_local_experts"]),
        num_experts_per_tok=int(config.get("num_experts_per_tok") or config.get("experts_per_token")),
        vocab_size=int(config.get("vocab_size", HARMONY_VOCAB_SIZE)),
        sliding_window=int(config.get("sliding_window") or 128),
        max_position_embeddings=int(config.get("max_position_embeddings", 131072)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
