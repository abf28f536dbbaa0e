//! Weight files: safetensors, and PyTorch's zip checkpoints (`.ckpt`, `.pt`, `.bin`) through
//! a reader that runs no code ([`crate::torch_file`]); memory-mapped, listed from their header or
//! index, read one tensor at a time.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use burn_backend::{DType as BDType, TensorData};
use ferrite_plugin_api::{DType, abi::WeightInfo};
use memmap2::Mmap;
use safetensors::{Dtype as SDtype, SafeTensors};

use super::RtResult;
use super::table::{from_burn_dtype, to_burn_dtype};
use crate::torch_file::{self, TorchTensor};

pub struct WeightFile {
    pub path: String,
    mmap: Mmap,
    /// A torch checkpoint's tensors (None: a safetensors file).
    torch: Option<BTreeMap<String, TorchTensor>>,
}

fn st_dtype(d: SDtype) -> Option<DType> {
    Some(match d {
        SDtype::F32 => DType::F32,
        SDtype::F16 => DType::F16,
        SDtype::BF16 => DType::BF16,
        SDtype::F64 => DType::F64,
        SDtype::I64 => DType::I64,
        SDtype::I32 => DType::I32,
        SDtype::U8 => DType::U8,
        SDtype::BOOL => DType::Bool,
        SDtype::F8_E4M3 => DType::F8E4M3,
        SDtype::F8_E5M2 => DType::F8E5M2,
        _ => return None,
    })
}

fn burn_dtype(d: SDtype) -> Option<BDType> {
    Some(match d {
        SDtype::F32 => BDType::F32,
        SDtype::F16 => BDType::F16,
        SDtype::BF16 => BDType::BF16,
        SDtype::F64 => BDType::F64,
        SDtype::I64 => BDType::I64,
        SDtype::I32 => BDType::I32,
        SDtype::U8 => BDType::U8,
        _ => return None,
    })
}

impl WeightFile {
    pub fn open(path: &str) -> RtResult<Self> {
        let file = File::open(path).map_err(|e| format!("cannot open weights file {path}: {e}"))?;
        // Safety: the map is read-only; a file truncated under us is the same hazard every
        // safetensors reader accepts.
        let mmap = unsafe { Mmap::map(&file) }
            .map_err(|e| format!("cannot map weights file {path}: {e}"))?;
        if torch_file::is_zip(&mmap) {
            let index = torch_file::index(&mmap).map_err(|e| format!("{path}: {e}"))?;
            return Ok(Self {
                path: path.to_string(),
                mmap,
                torch: Some(index),
            });
        }
        if let Err(e) = SafeTensors::read_metadata(&mmap) {
            // torch's format before 1.6 opens with a pickled magic number (a safetensors header
            // may start with the same bytes, hence only once it is not one).
            if torch_file::is_legacy(&mmap) {
                let index = torch_file::legacy_index(&mmap).map_err(|e| format!("{path}: {e}"))?;
                return Ok(Self {
                    path: path.to_string(),
                    mmap,
                    torch: Some(index),
                });
            }
            return Err(if mmap.get(257..262) == Some(b"ustar") {
                format!(
                    "{path} is a tar archive (torch 0.x saved checkpoints so), which Ferrite does \
                     not read: load it and save it again with a current torch"
                )
            } else if mmap.starts_with(&[0x80]) {
                format!(
                    "{path} is a pickle, not a PyTorch checkpoint (no torch magic number, no zip \
                     archive): nothing in it is read or run"
                )
            } else {
                format!("{path} is not a valid safetensors file: {e}")
            });
        }
        Ok(Self {
            path: path.to_string(),
            mmap,
            torch: None,
        })
    }

