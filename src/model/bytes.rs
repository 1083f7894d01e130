//! The bytes of a model file: a read-only memory map of a file on disk, or bytes already in memory
//! (what the fuzz targets and tests hand the parsers, so they run the loaders' own code).

/// A file's contents, mapped or owned.
pub enum FileBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Maps `file` read-only.
    pub fn map(file: &std::fs::File) -> std::io::Result<Self> {
        // SAFETY: the map is read-only; files are not expected to change while loaded.
        Ok(FileBytes::Mapped(unsafe { memmap2::Mmap::map(file)? }))
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}
