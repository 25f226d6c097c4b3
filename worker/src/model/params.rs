//! The parameter store: every trainable tensor of the model in one flat, named list.
//!
//! Layers hold [`ParamId`]s into the store; gradients are a [`Grads`] of the same layout, so the
//! optimizer, gradient clipping and checkpoints work on the whole model without knowing its
//! structure. Names are the Hugging Face `DeepseekV3` tensor names.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal_kernels::{Fp8Matrix, Real, Tensor};
use std::sync::OnceLock;

use crate::{Result, WorkerError};

/// Index of a parameter in a [`ParamStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(usize);

impl ParamId {
    /// Position in the store.
    pub fn index(self) -> usize {
        self.0
    }
}

/// How a parameter is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal with this standard deviation.
    Normal(f64),
    /// All ones (norm weights).
    Ones,
    /// All zeros (expert biases).
    Zeros,
}

/// Whether the optimizer updates a parameter from its gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trainable {
    /// Updated by AdamW.
    Yes,
    /// Has no gradient; updated by another rule (the expert bias of auxiliary-loss-free balancing).
    No,
}

#[derive(Clone, Debug)]
struct Entry {
    name: String,
    shape: Vec<usize>,
    init: Init,
    trainable: Trainable,
    /// Weight decay applies to matrices, not to norms and biases.
    decay: bool,
}

/// The declared layout: names, shapes and initialisers, in declaration order.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    entries: Vec<Entry>,
}

impl Layout {
    /// Declares a parameter and returns its id.
    pub fn add(
        &mut self,
        name: String,
        shape: Vec<usize>,
        init: Init,
        trainable: Trainable,
    ) -> ParamId {
        let decay = shape.len() >= 2 && trainable == Trainable::Yes;
        self.entries.push(Entry {
            name,
            shape,
            init,
            trainable,
            decay,
        });
        ParamId(self.entries.len() - 1)
    }

    /// Number of parameters (tensors).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no parameter is declared.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total element count.
    pub fn numel(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }
}

/// Parameter tensors, in the order of their [`Layout`].
#[derive(Clone, Debug)]
pub struct ParamStore<T> {
    layout: Layout,
    tensors: Vec<Tensor<T>>,
    /// Each weight as a mixed-precision GEMM operand, made on first use and dropped whenever the
    /// parameter can change (every `&mut` access), so a training step converts each weight once
    /// for all its micro-batches and passes instead of once per GEMM.
    operands: Vec<OnceLock<WeightOperand<T>>>,
}

/// A weight converted for the mixed-precision GEMMs.
#[derive(Clone, Debug)]
pub enum WeightOperand<T> {
    /// Rounded to BF16 (kept in `T`).
    Bf16(Tensor<T>),
    /// Quantized to E4M3 in 128x128 blocks, as `W` (Fprop) and as `W^T` (Dgrad).
    Fp8 {
        /// `W`, `[out, in]`.
        w: Fp8Matrix,
        /// `W^T`, `[in, out]`: the same blocks transposed.
        wt: Fp8Matrix,
    },
}

impl<T> WeightOperand<T> {
    fn is_bf16(&self) -> bool {
        matches!(self, WeightOperand::Bf16(_))
    }
}

fn fresh<T>(n: usize) -> Vec<OnceLock<T>> {
    (0..n).map(|_| OnceLock::new()).collect()
}

