//! The DeepSeek-V3 model configuration, in the field names of Hugging Face's `DeepseekV3Config`.

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::SpecError;

/// YaRN context extension (`rope_scaling` with `type`/`rope_type` `"yarn"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RopeScaling {
    /// Context extension factor.
    pub factor: f64,
    /// Context length the base model was trained at.
    pub original_max_position_embeddings: usize,
    /// High-frequency boundary (in rotations over the original context).
    pub beta_fast: f64,
    /// Low-frequency boundary.
    pub beta_slow: f64,
    /// Attention temperature coefficient.
    pub mscale: f64,
    /// Attention temperature coefficient applied to all dimensions.
    pub mscale_all_dim: f64,
}

/// A DeepSeek-V3 architecture. Field names and meanings are those of Hugging Face's
/// `DeepseekV3Config`; `num_nextn_predict_layers` is the Multi-Token Prediction depth D.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width h.
    pub hidden_size: usize,
    /// Inner width of the dense SwiGLU MLPs.
    pub intermediate_size: usize,
    /// Inner width of each routed and shared expert.
    pub moe_intermediate_size: usize,
    /// Transformer layers of the main model.
    pub num_hidden_layers: usize,
    /// The first this-many layers use a dense MLP; the rest are MoE layers.
    pub first_k_dense_replace: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Routed experts per MoE layer.
    pub n_routed_experts: usize,
    /// Shared experts per MoE layer (run on every token; fused into one MLP of `n *
    /// moe_intermediate_size` as Hugging Face does).
    pub n_shared_experts: usize,
    /// Routed experts per token (top-k).
    pub num_experts_per_tok: usize,
    /// Expert groups for group-limited routing.
    pub n_group: usize,
    /// Groups a token may route to.
    pub topk_group: usize,
    /// Multiplier on the routed experts' gate weights.
    pub routed_scaling_factor: f64,
    /// Normalise the top-k gate weights to sum 1 (before scaling).
    pub norm_topk_prob: bool,
    /// Rank of the query compression; `None` means a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Rank of the key-value compression (the cached latent).
    pub kv_lora_rank: usize,
    /// Per-head query/key dimensions without RoPE.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key dimensions with (decoupled) RoPE; the RoPE key is shared by all heads.
    pub qk_rope_head_dim: usize,
    /// Per-head value dimension.
    pub v_head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE on interleaved pairs (DeepSeek's layout) rather than split halves.
    pub rope_interleave: bool,
    /// Optional YaRN scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Multi-Token Prediction depth D (modules after the main model).
    pub num_nextn_predict_layers: usize,
    /// Longest sequence the position tables cover.
    pub max_position_embeddings: usize,
    /// Standard deviation of the normal initialisation.
    pub initializer_range: f64,
}

/// The names `ModelConfig::preset` accepts.
pub const PRESETS: [&str; 3] = ["tiny", "small", "deepseek-v3-671b"];

fn invalid(source: &str, field: &str, reason: impl ToString) -> SpecError {
    SpecError::InvalidField {
        source_name: source.to_string(),
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

/// Reads fields from a JSON object, remembering which required ones are missing.
struct Reader<'a> {
    source: &'a str,
    map: &'a Map<String, Value>,
    missing: Vec<String>,
}

impl<'a> Reader<'a> {
    fn value(&mut self, field: &str, required: bool) -> Option<&'a Value> {
        let map: &'a Map<String, Value> = self.map;
        match map.get(field) {
            Some(v) => Some(v),
            None => {
                if required {
                    self.missing.push(field.to_string());
                }
                None
            }
        }
    }

    fn usize_opt(&mut self, field: &str, required: bool) -> Result<Option<usize>, SpecError> {
        match self.value(field, required) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    invalid(
                        self.source,
                        field,
                        format!("expected a non-negative integer, got {v}"),
                    )
                }),
        }
    }

    fn usize(&mut self, field: &str) -> Result<usize, SpecError> {
        Ok(self.usize_opt(field, true)?.unwrap_or(0))
    }

    fn usize_or(&mut self, field: &str, default: usize) -> Result<usize, SpecError> {
        Ok(self.usize_opt(field, false)?.unwrap_or(default))
    }

    fn f64_or(&mut self, field: &str, default: f64) -> Result<f64, SpecError> {
        match self.value(field, false) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| invalid(self.source, field, format!("expected a number, got {v}"))),
        }
    }

    fn bool_or(&mut self, field: &str, default: bool) -> Result<bool, SpecError> {
        match self.value(field, false) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                invalid(
                    self.source,
                    field,
                    format!("expected true or false, got {v}"),
                )
            }),
        }
    }
}

