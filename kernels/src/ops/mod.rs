//! Training operators. Each has a forward pass and an explicit backward; operators with weights
//! expose the input gradient (B) and the weight gradient (W) as separate calls so that pipeline
//! schedules can run them at different times.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod linear;
pub mod moe_gate;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

#[cfg(test)]
pub(crate) mod fd;
