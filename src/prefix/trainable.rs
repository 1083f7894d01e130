//! What a training run trains: the prefix bank itself, or Li & Liang's reparameterization of it
//! (an MLP whose output is the bank), with the flat parameter order the optimizer and the
//! checkpoints use.

use super::{PrefixBank, Reparam};

/// What is trained: the prefix itself, or Li & Liang's reparameterization of it.
#[derive(Clone, Debug)]
pub enum Trainable {
    Bank(PrefixBank<f32>),
    Reparam(Reparam<f32>),
}

impl Trainable {
    /// The flat parameter vector (optimizer order).
    pub fn to_flat(&self) -> Vec<f32> {
        match self {
            Trainable::Bank(b) => b.to_flat(),
            Trainable::Reparam(r) => r.to_flat(),
        }
    }
    pub fn copy_from_flat(&mut self, flat: &[f32]) {
        match self {
            Trainable::Bank(b) => b.copy_from_flat(flat),
            Trainable::Reparam(r) => r.copy_from_flat(flat),
        }
    }
    pub fn n_params(&self) -> usize {
        match self {
            Trainable::Bank(b) => b.n_params(),
            Trainable::Reparam(r) => r.n_params(),
        }
    }
    /// The prefix the model sees (the reparameterization's output, on the host).
    pub fn prefix(&self) -> PrefixBank<f32> {
        match self {
            Trainable::Bank(b) => b.clone(),
            Trainable::Reparam(r) => r.fold(),
        }
    }
}
