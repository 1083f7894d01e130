//! The CPU reference path: the same math as the CUDA engine, in plain Rust, generic over f32/f64.
pub mod attention;
pub mod blockwise;
pub mod decode;
pub mod init;
pub mod layers;
pub mod model;
pub use crate::real;
pub mod testing;
