//! Token embedding: a row gather from the `[vocab, d]` table, and its scatter-add gradient.
//!
//! Token ids are integers, so the embedding has no input gradient; its backward pass is the weight
//! gradient (W) alone.

use crate::{KernelError, Real, Result, Tensor};

/// Fails with [`KernelError::IndexOutOfRange`] (operand `embedding.ids`) at the first id that is
/// not below `vocab`.
fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&id| id as usize >= vocab) {
        None => Ok(()),
        Some(position) => Err(KernelError::IndexOutOfRange {
            operand: "embedding.ids",
            position,
            index: ids.get(position).map_or(0, |&id| id as usize),
            bound: vocab,
        }),
    }
}

/// Gathers the rows `table[ids[i]]` into a tensor of shape `[ids.len(), d]`.
///
/// Fails if `table` is not 2-D (operand `embedding.table`) or an id is not below the vocabulary
/// size (operand `embedding.ids`).
pub fn embedding_forward<T: Real>(table: &Tensor<T>, ids: &[u32]) -> Result<Tensor<T>> {
    let dims = table.expect_rank("embedding.table", 2)?;
    let (vocab, d) = (dims[0], dims[1]);
    check_ids(ids, vocab)?;
    let mut out = Tensor::zeros([ids.len(), d]);
    if d == 0 {
        return Ok(out);
    }
    let src = table.data();
    for (row, &id) in out.data_mut().chunks_exact_mut(d).zip(ids) {
        let start = id as usize * d;
        if let Some(from) = src.get(start..start + d) {
            row.copy_from_slice(from);
        }
    }
    Ok(out)
}

/// The table gradient of [`embedding_forward`]: `dtable[ids[i]] += dy[i]`, shape `[vocab, d]`.
/// Rows are added in the order of `ids`, so repeated ids sum deterministically.
///
/// Fails if `dy` is not `[ids.len(), d]` (operand `embedding.dy`) or an id is not below `vocab`
/// (operand `embedding.ids`).
pub fn embedding_backward<T: Real>(dy: &Tensor<T>, ids: &[u32], vocab: usize) -> Result<Tensor<T>> {
    let dims = dy.expect_rank("embedding.dy", 2)?;
    let d = dims[1];
    dy.expect_shape("embedding.dy", &[ids.len(), d])?;
    check_ids(ids, vocab)?;
    let mut grad = Tensor::try_zeros("embedding.vocab", [vocab, d])?;
    if d == 0 {
        return Ok(grad);
    }
    let dst = grad.data_mut();
    for (row, &id) in dy.data().chunks_exact(d).zip(ids) {
        let start = id as usize * d;
        if let Some(to) = dst.get_mut(start..start + d) {
            for (a, &b) in to.iter_mut().zip(row) {
                *a += b;
            }
        }
    }
    Ok(grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fd::{assert_grad_close, dot, numeric_grad, rand_tensor};

    #[test]
    fn forward_gathers_rows() {
        let table = rand_tensor(&[5, 3], 1);
        let ids = [4u32, 0, 4, 2];
        let y = embedding_forward(&table, &ids).unwrap();
        assert_eq!(y.shape(), &[4, 3]);
        for (row, &id) in y.data().chunks_exact(3).zip(&ids) {
            let id = id as usize;
            assert_eq!(row, &table.data()[id * 3..id * 3 + 3]);
        }
        let empty = embedding_forward(&table, &[]).unwrap();
        assert_eq!(empty.shape(), &[0, 3]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let table = rand_tensor(&[6, 4], 2);
        let ids = [1u32, 5, 1, 0, 1];
        let dy = rand_tensor(&[5, 4], 3);
        let g = embedding_backward(&dy, &ids, 6).unwrap();
        let num = numeric_grad(&table, |t| dot(&dy, &embedding_forward(t, &ids).unwrap()));
        assert_grad_close("embedding dtable", &g, &num, 1e-8);
    }

    #[test]
    fn backward_scatter_adds_repeated_ids() {
        let dy = Tensor::new([3, 2], vec![1.0f32, 2.0, 10.0, 20.0, 100.0, 200.0]).unwrap();
        let g = embedding_backward(&dy, &[2, 0, 2], 4).unwrap();
        assert_eq!(g.shape(), &[4, 2]);
        assert_eq!(g.data(), &[10.0, 20.0, 0.0, 0.0, 101.0, 202.0, 0.0, 0.0]);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let table = Tensor::<f32>::zeros([4, 2]);
        let err = embedding_forward(&table, &[0, 3, 4, 9]).unwrap_err();
        assert_eq!(
            err,
            KernelError::IndexOutOfRange {
                operand: "embedding.ids",
                position: 2,
                index: 4,
                bound: 4
            }
        );
        let err = embedding_backward(&Tensor::<f32>::zeros([2, 2]), &[1, 7], 4).unwrap_err();
        assert!(err.to_string().contains("embedding.ids"), "{err}");
        let err = embedding_backward(&Tensor::<f32>::zeros([3, 2]), &[1, 2], 4).unwrap_err();
        assert!(err.to_string().contains("embedding.dy"), "{err}");
        let err = embedding_backward(&Tensor::<f32>::zeros([6]), &[1, 2], 4).unwrap_err();
        assert!(err.to_string().contains("embedding.dy"), "{err}");
        let err = embedding_forward(&Tensor::<f32>::zeros([8]), &[1]).unwrap_err();
        assert!(err.to_string().contains("embedding.table"), "{err}");
    }
}
