//! Conversions between the wire types of `shoal.v1` and the domain types of `shoal-spec`, used at
//! the API's edge by the coordinator, the node agents and the CLI.
//! Absent sub-messages take the job file's defaults; enum values out of range are refused with
//! the field path.

use crate::v1 as pb;
use shoal_spec::job::{
    CheckpointSpec, DataSpec, ElasticitySpec, JobSpec, ParallelismSpec, Precision, TokenDtype,
    TrainingSpec,
};

use shoal_spec::SpecError;

type Result<T> = std::result::Result<T, SpecError>;

fn usize_of(v: u32) -> usize {
    v as usize
}

/// A submitted spec as the domain type (not yet validated against its model).
pub fn job_spec(p: pb::JobSpec) -> Result<JobSpec> {
    let precision = match pb::Precision::try_from(p.precision) {
        Ok(pb::Precision::Unspecified) | Ok(pb::Precision::Fp8) => Precision::Fp8,
        Ok(pb::Precision::Fp32) => Precision::Fp32,
        Ok(pb::Precision::Bf16) => Precision::Bf16,
        Err(_) => {
            return Err(SpecError::invalid(
                "spec.precision",
                format!("unknown value {}", p.precision),
            ));
        }
    };
    let par = p.parallelism.map_or_else(ParallelismSpec::default, |x| {
        let d = ParallelismSpec::default();
        ParallelismSpec {
            pp: usize_of(x.pp),
            dp: usize_of(x.dp),
            ep: usize_of(x.ep),
            schedule: if x.schedule.is_empty() {
                d.schedule
            } else {
                x.schedule
            },
            micro_batches: usize_of(x.micro_batches),
        }
    });
    let training = p
        .training
        .map_or_else(TrainingSpec::default, |t| TrainingSpec {
            steps: t.steps,
            seq_len: usize_of(t.seq_len),
            batch: usize_of(t.batch),
            lr: t.lr,
            warmup_steps: t.warmup_steps,
            min_lr_ratio: t.min_lr_ratio,
            gamma: t.gamma,
            alpha: t.alpha,
            mtp_lambda: t.mtp_lambda,
            seed: t.seed,
            comm_timeout_s: if t.comm_timeout_s == 0.0 {
                TrainingSpec::default().comm_timeout_s
            } else {
                t.comm_timeout_s
            },
        });
    let data = match p.data {
        None => DataSpec::default(),
        Some(d) => DataSpec {
            source: d.source,
            dtype: match pb::TokenDtype::try_from(d.dtype) {
                Ok(pb::TokenDtype::U16) => TokenDtype::U16,
                Ok(pb::TokenDtype::U32) => TokenDtype::U32,
                Err(_) => {
                    return Err(SpecError::invalid(
                        "spec.data.dtype",
                        format!("unknown value {}", d.dtype),
                    ));
                }
            },
        },
    };
    let checkpointing = p
        .checkpointing
        .map_or_else(CheckpointSpec::default, |c| CheckpointSpec {
            dir: c.dir,
            interval: c.interval,
            keep: usize_of(c.keep),
            resume: c.resume,
            on_error: if c.on_error.is_empty() {
                CheckpointSpec::default().on_error
            } else {
                c.on_error
            },
            retry_s: if c.retry_s == 0.0 {
                CheckpointSpec::default().retry_s
            } else {
                c.retry_s
            },
        });
    let elasticity = p
        .elasticity
        .map_or_else(ElasticitySpec::default, |e| ElasticitySpec {
            min_dp: usize_of(e.min_dp),
            max_dp: usize_of(e.max_dp),
        });
    Ok(JobSpec {
        name: p.name,
        model: if p.model.is_empty() {
            "tiny".into()
        } else {
            p.model
        },
        precision,
        priority: p.priority,
        parallelism: par,
        training,
        data,
        checkpointing,
        elasticity,
    })
}

fn u32_of(field: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| SpecError::invalid(field, format!("{v} exceeds u32")))
}

/// A domain spec on the wire.
pub fn job_spec_to_wire(s: &JobSpec) -> Result<pb::JobSpec> {
    Ok(pb::JobSpec {
        name: s.name.clone(),
        model: s.model.clone(),
        parallelism: Some(pb::Parallelism {
            pp: u32_of("spec.parallelism.pp", s.parallelism.pp)?,
            dp: u32_of("spec.parallelism.dp", s.parallelism.dp)?,
            ep: u32_of("spec.parallelism.ep", s.parallelism.ep)?,
            schedule: s.parallelism.schedule.clone(),
            micro_batches: u32_of(
                "spec.parallelism.micro_batches",
                s.parallelism.micro_batches,
            )?,
        }),
        precision: match s.precision {
            Precision::Fp32 => pb::Precision::Fp32,
            Precision::Bf16 => pb::Precision::Bf16,
            Precision::Fp8 => pb::Precision::Fp8,
        } as i32,
        training: Some(pb::Training {
            steps: s.training.steps,
            seq_len: u32_of("spec.training.seq_len", s.training.seq_len)?,
            batch: u32_of("spec.training.batch", s.training.batch)?,
            lr: s.training.lr,
            warmup_steps: s.training.warmup_steps,
            min_lr_ratio: s.training.min_lr_ratio,
            gamma: s.training.gamma,
            alpha: s.training.alpha,
            mtp_lambda: s.training.mtp_lambda,
            seed: s.training.seed,
            comm_timeout_s: s.training.comm_timeout_s,
        }),
        data: Some(pb::Data {
            source: s.data.source.clone(),
            dtype: match s.data.dtype {
                TokenDtype::U16 => pb::TokenDtype::U16,
                TokenDtype::U32 => pb::TokenDtype::U32,
            } as i32,
        }),
        checkpointing: Some(pb::Checkpointing {
            dir: s.checkpointing.dir.clone(),
            interval: s.checkpointing.interval,
            keep: u32_of("spec.checkpointing.keep", s.checkpointing.keep)?,
            resume: s.checkpointing.resume.clone(),
            on_error: s.checkpointing.on_error.clone(),
            retry_s: s.checkpointing.retry_s,
        }),
        elasticity: Some(pb::Elasticity {
            min_dp: u32_of("spec.elasticity.min_dp", s.elasticity.min_dp)?,
            max_dp: u32_of("spec.elasticity.max_dp", s.elasticity.max_dp)?,
        }),
        priority: s.priority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_absent_sections_take_defaults() {
        let text = "name = \"r\"\nprecision = \"bf16\"\n[parallelism]\ndp = 2\nmicro_batches = 4\n[training]\nbatch = 16\ncomm_timeout_s = 7.5\n[data]\ndtype = \"u32\"\nsource = \"t.bin\"";
        let spec = JobSpec::from_toml(text, "r.toml").unwrap();
        let back = job_spec(job_spec_to_wire(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        let minimal = job_spec(pb::JobSpec {
            name: "m".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(minimal, JobSpec::from_toml("name = \"m\"", "m").unwrap());
        // A training section from a client that does not know the timeout: the default.
        let old_client = job_spec(pb::JobSpec {
            name: "m".into(),
            training: Some(pb::Training {
                steps: 3,
                seq_len: 16,
                batch: 2,
                lr: 1e-3,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(old_client.training.comm_timeout_s, 120.0);
        let bad = job_spec(pb::JobSpec {
            name: "m".into(),
            precision: 42,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(bad.to_string(), "spec.precision: unknown value 42");
    }
}