impl<T: Real> ParamStore<T> {
    /// Initialises every parameter. Each tensor draws from its own generator seeded by
    /// `(seed, index)`, so the values do not depend on anything but the seed and the layout.
    pub fn init(layout: Layout, seed: u64) -> Result<Self> {
        let mut tensors = Vec::with_capacity(layout.len());
        for (i, e) in layout.entries.iter().enumerate() {
            let numel =
                shoal_kernels::checked_numel("parameter", &e.shape, std::mem::size_of::<T>())?;
            let data = match e.init {
                Init::Ones => vec![T::one(); numel],
                Init::Zeros => vec![T::zero(); numel],
                Init::Normal(std) => {
                    let mut rng = StdRng::seed_from_u64(
                        seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    (0..numel).map(|_| T::of(normal(&mut rng) * std)).collect()
                }
            };
            tensors.push(Tensor::new(e.shape.clone(), data)?);
        }
        Ok(Self {
            operands: fresh(tensors.len()),
            layout,
            tensors,
        })
    }

    /// The parameter as a mixed-precision GEMM operand: the cached one when it is of the kind
    /// asked for (`bf16`), otherwise `make` builds it (and caches it unless another kind is
    /// cached already). Concurrent first uses may both build it; they build the same value.
    pub fn operand(
        &self,
        id: ParamId,
        bf16: bool,
        make: impl FnOnce(&Tensor<T>) -> Result<WeightOperand<T>>,
    ) -> Result<std::borrow::Cow<'_, WeightOperand<T>>>
    where
        T: Clone,
    {
        use std::borrow::Cow;
        let cell = &self.operands[id.0];
        if let Some(v) = cell.get() {
            if v.is_bf16() == bf16 {
                return Ok(Cow::Borrowed(v));
            }
            return Ok(Cow::Owned(make(&self.tensors[id.0])?));
        }
        let v = make(&self.tensors[id.0])?;
        if v.is_bf16() != bf16 {
            return Err(WorkerError::invalid(
                &self.layout.entries[id.0].name,
                "weight operand of the wrong kind",
            ));
        }
        // When another thread cached it first, its value is the same one.
        let _already_set = cell.set(v).is_err();
        match cell.get() {
            Some(v) => Ok(Cow::Borrowed(v)),
            None => Err(WorkerError::invalid(
                &self.layout.entries[id.0].name,
                "weight operand cache",
            )),
        }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A parameter.
    pub fn get(&self, id: ParamId) -> &Tensor<T> {
        &self.tensors[id.0]
    }

    /// A parameter, mutably (drops its cached GEMM operand).
    pub fn get_mut(&mut self, id: ParamId) -> &mut Tensor<T> {
        self.operands[id.0] = OnceLock::new();
        &mut self.tensors[id.0]
    }

    /// `(id, name, tensor)` for every parameter.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &str, &Tensor<T>)> {
        self.layout
            .entries
            .iter()
            .zip(&self.tensors)
            .enumerate()
            .map(|(i, (e, t))| (ParamId(i), e.name.as_str(), t))
    }

    /// The name of a parameter.
    pub fn name(&self, id: ParamId) -> &str {
        &self.layout.entries[id.0].name
    }

    /// Whether AdamW trains the parameter.
    pub fn trainable(&self, id: ParamId) -> bool {
        self.layout.entries[id.0].trainable == Trainable::Yes
    }

    /// Whether weight decay applies.
    pub fn decays(&self, id: ParamId) -> bool {
        self.layout.entries[id.0].decay
    }

    /// Replaces a parameter's values; the shape must match.
    pub fn set(&mut self, id: ParamId, value: Tensor<T>) -> Result<()> {
        let e = &self.layout.entries[id.0];
        if value.shape() != e.shape.as_slice() {
            return Err(WorkerError::invalid(
                &e.name,
                format!("expected shape {:?}, got {:?}", e.shape, value.shape()),
            ));
        }
        self.tensors[id.0] = value;
        self.operands[id.0] = OnceLock::new();
        Ok(())
    }

    /// Frees a parameter this replica does not hold (another rank's routed expert): its tensor
    /// becomes empty, and so does its gradient buffer in [`Self::zero_grads`]. Using it is an
    /// error of shape.
    pub fn release(&mut self, id: ParamId) {
        self.tensors[id.0] = Tensor::zeros(vec![0]);
        self.operands[id.0] = OnceLock::new();
    }

    /// The parameter's declared shape (also for one this replica does not hold).
    pub fn layout_shape(&self, id: ParamId) -> Vec<usize> {
        self.layout.entries[id.0].shape.clone()
    }

    /// Whether this replica holds the parameter's values (see [`Self::release`]).
    pub fn holds(&self, id: ParamId) -> bool {
        self.tensors[id.0].shape() == self.layout.entries[id.0].shape.as_slice()
    }

    /// Looks a parameter up by name.
    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.layout
            .entries
            .iter()
            .position(|e| e.name == name)
            .map(ParamId)
    }