    fn tensors(&self) -> RtResult<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| format!("{}: {e}", self.path))
    }

    pub fn infos(&self) -> RtResult<Vec<WeightInfo>> {
        if let Some(t) = &self.torch {
            return Ok(t.iter().map(|(k, v)| v.info(k)).collect());
        }
        let st = self.tensors()?;
        let mut out: Vec<WeightInfo> = st
            .iter()
            .filter_map(|(k, v)| {
                Some(WeightInfo {
                    key: k.into(),
                    dtype: st_dtype(v.dtype())?,
                    shape: v.shape().iter().map(|&d| d as u64).collect(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    pub fn metadata(&self) -> RtResult<Vec<(String, String)>> {
        if self.torch.is_some() {
            return Ok(Vec::new());
        }
        let (_, meta) =
            SafeTensors::read_metadata(&self.mmap).map_err(|e| format!("{}: {e}", self.path))?;
        let mut m: Vec<(String, String)> = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        m.sort();
        Ok(m)
    }

    /// Drops the mapped pages of `bytes` (a range of the map, copied out) from this process's
    /// memory, so that loading a model holds what it made of each tensor, not the file too
    /// (file pages read through the map count as the process's resident memory).
    fn release_pages(&self, bytes: &[u8]) {
        #[cfg(unix)]
        {
            let offset = bytes.as_ptr() as usize - self.mmap.as_ptr() as usize;
            // SAFETY: the map is a read-only shared mapping of a file: dropped pages are read
            // again from the file on the next access, with the same bytes. Failure (an old
            // kernel) only leaves the pages mapped.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    offset,
                    bytes.len(),
                )
            };
        }
        #[cfg(not(unix))]
        let _ = bytes;
    }

    /// Copies one tensor's bytes out of the map, converted to `dtype`.
    pub fn read(&self, key: &str, dtype: BDType) -> RtResult<TensorData> {
        let data = match &self.torch {
            Some(t) => self.read_torch(t, key)?,
            None => self.read_safetensors(key)?,
        };
        Ok(if data.dtype == dtype {
            data
        } else {
            data.convert_dtype(dtype)
        })
    }

    /// One tensor of a torch checkpoint, gathered through its strides.
    fn read_torch(&self, t: &BTreeMap<String, TorchTensor>, key: &str) -> RtResult<TensorData> {
        let t = t
            .get(key)
            .ok_or_else(|| format!("{} has no tensor `{key}`", self.path))?;
        let src =
            to_burn_dtype(t.dtype).map_err(|e| format!("{}: tensor `{key}`: {e}", self.path))?;
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let data = TensorData::from_bytes_vec(t.bytes(&self.mmap), shape, src);
        self.release_pages(&self.mmap[t.storage()]);
        Ok(data)
    }

    /// One tensor's bytes as stored (float8 read as f32).
    fn read_safetensors(&self, key: &str) -> RtResult<TensorData> {
        let st = self.tensors()?;
        let view = st
            .tensor(key)
            .map_err(|_| format!("{} has no tensor `{key}`", self.path))?;
        let bytes = view.data();
        let shape = view.shape().to_vec();
        // Float8 files (`flux1-dev-fp8`, `t5xxl_fp8_e4m3fn`): burn has no float8 data, so the
        // codes are read as f32 (exact).
        let float8: Option<fn(u8) -> f32> = match view.dtype() {
            SDtype::F8_E4M3 => Some(|b| float8::F8E4M3::from_bits(b).to_f32()),
            SDtype::F8_E5M2 => Some(|b| float8::F8E5M2::from_bits(b).to_f32()),
            _ => None,
        };
        let data = if let Some(decode) = float8 {
            let values: Vec<f32> = bytes.iter().map(|b| decode(*b)).collect();
            TensorData::new(values, shape)
        } else {
            let src = burn_dtype(view.dtype()).ok_or_else(|| {
                format!(
                    "{}: tensor `{key}` has dtype {:?}, which cannot be loaded",
                    self.path,
                    view.dtype()
                )
            })?;
            TensorData::from_bytes_vec(bytes.to_vec(), shape, src)
        };
        self.release_pages(bytes);
        Ok(data)
    }
}

fn to_st_dtype(d: BDType) -> RtResult<SDtype> {
    Ok(match from_burn_dtype(d) {
        DType::F32 => SDtype::F32,
        DType::F16 => SDtype::F16,
        DType::BF16 => SDtype::BF16,
        DType::F64 => SDtype::F64,
        DType::I64 => SDtype::I64,
        DType::I32 => SDtype::I32,
        DType::U8 => SDtype::U8,
        other => return Err(format!("cannot save a {other} tensor")),
    })
}

/// Serialises host copies of tensors and writes them atomically.
pub fn save(
    path: &Path,
    tensors: Vec<(String, TensorData)>,
    metadata: HashMap<String, String>,
) -> RtResult<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, data) in &tensors {
        let view = safetensors::tensor::TensorView::new(
            to_st_dtype(data.dtype)?,
            data.shape.to_vec(),
            data.as_bytes(),
        )
        .map_err(|e| format!("tensor `{name}`: {e}"))?;
        views.push((name.clone(), view));
    }
    let meta = (!metadata.is_empty()).then_some(metadata);
    let bytes = safetensors::serialize(views, meta)
        .map_err(|e| format!("serialising {}: {e}", path.display()))?;
    crate::fsutil::write_atomic(path, &bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod hostile_bytes {
    //! Random and mutated bytes given as weight files (safetensors, torch zip checkpoints and
    //! the pickles inside): an error or a file, never a panic, and no allocation beyond what
    //! the file holds.
    use super::*;
    use proptest::prelude::*;

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name);
        std::fs::read(p).unwrap()
    }

    /// Opens `bytes` as a weights file and reads every tensor it lists.
    fn read_all(bytes: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        std::fs::write(&path, bytes).unwrap();
        if let Ok(f) = WeightFile::open(path.to_str().unwrap()) {
            for i in f.infos().unwrap_or_default() {
                let _ = f.read(&i.key, BDType::F32);
            }
        }
    }

    /// `base` with `edits` (position, byte) applied and cut at `cut` (if shorter).
    fn mutate(base: &[u8], edits: &[(usize, u8)], cut: usize) -> Vec<u8> {
        let mut b = base.to_vec();
        for (at, v) in edits {
            let i = at % b.len();
            b[i] = *v;
        }
        b.truncate(cut.max(1));
        b
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            read_all(&bytes);
        }

        #[test]
        fn mutated_torch_checkpoints(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let base = fixture("legacy/sd15_tiny_ldm.ckpt");
            read_all(&mutate(&base, &edits, cut % (base.len() + 1)));
        }

        #[test]
        fn mutated_checkpoints_from_before_torch_1_6(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            // Its pickles come first: edits there reach the tensor index; cuts the storages.
            let base = fixture("legacy/sd15_tiny_ldm_before_1_6.ckpt");
            let pickles = base.len().min(64 * 1024);
            let edits: Vec<_> = edits.iter().map(|(at, v)| (at % pickles, *v)).collect();
            read_all(&mutate(&base, &edits, cut % (base.len() + 1)));
        }

        #[test]
        fn mutated_pickles(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            // The fixture's data.pkl: the zip's first entry, stored right after its header.
            let ckpt = fixture("legacy/sd15_tiny_ldm.ckpt");
            let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&ckpt[..])).unwrap();
            let mut pkl = Vec::new();
            std::io::Read::read_to_end(&mut zip.by_index(0).unwrap(), &mut pkl).unwrap();
            let _ = crate::pickle::load(&mutate(&pkl, &edits, cut % (pkl.len() + 1)));
        }

        #[test]
        fn checkpoints_with_mutated_pickles(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            // The fixture with its data.pkl mutated and the archive rebuilt around it, so that
            // changed shapes, strides, offsets and storage keys reach the tensor index.
            let ckpt = fixture("legacy/sd15_tiny_ldm.ckpt");
            let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&ckpt[..])).unwrap();
            let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
            let stored = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            for i in 0..zip.len() {
                let name = zip.name_for_index(i).unwrap().to_string();
                if name.ends_with("/data.pkl") {
                    let mut pkl = Vec::new();
                    std::io::Read::read_to_end(&mut zip.by_index(i).unwrap(), &mut pkl).unwrap();
                    out.start_file(name, stored).unwrap();
                    std::io::Write::write_all(&mut out, &mutate(&pkl, &edits, usize::MAX))
                        .unwrap();
                } else {
                    out.raw_copy_file(zip.by_index_raw(i).unwrap()).unwrap();
                }
            }
            read_all(&out.finish().unwrap().into_inner());
        }

        #[test]
        fn mutated_safetensors(
            edits in proptest::collection::vec((0usize..256, any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            // Edits in the header, where the lengths and offsets are.
            let base = fixture("flux/parts/codes.safetensors");
            read_all(&mutate(&base, &edits, cut % (base.len() + 1)));
        }
    }
}