fn rope_scaling(
    source: &str,
    v: &Value,
    default_original: usize,
) -> Result<Option<RopeScaling>, SpecError> {
    let Some(obj) = v.as_object() else {
        return if v.is_null() {
            Ok(None)
        } else {
            Err(invalid(
                source,
                "rope_scaling",
                format!("expected an object or null, got {v}"),
            ))
        };
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    match kind {
        "default" => return Ok(None),
        "yarn" => {}
        other => {
            return Err(invalid(
                source,
                "rope_scaling.type",
                format!("only \"yarn\" is supported, got {other:?}"),
            ));
        }
    }
    let mut r = Reader {
        source,
        map: obj,
        missing: Vec::new(),
    };
    let scaling = RopeScaling {
        factor: r.f64_or("factor", 1.0)?,
        original_max_position_embeddings: r
            .usize_or("original_max_position_embeddings", default_original)?,
        beta_fast: r.f64_or("beta_fast", 32.0)?,
        beta_slow: r.f64_or("beta_slow", 1.0)?,
        mscale: r.f64_or("mscale", 1.0)?,
        mscale_all_dim: r.f64_or("mscale_all_dim", 0.0)?,
    };
    if !(scaling.factor.is_finite() && scaling.factor >= 1.0) {
        return Err(invalid(
            source,
            "rope_scaling.factor",
            "must be a finite number >= 1",
        ));
    }
    Ok(Some(scaling))
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json`. `source` names the file in errors. Unknown fields are
    /// ignored; every missing required field is named in one error.
    pub fn from_hf_json(text: &str, source: &str) -> Result<Self, SpecError> {
        let value: Value = serde_json::from_str(text).map_err(|e| SpecError::Json {
            source_name: source.to_string(),
            reason: e.to_string(),
        })?;
        let Some(map) = value.as_object() else {
            return Err(SpecError::Json {
                source_name: source.to_string(),
                reason: "the top level is not an object".into(),
            });
        };
        let mut r = Reader {
            source,
            map,
            missing: Vec::new(),
        };
        match r.value("model_type", true).map(|v| v.as_str()) {
            None => {}
            Some(Some("deepseek_v3")) => {}
            Some(other) => {
                return Err(invalid(
                    source,
                    "model_type",
                    format!(
                        "expected \"deepseek_v3\", got {}",
                        other.unwrap_or("a non-string")
                    ),
                ));
            }
        }
        let q_lora_rank = match r.value("q_lora_rank", true) {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        invalid(
                            source,
                            "q_lora_rank",
                            format!("expected an integer or null, got {v}"),
                        )
                    })?,
            ),
        };
        let rope_theta = match map.get("rope_theta") {
            Some(_) => r.f64_or("rope_theta", 10000.0)?,
            None => match map.get("rope_parameters").and_then(|p| p.get("rope_theta")) {
                Some(v) => v.as_f64().ok_or_else(|| {
                    invalid(
                        source,
                        "rope_parameters.rope_theta",
                        format!("expected a number, got {v}"),
                    )
                })?,
                None => 10000.0,
            },
        };
        // Newer files fold YaRN into `rope_parameters` (with `rope_type`); its original context
        // defaults to max_position_embeddings, as in transformers.
        let max_pos = map
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(4096);
        let rope_scaling = match (map.get("rope_scaling"), map.get("rope_parameters")) {
            (Some(v), _) if !v.is_null() => rope_scaling(source, v, max_pos)?,
            (_, Some(v))
                if v.get("rope_type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t != "default") =>
            {
                rope_scaling(source, v, max_pos)?
            }
            _ => None,
        };
        let cfg = ModelConfig {
            vocab_size: r.usize("vocab_size")?,
            hidden_size: r.usize("hidden_size")?,
            intermediate_size: r.usize("intermediate_size")?,
            moe_intermediate_size: r.usize("moe_intermediate_size")?,
            num_hidden_layers: r.usize("num_hidden_layers")?,
            first_k_dense_replace: r.usize_or("first_k_dense_replace", 3)?,
            num_attention_heads: r.usize("num_attention_heads")?,
            n_routed_experts: match map.get("num_local_experts") {
                Some(_) if !map.contains_key("n_routed_experts") => r.usize("num_local_experts")?,
                _ => r.usize("n_routed_experts")?,
            },
            n_shared_experts: r.usize_or("n_shared_experts", 1)?,
            num_experts_per_tok: r.usize("num_experts_per_tok")?,
            n_group: r.usize_or("n_group", 8)?,
            topk_group: r.usize_or("topk_group", 4)?,
            routed_scaling_factor: r.f64_or("routed_scaling_factor", 2.5)?,
            norm_topk_prob: r.bool_or("norm_topk_prob", true)?,
            q_lora_rank,
            kv_lora_rank: r.usize("kv_lora_rank")?,
            qk_nope_head_dim: r.usize("qk_nope_head_dim")?,
            qk_rope_head_dim: r.usize("qk_rope_head_dim")?,
            v_head_dim: r.usize("v_head_dim")?,
            rms_norm_eps: r.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_interleave: r.bool_or("rope_interleave", true)?,
            rope_scaling,
            num_nextn_predict_layers: match map.get("num_nextn_predict_layers") {
                Some(_) => r.usize_or("num_nextn_predict_layers", 0)?,
                None => r.usize_or("num_mtp_layers", 0)?,
            },
            max_position_embeddings: r.usize_or("max_position_embeddings", 4096)?,
            initializer_range: r.f64_or("initializer_range", 0.02)?,
        };
        if !r.missing.is_empty() {
            return Err(SpecError::MissingFields {
                source_name: source.to_string(),
                fields: r.missing,
            });
        }
        if r.bool_or("tie_word_embeddings", false)? {
            return Err(invalid(
                source,
                "tie_word_embeddings",
                "tied embeddings are not supported",
            ));
        }
        if let Some(act) = map.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(invalid(
                source,
                "hidden_act",
                format!("only \"silu\" is supported, got {act:?}"),
            ));
        }
        if let Some(f) = map.get("scoring_func").and_then(Value::as_str)
            && f != "sigmoid"
        {
            return Err(invalid(
                source,
                "scoring_func",
                format!("only \"sigmoid\" is supported, got {f:?}"),
            ));
        }
        cfg.validate(source)?;
        Ok(cfg)
    }

    /// The `config.json` Hugging Face `transformers` reads for `DeepseekV3ForCausalLM`.
    pub fn to_hf_json(&self) -> Value {
        let mut v = json!({
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "first_k_dense_replace": self.first_k_dense_replace,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "routed_scaling_factor": self.routed_scaling_factor,
            "norm_topk_prob": self.norm_topk_prob,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_interleave": self.rope_interleave,
            "rope_scaling": self.rope_scaling.as_ref().map(|s| json!({
                "type": "yarn",
                "rope_type": "yarn",
                "factor": s.factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
                "beta_fast": s.beta_fast,
                "beta_slow": s.beta_slow,
                "mscale": s.mscale,
                "mscale_all_dim": s.mscale_all_dim,
            })),
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "moe_layer_freq": 1,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "tie_word_embeddings": false,
            "use_cache": false,
            "torch_dtype": "float32",
        });
        if let Some(obj) = v.as_object_mut()
            && self.rope_scaling.is_none()
        {
            obj.insert("rope_scaling".into(), Value::Null);
        }
        v
    }

    /// A named preset: `tiny` (the default, fixed so benchmarks stay comparable), `small`
    /// (about 100M parameters) or `deepseek-v3-671b` (the paper's model, for planning only).
    pub fn preset(name: &str) -> Result<Self, SpecError> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            "deepseek-v3-671b" | "deepseek-v3" => Ok(Self::deepseek_v3_671b()),
            other => Err(SpecError::UnknownPreset {
                name: other.to_string(),
                known: PRESETS.iter().map(|s| s.to_string()).collect(),
            }),
        }
    }

    /// The `tiny` preset. It must stay exactly this so that benchmarks remain comparable.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 4096,
            hidden_size: 256,
            intermediate_size: 768,
            moe_intermediate_size: 128,
            num_hidden_layers: 4,
            first_k_dense_replace: 1,
            num_attention_heads: 4,
            n_routed_experts: 16,
            n_shared_experts: 1,
            num_experts_per_tok: 4,
            n_group: 4,
            topk_group: 2,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
            q_lora_rank: Some(96),
            kv_lora_rank: 64,
            qk_nope_head_dim: 32,
            qk_rope_head_dim: 16,
            v_head_dim: 32,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_interleave: true,
            rope_scaling: None,
            num_nextn_predict_layers: 1,
            max_position_embeddings: 4096,
            initializer_range: 0.006,
        }
    }

    /// The `small` preset: about 100M parameters (see [`ModelConfig::parameter_count`]).
    pub fn small() -> Self {
        Self {
            vocab_size: 16384,
            hidden_size: 512,
            intermediate_size: 1536,
            moe_intermediate_size: 256,
            num_hidden_layers: 8,
            first_k_dense_replace: 1,
            num_attention_heads: 8,
            n_routed_experts: 24,
            n_shared_experts: 1,
            num_experts_per_tok: 4,
            n_group: 4,
            topk_group: 2,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
            q_lora_rank: Some(192),
            kv_lora_rank: 128,
            qk_nope_head_dim: 64,
            qk_rope_head_dim: 32,
            v_head_dim: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_interleave: true,
            rope_scaling: None,
            num_nextn_predict_layers: 1,
            max_position_embeddings: 4096,
            initializer_range: 0.006,
        }
    }

    /// DeepSeek-V3 (671B total, 37B activated parameters), as released.
    pub fn deepseek_v3_671b() -> Self {
        Self {
            vocab_size: 129280,
            hidden_size: 7168,
            intermediate_size: 18432,
            moe_intermediate_size: 2048,
            num_hidden_layers: 61,
            first_k_dense_replace: 3,
            num_attention_heads: 128,
            n_routed_experts: 256,
            n_shared_experts: 1,
            num_experts_per_tok: 8,
            n_group: 8,
            topk_group: 4,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_interleave: true,
            rope_scaling: Some(RopeScaling {
                factor: 40.0,
                original_max_position_embeddings: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 1.0,
            }),
            num_nextn_predict_layers: 1,
            max_position_embeddings: 163840,
            initializer_range: 0.006,
        }
    }

    /// Checks the relations between fields; `source` names the configuration in errors.
    pub fn validate(&self, source: &str) -> Result<(), SpecError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(source, field, "must be at least 1"));
            }
        }
        if self.q_lora_rank == Some(0) {
            return Err(invalid(source, "q_lora_rank", "must be at least 1 or null"));
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(invalid(
                source,
                "qk_rope_head_dim",
                format!("must be even, got {}", self.qk_rope_head_dim),
            ));
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return Err(invalid(
                source,
                "first_k_dense_replace",
                format!(
                    "{} exceeds num_hidden_layers {}",
                    self.first_k_dense_replace, self.num_hidden_layers
                ),
            ));
        }
        if self.has_moe_layers() || self.num_nextn_predict_layers > 0 {
            self.validate_moe(source)?;
        }
        for (field, v) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
            ("routed_scaling_factor", self.routed_scaling_factor),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(
                    source,
                    field,
                    format!("must be a finite number > 0, got {v}"),
                ));
            }
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return Err(invalid(
                source,
                "initializer_range",
                "must be a finite number >= 0",
            ));
        }
        Ok(())
    }

    fn validate_moe(&self, source: &str) -> Result<(), SpecError> {
        if self.n_routed_experts == 0 || self.moe_intermediate_size == 0 {
            let field = if self.n_routed_experts == 0 {
                "n_routed_experts"
            } else {
                "moe_intermediate_size"
            };
            return Err(invalid(
                source,
                field,
                "must be at least 1 when the model has MoE layers",
            ));
        }
        if self.n_group == 0 || !self.n_routed_experts.is_multiple_of(self.n_group) {
            return Err(invalid(
                source,
                "n_group",
                format!(
                    "must divide n_routed_experts {}, got {}",
                    self.n_routed_experts, self.n_group
                ),
            ));
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return Err(invalid(
                source,
                "topk_group",
                format!("must be in 1..={}, got {}", self.n_group, self.topk_group),
            ));
        }
        let reachable = self.topk_group * (self.n_routed_experts / self.n_group);
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > reachable {
            return Err(invalid(
                source,
                "num_experts_per_tok",
                format!(
                    "must be in 1..={reachable} (experts in topk_group groups), got {}",
                    self.num_experts_per_tok
                ),
            ));
        }
        Ok(())
    }

    /// Query/key head dimension: `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether main-model layer `i` uses DeepSeekMoE (else a dense MLP).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        i >= self.first_k_dense_replace
    }

    /// Whether any main-model layer is an MoE layer.
    pub fn has_moe_layers(&self) -> bool {
        self.first_k_dense_replace < self.num_hidden_layers
    }

    pub(crate) fn attention_params(&self) -> u64 {
        let (h, heads) = (self.hidden_size as u64, self.num_attention_heads as u64);
        let qk = self.qk_head_dim() as u64;
        let q = match self.q_lora_rank {
            Some(r) => h * r as u64 + r as u64 + r as u64 * heads * qk,
            None => h * heads * qk,
        };
        let kv_lora = self.kv_lora_rank as u64;
        let kv = h * (kv_lora + self.qk_rope_head_dim as u64)
            + kv_lora
            + kv_lora * heads * (self.qk_nope_head_dim + self.v_head_dim) as u64;
        q + kv + heads * self.v_head_dim as u64 * h
    }

    pub(crate) fn mlp_params(&self, inner: usize) -> u64 {
        3 * self.hidden_size as u64 * inner as u64
    }

    /// Parameters of one layer (MoE or dense) as `(replicated, routed experts, activated per
    /// token)`: expert parallelism splits the routed experts; every rank of a stage holds the rest.
    pub fn layer_parts(&self, moe: bool) -> (u64, u64, u64) {
        let (total, active) = self.layer_params(moe);
        let routed = if moe {
            self.n_routed_experts as u64 * self.mlp_params(self.moe_intermediate_size)
        } else {
            0
        };
        (total - routed, routed, active)
    }

    fn layer_params(&self, moe: bool) -> (u64, u64) {
        let norms = 2 * self.hidden_size as u64;
        let attn = self.attention_params() + norms;
        if !moe {
            let total = attn + self.mlp_params(self.intermediate_size);
            return (total, total);
        }
        let expert = self.mlp_params(self.moe_intermediate_size);
        let shared = self.n_shared_experts as u64 * expert;
        let gate = (self.n_routed_experts * self.hidden_size + self.n_routed_experts) as u64;
        let total = attn + shared + gate + self.n_routed_experts as u64 * expert;
        let active = attn + shared + gate + self.num_experts_per_tok as u64 * expert;
        (total, active)
    }

    /// `(total, activated per token)` parameter counts, including the MTP modules (whose
    /// embedding and output head are shared with the main model).
    pub fn parameter_count(&self) -> (u64, u64) {
        let h = self.hidden_size as u64;
        let embed = self.vocab_size as u64 * h;
        let (mut total, mut active) = (2 * embed + h, 2 * embed + h);
        for i in 0..self.num_hidden_layers {
            let (t, a) = self.layer_params(self.is_moe_layer(i));
            total += t;
            active += a;
        }
        for _ in 0..self.num_nextn_predict_layers {
            // enorm, hnorm, eh_proj (2h -> h), one MoE block, shared_head.norm.
            let extra = 3 * h + 2 * h * h;
            let (t, a) = self.layer_params(self.has_moe_layers());
            total += extra + t;
            active += extra + a;
        }
        (total, active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_have_the_expected_sizes() {
        for name in PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            cfg.validate(name).unwrap();
        }
        let (total, _) = ModelConfig::small().parameter_count();
        assert!(
            (80_000_000..130_000_000).contains(&total),
            "small has {total} parameters"
        );
        // The paper: 671B total, 37B activated, plus the 14B MTP module.
        let (total, active) = ModelConfig::deepseek_v3_671b().parameter_count();
        let (t, a) = (total as f64 / 1e9, active as f64 / 1e9);
        assert!(
            (680.0..690.0).contains(&t),
            "671B model counted {t}B (with MTP)"
        );
        assert!((37.0..40.0).contains(&a), "activated {a}B");
        assert!(
            ModelConfig::preset("huge")
                .unwrap_err()
                .to_string()
                .contains("tiny, small")
        );
    }

    #[test]
    fn tiny_is_exactly_as_specified() {
        let t = ModelConfig::tiny();
        assert_eq!(
            (
                t.vocab_size,
                t.hidden_size,
                t.intermediate_size,
                t.moe_intermediate_size
            ),
            (4096, 256, 768, 128)
        );
        assert_eq!(
            (
                t.num_hidden_layers,
                t.first_k_dense_replace,
                t.num_attention_heads
            ),
            (4, 1, 4)
        );
        assert_eq!(
            (
                t.n_routed_experts,
                t.n_shared_experts,
                t.num_experts_per_tok
            ),
            (16, 1, 4)
        );
        assert_eq!(
            (t.n_group, t.topk_group, t.routed_scaling_factor),
            (4, 2, 2.5)
        );
        assert_eq!((t.q_lora_rank, t.kv_lora_rank), (Some(96), 64));
        assert_eq!(
            (t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim),
            (32, 16, 32)
        );
        assert_eq!(
            (t.rms_norm_eps, t.rope_theta, t.rope_interleave),
            (1e-6, 10000.0, true)
        );
        assert_eq!(t.num_nextn_predict_layers, 1);
    }

    #[test]
    fn hf_json_round_trips() {
        for name in PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            let text = serde_json::to_string_pretty(&cfg.to_hf_json()).unwrap();
            let back = ModelConfig::from_hf_json(&text, "config.json").unwrap();
            assert_eq!(back, cfg, "{name}");
        }
    }

    fn tiny_json() -> Map<String, Value> {
        ModelConfig::tiny()
            .to_hf_json()
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn missing_fields_are_all_named() {
        let mut m = tiny_json();
        m.remove("hidden_size");
        m.remove("v_head_dim");
        let e = ModelConfig::from_hf_json(&Value::Object(m).to_string(), "ckpt/config.json")
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("ckpt/config.json")
                && text.contains("hidden_size")
                && text.contains("v_head_dim"),
            "{text}"
        );
    }

    #[test]
    fn unknown_fields_are_ignored_and_variants_accepted() {
        let mut m = tiny_json();
        m.insert("some_future_field".into(), json!({"x": 1}));
        m.remove("rope_theta");
        m.insert(
            "rope_parameters".into(),
            json!({"rope_theta": 50000.0, "rope_type": "default"}),
        );
        m.insert("q_lora_rank".into(), Value::Null);
        let cfg = ModelConfig::from_hf_json(&Value::Object(m).to_string(), "c").unwrap();
        assert_eq!(cfg.rope_theta, 50000.0);
        assert_eq!(cfg.q_lora_rank, None);
    }

    #[test]
    fn transformers_5_spellings_are_read() {
        let mut m = tiny_json();
        m.remove("num_nextn_predict_layers");
        m.insert("num_mtp_layers".into(), json!(2));
        m.remove("rope_scaling");
        m.remove("rope_theta");
        m.insert(
            "rope_parameters".into(),
            json!({"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
        );
        let cfg = ModelConfig::from_hf_json(&Value::Object(m).to_string(), "c").unwrap();
        assert_eq!(cfg.num_nextn_predict_layers, 2);
        assert_eq!(cfg.rope_theta, 20000.0);
        let y = cfg.rope_scaling.unwrap();
        assert_eq!((y.factor, y.original_max_position_embeddings), (4.0, 4096));
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("model_type", json!("llama"), "model_type"),
            ("hidden_size", json!("big"), "hidden_size"),
            ("hidden_size", json!(-3), "hidden_size"),
            ("n_group", json!(3), "n_group"),
            ("topk_group", json!(9), "topk_group"),
            ("num_experts_per_tok", json!(9), "num_experts_per_tok"),
            ("qk_rope_head_dim", json!(15), "qk_rope_head_dim"),
            ("first_k_dense_replace", json!(5), "first_k_dense_replace"),
            ("rms_norm_eps", json!(0.0), "rms_norm_eps"),
            ("tie_word_embeddings", json!(true), "tie_word_embeddings"),
            ("hidden_act", json!("gelu"), "hidden_act"),
            (
                "rope_scaling",
                json!({"type": "linear", "factor": 2.0}),
                "rope_scaling.type",
            ),
        ];
        for (field, value, named) in cases {
            let mut m = tiny_json();
            m.insert(field.into(), value.clone());
            let e = ModelConfig::from_hf_json(&Value::Object(m).to_string(), "c.json").unwrap_err();
            assert!(e.to_string().contains(named), "{field}={value}: {e}");
        }
        let e = ModelConfig::from_hf_json("[1, 2]", "c.json").unwrap_err();
        assert!(matches!(e, SpecError::Json { .. }), "{e}");
        let e = ModelConfig::from_hf_json("{not json", "c.json").unwrap_err();
        assert!(e.to_string().starts_with("c.json"), "{e}");
    }
}
