//! GGUF files (llama.cpp's format), parsed by hand with checked reads, and the Llama weights in them.
//!
//! Layout: magic `GGUF`, version (2 or 3), tensor count, metadata count (u64 each), the metadata
//! key/value pairs, the tensor infos (name, dims fastest-first, ggml type, offset), padding to
//! `general.alignment` (default 32), then the tensor data. Every count, length, dimension and offset
//! is checked against the bytes that remain before anything is allocated, arithmetic is
//! overflow-checked, and every error names the file and what is wrong.
//!
//! Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1 (ggml block formats, 32 values a block).
//! The llama.cpp converter permutes the rows of `attn_q` / `attn_k` for interleaved RoPE; the loader
//! undoes it so the weights follow HF's rotate-half layout (see [`unpermute_rope_rows`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;

use super::bytes::FileBytes;
use super::config::{Arch, LayerWeights, ModelConfig, ModelWeights};

/// `GGUF` read as a little-endian u32.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of arrays accepted (real files use 1).
const MAX_ARRAY_DEPTH: u32 = 8;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;

/// Metadata value type ids.
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(GgufArray),
}

/// A metadata array, stored by element type.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    Array(Vec<GgufArray>),
}

impl GgufValue {
    /// A non-negative integer of any integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// A float (or an integer read as a float).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::Str(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
            GgufArray::Array(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn as_strs(&self) -> Option<&[String]> {
        match self {
            GgufArray::Str(v) => Some(v),
            _ => None,
        }
    }
    /// An integer array of any integer element type, as i64.
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        Some(match self {
            GgufArray::U8(v) => v.iter().map(|&x| x.into()).collect(),
            GgufArray::I8(v) => v.iter().map(|&x| x.into()).collect(),
            GgufArray::U16(v) => v.iter().map(|&x| x.into()).collect(),
            GgufArray::I16(v) => v.iter().map(|&x| x.into()).collect(),
            GgufArray::U32(v) => v.iter().map(|&x| x.into()).collect(),
            GgufArray::I32(v) => v.iter().map(|&x| x.into()).collect(),
            GgufArray::I64(v) => v.clone(),
            GgufArray::U64(v) => v
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<_>>()?,
            _ => return None,
        })
    }
}

/// A ggml tensor type: id, name and block geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    /// Values per block.
    pub block_elems: u64,
    /// Bytes per block.
    pub block_bytes: u64,
}

impl GgmlType {
    /// The type with this id, if ggml defines it (supported for dequantization or not).
    pub fn from_id(id: u32) -> Option<Self> {
        let (name, block_elems, block_bytes) = match id {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 36),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            30 => ("BF16", 1, 2),
            _ => return None,
        };
        Some(GgmlType {
            id,
            name,
            block_elems,
            block_bytes,
        })
    }

    /// Whether [`dequantize`] handles this type.
    pub fn is_supported(&self) -> bool {
        matches!(self.id, 0 | 1 | 2 | 3 | 8 | 30)
    }
}

/// One tensor's description from the header.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions fastest-first, as the file lists them (`dims[0]` is the number of columns).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Absolute byte range in the file (checked to lie inside it).
    pub start: usize,
    pub n_bytes: usize,
    pub n_elements: usize,
}

impl GgufTensorInfo {
    /// Row-major shape, slowest-first (PyTorch order): the reverse of `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// The parsed header of a GGUF file.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
}

