//! Token sources: where tokens come from, read and checked against the vocabulary.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::synthetic;
use crate::{Result, WorkerError};

/// The default length, in tokens, of the synthetic corpus (4 Mi tokens).
pub const DEFAULT_SYNTHETIC_TOKENS: usize = 4 << 20;

/// The element type of a token file: little-endian `u16` or `u32` ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Two bytes a token, little-endian; ids below 65536.
    U16,
    /// Four bytes a token, little-endian.
    U32,
}

impl TokenDtype {
    /// Bytes per token.
    pub fn bytes(self) -> usize {
        match self {
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }
}

impl fmt::Display for TokenDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::U16 => "u16",
            Self::U32 => "u32",
        })
    }
}

impl FromStr for TokenDtype {
    type Err = WorkerError;

    /// Parses `u16` or `u32` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "u16" => Ok(Self::U16),
            "u32" => Ok(Self::U32),
            _ => Err(WorkerError::invalid(
                "token dtype",
                format!("expected u16 or u32, got {s:?}"),
            )),
        }
    }
}

/// Where training tokens come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSpec {
    /// The built-in seeded corpus of [`synthetic`](super::synthetic), `tokens` long.
    Synthetic {
        /// Seed of the generator: the same seed (and vocabulary) gives the same corpus.
        seed: u64,
        /// Length of the corpus in tokens.
        tokens: usize,
    },
    /// A flat file of little-endian token ids.
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Its element type.
        dtype: TokenDtype,
    },
    /// A file read as raw bytes, one token per byte.
    TextFile {
        /// The file.
        path: PathBuf,
    },
}

impl DataSpec {
    /// The synthetic corpus of `seed` at its default length, [`DEFAULT_SYNTHETIC_TOKENS`].
    pub fn synthetic(seed: u64) -> Self {
        Self::Synthetic {
            seed,
            tokens: DEFAULT_SYNTHETIC_TOKENS,
        }
    }

    /// A file source chosen by extension: a `.bin` file is a [`DataSpec::TokenFile`] of `dtype`,
    /// anything else a [`DataSpec::TextFile`].
    pub fn from_path(path: impl Into<PathBuf>, dtype: TokenDtype) -> Self {
        let path = path.into();
        let is_bin = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("bin"));
        if is_bin {
            Self::TokenFile { path, dtype }
        } else {
            Self::TextFile { path }
        }
    }
}

/// Token ids stored at their source's own width.
#[derive(Debug, Clone)]
enum Tokens {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
}

/// A token element as stored in a file.
trait Word: Copy {
    const BYTES: usize;
    /// Decodes one element from exactly `BYTES` little-endian bytes.
    fn from_le(bytes: &[u8]) -> Self;
    fn id(self) -> u32;
}

impl Word for u8 {
    const BYTES: usize = 1;
    fn from_le(bytes: &[u8]) -> Self {
        bytes[0]
    }
    fn id(self) -> u32 {
        u32::from(self)
    }
}

impl Word for u16 {
    const BYTES: usize = 2;
    fn from_le(bytes: &[u8]) -> Self {
        u16::from_le_bytes([bytes[0], bytes[1]])
    }
    fn id(self) -> u32 {
        u32::from(self)
    }
}

impl Word for u32 {
    const BYTES: usize = 4;
    fn from_le(bytes: &[u8]) -> Self {
        u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
    fn id(self) -> u32 {
        self
    }
}

/// A loaded, checked sequence of token ids, every one below the vocabulary size.
#[derive(Debug, Clone)]
pub struct TokenSource {
    name: String,
    vocab: usize,
    tokens: Tokens,
}

impl TokenSource {
    /// Loads `spec`, checking that every token id is below `vocab`.
    ///
    /// Errors: `vocab` zero; a synthetic or text source with `vocab` below 256; a file that cannot
    /// be read; a token file whose size is not a multiple of its element size; an id at or above
    /// `vocab` (naming the file, position and id).
    pub fn load(spec: &DataSpec, vocab: usize) -> Result<Self> {
        if vocab == 0 {
            return Err(WorkerError::invalid("vocab", "must be positive"));
        }
        match spec {
            DataSpec::Synthetic { seed, tokens } => {
                let ids = synthetic::generate(*seed, *tokens, vocab)?;
                Ok(Self {
                    name: "synthetic".to_string(),
                    vocab,
                    tokens: Tokens::U32(ids),
                })
            }
            DataSpec::TokenFile { path, dtype } => {
                let tokens = match dtype {
                    TokenDtype::U16 => Tokens::U16(read_words(path, *dtype, vocab)?),
                    TokenDtype::U32 => Tokens::U32(read_words(path, *dtype, vocab)?),
                };
                Ok(Self {
                    name: path.display().to_string(),
                    vocab,
                    tokens,
                })
            }
            DataSpec::TextFile { path } => {
                if vocab < 256 {
                    return Err(WorkerError::data(
                        path.display(),
                        format!(
                            "text is read as bytes and needs a vocabulary of at least 256 tokens, \
                             got {vocab}"
                        ),
                    ));
                }
                let bytes = std::fs::read(path).map_err(|e| WorkerError::io(path, e))?;
                Ok(Self {
                    name: path.display().to_string(),
                    vocab,
                    tokens: Tokens::U8(bytes),
                })
            }
        }
    }