    /// Converts every tensor to another element type.
    pub fn cast<U: Real>(&self) -> ParamStore<U> {
        ParamStore {
            layout: self.layout.clone(),
            tensors: self.tensors.iter().map(Tensor::cast).collect(),
            operands: fresh(self.tensors.len()),
        }
    }

    /// Zero gradients shaped like the parameters.
    pub fn zero_grads(&self) -> Grads<T> {
        Grads {
            tensors: self
                .tensors
                .iter()
                .map(|t| Tensor::zeros(t.shape().to_vec()))
                .collect(),
        }
    }
}

/// A standard normal draw (Box-Muller; deterministic for a seeded generator).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Gradients, one tensor per parameter, accumulated by the W passes.
#[derive(Clone, Debug)]
pub struct Grads<T> {
    tensors: Vec<Tensor<T>>,
}

impl<T: Real> Grads<T> {
    /// Adds `g` into the gradient of `id`.
    pub fn add(&mut self, id: ParamId, g: &Tensor<T>) -> Result<()> {
        self.tensors[id.0].add_assign(g, "gradient")?;
        Ok(())
    }

    /// The gradient of `id`.
    pub fn get(&self, id: ParamId) -> &Tensor<T> {
        &self.tensors[id.0]
    }

    /// The gradient of `id`, mutably (for in-place accumulation by GEMMs).
    pub fn get_mut(&mut self, id: ParamId) -> &mut Tensor<T> {
        &mut self.tensors[id.0]
    }

    /// Sets every gradient to zero.
    pub fn zero(&mut self) {
        for t in &mut self.tensors {
            t.data_mut().fill(T::zero());
        }
    }

    /// All gradients in parameter order.
    pub fn tensors_mut(&mut self) -> &mut [Tensor<T>] {
        &mut self.tensors
    }

    /// All gradients in parameter order.
    pub fn tensors(&self) -> &[Tensor<T>] {
        &self.tensors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (ParamStore<f32>, ParamId) {
        let mut layout = Layout::default();
        let id = layout.add("w".into(), vec![2, 3], Init::Normal(1.0), Trainable::Yes);
        (ParamStore::init(layout, 7).unwrap(), id)
    }

    fn rounded(p: &ParamStore<f32>, id: ParamId) -> Vec<f32> {
        let op = p
            .operand(id, true, |w| {
                Ok(WeightOperand::Bf16(shoal_kernels::matmul::rounded_bf16(w)))
            })
            .unwrap();
        match op.as_ref() {
            WeightOperand::Bf16(t) => t.data().to_vec(),
            WeightOperand::Fp8 { .. } => panic!("bf16 asked for"),
        }
    }

    #[test]
    fn weight_operands_are_rebuilt_after_every_change() {
        let (mut p, id) = store();
        let first = rounded(&p, id);
        // Cached: a builder that would give other values is not called.
        let again = p.operand(id, true, |_| Ok(WeightOperand::Bf16(Tensor::zeros([2, 3]))));
        match again.unwrap().as_ref() {
            WeightOperand::Bf16(t) => assert_eq!(t.data(), first.as_slice()),
            WeightOperand::Fp8 { .. } => panic!("bf16 asked for"),
        }
        p.get_mut(id).data_mut()[0] = 3.0;
        assert_eq!(rounded(&p, id)[0], 3.0);
        p.set(id, Tensor::full([2, 3], 5.0)).unwrap();
        assert_eq!(rounded(&p, id), vec![5.0; 6]);
        // An operand of the other kind is built without touching the cache.
        let fp8 = p.operand(id, false, |_| Err(WorkerError::invalid("w", "fp8 built")));
        assert!(fp8.unwrap_err().to_string().contains("fp8 built"));
        assert_eq!(rounded(&p, id), vec![5.0; 6]);
    }
}