/// Checked little-endian reader over the file's bytes; its errors name the file and the offset.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Reader<'a> {
    fn fail(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{}: malformed GGUF: {msg} (at byte offset {})",
            self.file,
            self.pos
        )
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let rem = self.remaining();
        let n_us = usize::try_from(n)
            .ok()
            .filter(|&n| n <= rem)
            .ok_or_else(|| {
                self.fail(format_args!(
                    "file truncated reading {what}: needs {n} bytes, {rem} left"
                ))
            })?;
        let s = &self.buf[self.pos..self.pos + n_us];
        self.pos += n_us;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(&format!("length of {what}"))?;
        if len > self.remaining() as u64 {
            return Err(self.fail(format_args!(
                "length {len} of {what} exceeds the {} bytes left in the file",
                self.remaining()
            )));
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.fail(format_args!("{what} is not valid UTF-8")))
    }

    /// The smallest number of bytes an element of this type can occupy.
    fn min_size(&self, ty: u32, what: &str) -> Result<u64> {
        Ok(match ty {
            vt::U8 | vt::I8 | vt::BOOL => 1,
            vt::U16 | vt::I16 => 2,
            vt::U32 | vt::I32 | vt::F32 => 4,
            vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
            vt::ARRAY => 12,
            _ => return Err(self.fail(format_args!("unknown metadata value type {ty} in {what}"))),
        })
    }

    fn scalars<const N: usize, T>(
        &mut self,
        count: u64,
        what: &str,
        f: impl Fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        let n_bytes = count
            .checked_mul(N as u64)
            .ok_or_else(|| self.fail(format_args!("array count {count} of {what} overflows")))?;
        let bytes = self.take(n_bytes, what)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect())
    }

    fn bool(&self, b: u8, what: &str) -> Result<bool> {
        match b {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.fail(format_args!("{what}: invalid bool byte {b}"))),
        }
    }

    fn value(&mut self, ty: u32, what: &str) -> Result<GgufValue> {
        Ok(match ty {
            vt::U8 => GgufValue::U8(self.arr::<1>(what)?[0]),
            vt::I8 => GgufValue::I8(self.arr::<1>(what)?[0] as i8),
            vt::U16 => GgufValue::U16(u16::from_le_bytes(self.arr(what)?)),
            vt::I16 => GgufValue::I16(i16::from_le_bytes(self.arr(what)?)),
            vt::U32 => GgufValue::U32(u32::from_le_bytes(self.arr(what)?)),
            vt::I32 => GgufValue::I32(i32::from_le_bytes(self.arr(what)?)),
            vt::F32 => GgufValue::F32(f32::from_le_bytes(self.arr(what)?)),
            vt::U64 => GgufValue::U64(u64::from_le_bytes(self.arr(what)?)),
            vt::I64 => GgufValue::I64(i64::from_le_bytes(self.arr(what)?)),
            vt::F64 => GgufValue::F64(f64::from_le_bytes(self.arr(what)?)),
            vt::BOOL => {
                let b = self.arr::<1>(what)?[0];
                GgufValue::Bool(self.bool(b, what)?)
            }
            vt::STRING => GgufValue::Str(self.string(what)?),
            vt::ARRAY => GgufValue::Array(self.array(what, 1)?),
            _ => return Err(self.fail(format_args!("unknown metadata value type {ty} for {what}"))),
        })
    }

    /// An array body: element type, count, elements.
    fn array(&mut self, what: &str, depth: u32) -> Result<GgufArray> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(self.fail(format_args!(
                "arrays nested deeper than {MAX_ARRAY_DEPTH} in {what}"
            )));
        }
        let ety = self.u32(&format!("element type of {what}"))?;
        let count = self.u64(&format!("element count of {what}"))?;
        let min = self.min_size(ety, what)?;
        if count > self.remaining() as u64 / min {
            return Err(self.fail(format_args!(
                "{what}: array of {count} elements cannot fit in the {} bytes left in the file",
                self.remaining()
            )));
        }
        Ok(match ety {
            vt::U8 => GgufArray::U8(self.scalars(count, what, |a: [u8; 1]| a[0])?),
            vt::I8 => GgufArray::I8(self.scalars(count, what, |a: [u8; 1]| a[0] as i8)?),
            vt::U16 => GgufArray::U16(self.scalars(count, what, u16::from_le_bytes)?),
            vt::I16 => GgufArray::I16(self.scalars(count, what, i16::from_le_bytes)?),
            vt::U32 => GgufArray::U32(self.scalars(count, what, u32::from_le_bytes)?),
            vt::I32 => GgufArray::I32(self.scalars(count, what, i32::from_le_bytes)?),
            vt::F32 => GgufArray::F32(self.scalars(count, what, f32::from_le_bytes)?),
            vt::U64 => GgufArray::U64(self.scalars(count, what, u64::from_le_bytes)?),
            vt::I64 => GgufArray::I64(self.scalars(count, what, i64::from_le_bytes)?),
            vt::F64 => GgufArray::F64(self.scalars(count, what, f64::from_le_bytes)?),
            vt::BOOL => {
                let raw = self.scalars(count, what, |a: [u8; 1]| a[0])?;
                GgufArray::Bool(
                    raw.into_iter()
                        .map(|b| self.bool(b, what))
                        .collect::<Result<_>>()?,
                )
            }
            vt::STRING => {
                let mut v = Vec::new();
                for _ in 0..count {
                    v.push(self.string(what)?);
                }
                GgufArray::Str(v)
            }
            vt::ARRAY => {
                let mut v = Vec::new();
                for _ in 0..count {
                    v.push(self.array(what, depth + 1)?);
                }
                GgufArray::Array(v)
            }
            _ => unreachable!("min_size rejected unknown types"),
        })
    }
}