    /// A source over ids already in memory, named `name` in errors; every id must be below
    /// `vocab`.
    pub fn from_tokens(name: impl Into<String>, tokens: Vec<u32>, vocab: usize) -> Result<Self> {
        let name = name.into();
        if vocab == 0 {
            return Err(WorkerError::invalid("vocab", "must be positive"));
        }
        if let Some((pos, &id)) = tokens
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= vocab)
        {
            return Err(WorkerError::data(
                name,
                format!("token id {id} at position {pos} is not below the vocabulary size {vocab}"),
            ));
        }
        Ok(Self {
            name,
            vocab,
            tokens: Tokens::U32(tokens),
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        match &self.tokens {
            Tokens::U8(t) => t.len(),
            Tokens::U16(t) => t.len(),
            Tokens::U32(t) => t.len(),
        }
    }

    /// Whether the source holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The source's name in messages: the file path, or `synthetic`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The vocabulary size the ids were checked against.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The id at position `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<u32> {
        match &self.tokens {
            Tokens::U8(t) => t.get(i).map(|&x| x.id()),
            Tokens::U16(t) => t.get(i).map(|&x| x.id()),
            Tokens::U32(t) => t.get(i).copied(),
        }
    }

    /// The ids in `range`, or `None` if it reaches past the end (or is reversed).
    pub fn tokens(&self, range: Range<usize>) -> Option<Vec<u32>> {
        fn widen<T: Word>(t: &[T], range: Range<usize>) -> Option<Vec<u32>> {
            t.get(range).map(|s| s.iter().map(|x| x.id()).collect())
        }
        match &self.tokens {
            Tokens::U8(t) => widen(t, range),
            Tokens::U16(t) => widen(t, range),
            Tokens::U32(t) => t.get(range).map(<[u32]>::to_vec),
        }
    }

    /// Appends the ids in `range` to `out`; `range` must lie within the source.
    pub(crate) fn extend_into(&self, range: Range<usize>, out: &mut Vec<u32>) {
        match &self.tokens {
            Tokens::U8(t) => out.extend(t[range].iter().map(|x| x.id())),
            Tokens::U16(t) => out.extend(t[range].iter().map(|x| x.id())),
            Tokens::U32(t) => out.extend_from_slice(&t[range]),
        }
    }
}

/// Reads a flat little-endian file of `T`, checking every id against `vocab`.
fn read_words<T: Word>(path: &Path, dtype: TokenDtype, vocab: usize) -> Result<Vec<T>> {
    debug_assert_eq!(T::BYTES, dtype.bytes());
    let io = |e: std::io::Error| WorkerError::io(path, e);
    let mut file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let width = T::BYTES as u64;
    if size % width != 0 {
        return Err(WorkerError::data(
            path.display(),
            format!("size {size} bytes is not a multiple of {width} bytes ({dtype} tokens)"),
        ));
    }
    let count = usize::try_from(size / width).map_err(|_| {
        WorkerError::data(
            path.display(),
            format!("{} tokens are too many for this platform", size / width),
        )
    })?;
    let mut out: Vec<T> = Vec::new();
    out.try_reserve_exact(count).map_err(|e| {
        WorkerError::data(
            path.display(),
            format!("cannot allocate {count} tokens: {e}"),
        )
    })?;

    const CHUNK_TOKENS: usize = 1 << 18;
    let mut buf = vec![0u8; CHUNK_TOKENS * T::BYTES];
    while out.len() < count {
        let take = (count - out.len()).min(CHUNK_TOKENS);
        let bytes = &mut buf[..take * T::BYTES];
        file.read_exact(bytes).map_err(io)?;
        for chunk in bytes.chunks_exact(T::BYTES) {
            let word = T::from_le(chunk);
            let id = word.id();
            if id as usize >= vocab {
                let pos = out.len();
                return Err(WorkerError::data(
                    path.display(),
                    format!(
                        "token id {id} at position {pos} (byte offset {}) is not below the \
                         vocabulary size {vocab}",
                        pos * T::BYTES
                    ),
                ));
            }
            out.push(word);
        }
    }
    Ok(out)
}