/// Parse the header of a GGUF file held in `buf`; `file` names it in errors.
pub fn parse_header(buf: &[u8], file: &str) -> Result<GgufHeader> {
    let mut r = Reader { buf, pos: 0, file };
    let magic = r.arr::<4>("magic")?;
    if &magic != GGUF_MAGIC {
        return Err(anyhow!(
            "{file}: not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")"
        ));
    }
    let version = r.u32("version")?;
    if version != 2 && version != 3 {
        return Err(r.fail(format_args!(
            "unsupported GGUF version {version} (supported: 2, 3)"
        )));
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;
    // A key/value pair takes at least 8 (key length) + 4 (type) + 1 bytes.
    if n_kv > r.remaining() as u64 / 13 {
        return Err(r.fail(format_args!(
            "metadata count {n_kv} cannot fit in the {} bytes left in the file",
            r.remaining()
        )));
    }
    let mut metadata = Vec::new();
    let mut meta_index = HashMap::new();
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key #{i}"))?;
        let ty = r.u32(&format!("type of metadata '{key}'"))?;
        let value = r.value(ty, &format!("metadata '{key}'"))?;
        if meta_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(r.fail(format_args!("duplicate metadata key '{key}'")));
        }
        metadata.push((key, value));
    }

    let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 30 => a,
            _ => {
                return Err(r.fail(format_args!(
                    "general.alignment {v:?} is not a power of two"
                )))
            }
        },
    };

    // A tensor info takes at least 8 (name length) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset).
    if n_tensors > r.remaining() as u64 / 32 {
        return Err(r.fail(format_args!(
            "tensor count {n_tensors} cannot fit in the {} bytes left in the file",
            r.remaining()
        )));
    }
    struct Raw {
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
        offset: u64,
        n_elements: u64,
        n_bytes: u64,
    }
    let mut raws = Vec::new();
    let mut tensor_index = HashMap::new();
    for i in 0..n_tensors {
        let name = r.string(&format!("name of tensor #{i}"))?;
        let n_dims = r.u32(&format!("n_dims of tensor '{name}'"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.fail(format_args!(
                "tensor '{name}' has {n_dims} dimensions (allowed 1..={MAX_DIMS})"
            )));
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            dims.push(r.u64(&format!("dims of tensor '{name}'"))?);
        }
        let ty_id = r.u32(&format!("type of tensor '{name}'"))?;
        let ty = GgmlType::from_id(ty_id).ok_or_else(|| {
            r.fail(format_args!(
                "tensor '{name}' has unknown tensor type id {ty_id}"
            ))
        })?;
        let offset = r.u64(&format!("offset of tensor '{name}'"))?;
        let n_elements = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| {
                r.fail(format_args!(
                    "tensor '{name}': element count of dims {dims:?} overflows"
                ))
            })?;
        if dims[0] % ty.block_elems != 0 {
            return Err(r.fail(format_args!(
                "tensor '{name}': row length {} is not a multiple of the {} block size {}",
                dims[0], ty.name, ty.block_elems
            )));
        }
        let n_bytes = (n_elements / ty.block_elems)
            .checked_mul(ty.block_bytes)
            .ok_or_else(|| r.fail(format_args!("tensor '{name}': byte size overflows")))?;
        if offset % alignment != 0 {
            return Err(r.fail(format_args!(
                "tensor '{name}': offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if tensor_index.insert(name.clone(), raws.len()).is_some() {
            return Err(r.fail(format_args!("duplicate tensor name '{name}'")));
        }
        raws.push(Raw {
            name,
            dims,
            ty,
            offset,
            n_elements,
            n_bytes,
        });
    }

    let pos = r.pos as u64;
    let data_offset = pos
        .checked_add(alignment - 1)
        .map(|p| p / alignment * alignment)
        .ok_or_else(|| r.fail("data offset overflows"))?;
    let file_len = buf.len() as u64;
    let mut tensors = Vec::with_capacity(raws.len());
    for t in raws {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(anyhow!(
                    "{file}: malformed GGUF: data of tensor '{}' ({} bytes at offset {} past the data start {data_offset}) lies beyond the end of the file ({file_len} bytes)",
                    t.name,
                    t.n_bytes,
                    t.offset
                ))
            }
        }
        // Both fit in the file, hence in usize.
        tensors.push(GgufTensorInfo {
            start: (data_offset + t.offset) as usize,
            n_bytes: t.n_bytes as usize,
            n_elements: t.n_elements as usize,
            name: t.name,
            dims: t.dims,
            ty: t.ty,
            offset: t.offset,
        });
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        meta_index,
        tensor_index,
    })
}

/// Values per chunk handed to one rayon task when dequantizing.
const PAR_CHUNK_BLOCKS: usize = 2048;

/// Dequantize `src` (whole blocks of type `ty`) into `dst` (`src.len() / block_bytes · block_elems` values).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    if !ty.is_supported() {
        bail!("unsupported tensor type {} (id {})", ty.name, ty.id);
    }
    let (be, bb) = (ty.block_elems as usize, ty.block_bytes as usize);
    if src.len() % bb != 0 || src.len() / bb * be != dst.len() {
        bail!(
            "{} data of {} bytes does not hold {} values",
            ty.name,
            src.len(),
            dst.len()
        );
    }
    dst.par_chunks_mut(PAR_CHUNK_BLOCKS * be)
        .zip(src.par_chunks(PAR_CHUNK_BLOCKS * bb))
        .for_each(|(d, s)| dequantize_serial(ty.id, s, d));
    Ok(())
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

fn dequantize_serial(id: u32, src: &[u8], dst: &mut [f32]) {
    match id {
        0 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        1 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        30 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        8 => {
            // Q8_0: f16 scale d, then 32 signed bytes; x = q·d.
            for (o, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (x, &q) in o.iter_mut().zip(&b[2..34]) {
                    *x = (q as i8) as f32 * d;
                }
            }
        }
        2 => {
            // Q4_0: f16 scale d, then 16 bytes; low nibbles are values 0..16, high ones 16..32; x = (q−8)·d.
            for (o, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for (j, &q) in b[2..18].iter().enumerate() {
                    o[j] = ((q & 0xF) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        3 => {
            // Q4_1: f16 scale d, f16 minimum m, then 16 bytes of nibbles as Q4_0; x = q·d + m.
            for (o, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(20)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                for (j, &q) in b[4..20].iter().enumerate() {
                    o[j] = (q & 0xF) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        _ => unreachable!("checked by dequantize"),
    }
}

/// Undo llama.cpp's RoPE permutation of Q/K rows: within each head of `head_dim` rows, the file holds
/// row `2j + i` where HF holds row `i·head_dim/2 + j` (`i ∈ {0,1}`, `j < head_dim/2`).
pub fn unpermute_rope_rows(w: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    assert_eq!(
        w.len(),
        n_heads * head_dim * cols,
        "unpermute_rope_rows: size mismatch"
    );
    assert!(head_dim % 2 == 0, "unpermute_rope_rows: odd head_dim");
    let half = head_dim / 2;
    let mut out = vec![0.0f32; w.len()];
    out.par_chunks_mut(cols).enumerate().for_each(|(row, dst)| {
        let (h, r) = (row / head_dim, row % head_dim);
        let (i, j) = (r / half, r % half);
        let src = h * head_dim + 2 * j + i;
        dst.copy_from_slice(&w[src * cols..(src + 1) * cols]);
    });
    out
}

/// An open GGUF file: its bytes (memory-mapped from disk) and its parsed header.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: GgufHeader,
    map: FileBytes,
}

impl GgufFile {
    /// Map and parse `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("opening GGUF file {}", path.display()))?;
        let map = FileBytes::map(&file).with_context(|| format!("mapping {}", path.display()))?;
        Self::from_bytes(path, map)
    }

    /// Parse a GGUF file's bytes already in memory (or mapped); `path` names it in errors.
    pub fn from_bytes(path: &Path, map: FileBytes) -> Result<Self> {
        let len = map.len();
        if len < 24 {
            bail!("{}: not a GGUF file (only {len} bytes)", path.display());
        }
        let header = parse_header(&map, &path.display().to_string())?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            header,
            map,
        })
    }

    fn file(&self) -> String {
        self.path.display().to_string()
    }

    /// Metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.header.get(key)
    }

    /// The raw bytes of a tensor (bounds checked at parse time).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        &self.map[info.start..info.start + info.n_bytes]
    }

    /// A tensor as f32 with its row-major shape (slowest-first), or `None` if absent.
    pub fn tensor_f32(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let Some(info) = self.header.tensor(name) else {
            return Ok(None);
        };
        if !info.ty.is_supported() {
            bail!(
                "{}: unsupported tensor type {} (id {}) for tensor '{name}' (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                self.file(),
                info.ty.name,
                info.ty.id
            );
        }
        let mut out = vec![0.0f32; info.n_elements];
        dequantize(info.ty, self.tensor_bytes(info), &mut out)
            .with_context(|| format!("{}: tensor '{name}'", self.file()))?;
        Ok(Some((out, info.shape())))
    }

    fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self
            .get(key)
            .ok_or_else(|| anyhow!("{}: missing metadata '{key}'", self.file()))?;
        v.as_u64().ok_or_else(|| {
            anyhow!(
                "{}: metadata '{key}' should be a non-negative integer, found {v:?}",
                self.file()
            )
        })
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                anyhow!(
                    "{}: metadata '{key}' should be a number, found {v:?}",
                    self.file()
                )
            }),
        }
    }

    /// A size from metadata as usize, bounded so later products cannot overflow.
    fn size(&self, key: &str) -> Result<usize> {
        let v = self.require_u64(key)?;
        if v == 0 || v > (1 << 32) {
            bail!("{}: metadata '{key}' = {v} is out of range", self.file());
        }
        Ok(v as usize)
    }

    /// The model configuration from `general.architecture` = llama metadata.
    pub fn llama_config(&self) -> Result<ModelConfig> {
        let file = self.file();
        let arch = self
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                anyhow!("{file}: missing or non-string metadata 'general.architecture'")
            })?;
        if arch != "llama" {
            bail!("{file}: unsupported architecture '{arch}' (supported: llama)");
        }
        let d_model = self.size("llama.embedding_length")?;
        let n_layers = self.size("llama.block_count")?;
        let n_heads = self.size("llama.attention.head_count")?;
        let n_kv_heads = match self.get("llama.attention.head_count_kv") {
            None => n_heads,
            Some(_) => self.size("llama.attention.head_count_kv")?,
        };
        let d_ff = self.size("llama.feed_forward_length")?;
        let max_positions = self.size("llama.context_length")?;
        let head_dim = match self.get("llama.attention.key_length") {
            Some(_) => self.size("llama.attention.key_length")?,
            None => {
                if d_model % n_heads != 0 {
                    bail!("{file}: embedding_length {d_model} is not a multiple of head_count {n_heads}");
                }
                d_model / n_heads
            }
        };
        if n_heads % n_kv_heads != 0 {
            bail!("{file}: head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}");
        }
        if head_dim % 2 != 0 {
            bail!("{file}: head dimension {head_dim} is odd; RoPE needs an even one");
        }
        if let Some(v) = self.get("llama.rope.dimension_count") {
            if v.as_u64() != Some(head_dim as u64) {
                bail!("{file}: partial rotary embeddings (rope.dimension_count {v:?} != head dim {head_dim}) are not supported");
            }
        }
        let vocab_size = match self.get("llama.vocab_size") {
            Some(_) => self.size("llama.vocab_size")?,
            None => {
                let t = self.header.tensor("token_embd.weight").ok_or_else(|| {
                    anyhow!("{file}: missing tensor 'token_embd.weight' (and no llama.vocab_size)")
                })?;
                t.dims.get(1).copied().unwrap_or(0) as usize
            }
        };
        let norm_eps = self
            .opt_f64("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| {
                anyhow!("{file}: missing metadata 'llama.attention.layer_norm_rms_epsilon'")
            })?;
        let rope_theta = self.opt_f64("llama.rope.freq_base")?.unwrap_or(10000.0);
        let tok_u32 = |key: &str| -> Result<Option<u32>> {
            match self.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .map(Some)
                    .ok_or_else(|| anyhow!("{file}: metadata '{key}' is not a token id: {v:?}")),
            }
        };
        let bos_token_id = tok_u32("tokenizer.ggml.bos_token_id")?;
        let mut eos_token_ids = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = tok_u32(key)? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let config = ModelConfig {
            arch: Arch::Llama,
            vocab_size,
            d_model,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff,
            max_positions,
            norm_eps,
            rope_theta,
            tied_embeddings: self.header.tensor("output.weight").is_none(),
            bos_token_id,
            eos_token_ids,
        };
        super::load::check_config_sizes(&config, &file)?;
        Ok(config)
    }

    /// Check a tensor's shape against the config before dequantizing it, then dequantize it.
    fn expect(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let file = self.file();
        let info = self
            .header
            .tensor(name)
            .ok_or_else(|| anyhow!("{file}: missing tensor '{name}'"))?;
        let found = info.shape();
        if found != shape {
            bail!("{file}: tensor '{name}' has shape {found:?} but the metadata implies {shape:?}");
        }
        Ok(self.tensor_f32(name)?.expect("present").0)
    }

    /// All Llama weights, in the layout of [`ModelWeights`] (HF rotate-half q/k rows).
    pub fn llama_weights(&self) -> Result<ModelWeights<f32>> {
        let c = self.llama_config()?;
        let (d, q, kv, ff) = (c.d_model, c.q_dim(), c.kv_dim(), c.d_ff);
        let tok_emb = self.expect("token_embd.weight", &[c.vocab_size, d])?;
        let layers = (0..c.n_layers)
            .map(|i| -> Result<LayerWeights<f32>> {
                let p = format!("blk.{i}.");
                let wq = self.expect(&format!("{p}attn_q.weight"), &[q, d])?;
                let wk = self.expect(&format!("{p}attn_k.weight"), &[kv, d])?;
                Ok(LayerWeights {
                    attn_norm_w: self.expect(&format!("{p}attn_norm.weight"), &[d])?,
                    attn_norm_b: None,
                    wq: unpermute_rope_rows(&wq, c.n_heads, c.head_dim, d),
                    wk: unpermute_rope_rows(&wk, c.n_kv_heads, c.head_dim, d),
                    wv: self.expect(&format!("{p}attn_v.weight"), &[kv, d])?,
                    bq: None,
                    bk: None,
                    bv: None,
                    wo: self.expect(&format!("{p}attn_output.weight"), &[d, q])?,
                    bo: None,
                    mlp_norm_w: self.expect(&format!("{p}ffn_norm.weight"), &[d])?,
                    mlp_norm_b: None,
                    w_in: self.expect(&format!("{p}ffn_gate.weight"), &[ff, d])?,
                    b_in: None,
                    w_up: Some(self.expect(&format!("{p}ffn_up.weight"), &[ff, d])?),
                    w_out: self.expect(&format!("{p}ffn_down.weight"), &[d, ff])?,
                    b_out: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm_w = self.expect("output_norm.weight", &[d])?;
        let lm_head = if c.tied_embeddings {
            None
        } else {
            Some(self.expect("output.weight", &[c.vocab_size, d])?)
        };
        Ok(ModelWeights {
            config: c,
            tok_emb,
            pos_emb: None,
            layers,
            final_norm_w,
            final_norm_b: None,
            lm_head,
        })
    }
}
