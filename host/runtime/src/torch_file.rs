//! PyTorch checkpoints (`.ckpt`, `.pt`, `.bin`) as an index of tensors over the mapped file,
//! read one at a time. The zip format (`torch.save` since 1.6): `<name>/data.pkl` read by the
//! restricted [`crate::pickle`] reader, each storage a stored (uncompressed) entry
//! `<name>/data/<key>`. The format before 1.6: a magic number, protocol and system-information
//! pickles, the object's pickle, the list of its storages' keys, then each storage in that order
//! (its element count, 8 bytes, then its elements). A Lightning checkpoint's tensors are those
//! of its `state_dict`.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::ops::Range;

use ferrite_plugin_api::{DType, WeightInfo};

use crate::pickle::{self, Value};

/// Where one tensor's elements are.
#[derive(Debug, Clone)]
pub struct TorchTensor {
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Its storage's bytes in the file.
    storage: Range<usize>,
    offset: u64,
    stride: Vec<u64>,
}

fn dtype_of(kind: &str) -> Option<(DType, usize)> {
    Some(match kind {
        "FloatStorage" => (DType::F32, 4),
        "HalfStorage" => (DType::F16, 2),
        "BFloat16Storage" => (DType::BF16, 2),
        "DoubleStorage" => (DType::F64, 8),
        "LongStorage" => (DType::I64, 8),
        "IntStorage" => (DType::I32, 4),
        "ByteStorage" => (DType::U8, 1),
        "BoolStorage" => (DType::Bool, 1),
        _ => return None,
    })
}

pub fn elem_size(d: DType) -> usize {
    match d {
        DType::F64 | DType::I64 => 8,
        DType::F32 | DType::I32 => 4,
        DType::F16 | DType::BF16 => 2,
        _ => 1,
    }
}

/// Whether `bytes` (a file's start) is a zip archive, as torch's checkpoints are.
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// The tensors of a torch zip checkpoint `bytes` (the whole file) by name.
pub fn index(bytes: &[u8]) -> Result<BTreeMap<String, TorchTensor>, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a readable zip archive: {e}"))?;
    let pkl = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_string))
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or("no `data.pkl` in the archive: not a PyTorch checkpoint")?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();
    // torch writes the machine's byte order; the bytes are read as little-endian.
    if let Ok(f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        let _ = f.take(16).read_to_string(&mut order);
        if order.trim() != "little" {
            return Err(format!(
                "its tensors are in `{}` byte order; only little-endian checkpoints are read",
                order.trim()
            ));
        }
    }
    let root = {
        let mut f = zip.by_name(&pkl).map_err(|e| format!("{pkl}: {e}"))?;
        let mut data = Vec::new();
        // The pickle is small next to the weights; its size is what the archive holds.
        f.read_to_end(&mut data)
            .map_err(|e| format!("{pkl}: {e}"))?;
        pickle::load(&data).map_err(|e| format!("{pkl}: {e}"))?
    };
    let mut storages: BTreeMap<String, Range<usize>> = BTreeMap::new();
    tensors(root, |key, name| {
        if let Some(r) = storages.get(key) {
            return Ok(r.clone());
        }
        let entry = format!("{prefix}data/{key}");
        let f = zip
            .by_name(&entry)
            .map_err(|e| format!("tensor `{name}`: {entry}: {e}"))?;
        if f.compression() != zip::CompressionMethod::Stored {
            return Err(format!(
                "{entry} is compressed ({}): torch stores its tensors uncompressed; \
                 re-save the file with torch",
                f.compression()
            ));
        }
        let start = f
            .data_start()
            .ok_or_else(|| format!("{entry}: no data offset"))?;
        let start = usize::try_from(start).map_err(|e| e.to_string())?;
        let end = usize::try_from(f.size())
            .ok()
            .and_then(|n| start.checked_add(n))
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| format!("{entry} runs past the end of the file"))?;
        storages.insert(key.to_string(), start..end);
        Ok(start..end)
    })
}

/// The first pickle of a file in torch's format before 1.6: its magic number
/// (0x1950a86a20f9469cfc6c as a protocol-2 long).
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
];

/// Whether `bytes` (a file's start) is torch's format before 1.6.
pub fn is_legacy(bytes: &[u8]) -> bool {
    bytes.starts_with(&LEGACY_MAGIC)
}

/// The pickle at `*pos`, and `*pos` past it.
fn next_pickle(bytes: &[u8], pos: &mut usize, what: &str) -> Result<Value, String> {
    let (v, n) = pickle::load_from(&bytes[*pos..]).map_err(|e| format!("its {what}: {e}"))?;
    *pos += n;
    Ok(v)
}

/// Every storage's element type, by key, from the values over it.
fn storage_kinds(v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Storage { key, kind } | Value::Tensor { key, kind, .. } => {
            out.insert(key.clone(), kind.clone());
        }
        Value::Tuple(items) | Value::List(items) => {
            items.iter().for_each(|i| storage_kinds(i, out));
        }
        Value::Dict(entries) => entries.iter().for_each(|(k, v)| {
            storage_kinds(k, out);
            storage_kinds(v, out);
        }),
        _ => {}
    }
}

/// The tensors of a checkpoint in torch's format before 1.6, `bytes` the whole file.
pub fn legacy_index(bytes: &[u8]) -> Result<BTreeMap<String, TorchTensor>, String> {
    let mut pos = LEGACY_MAGIC.len();
    if next_pickle(bytes, &mut pos, "protocol")? != Value::Int(1001) {
        return Err("its protocol is not torch's 1001: not a PyTorch checkpoint".into());
    }
    if let Value::Dict(info) = next_pickle(bytes, &mut pos, "system information")?
        && info.contains(&(Value::Str("little_endian".into()), Value::Bool(false)))
    {
        return Err("it was saved big-endian; only little-endian checkpoints are read".into());
    }
    let root = next_pickle(bytes, &mut pos, "object")?;
    let Value::List(keys) = next_pickle(bytes, &mut pos, "list of storages")? else {
        return Err("its list of storages is not a list".into());
    };
    let mut kinds = BTreeMap::new();
    storage_kinds(&root, &mut kinds);
    let mut storages = BTreeMap::new();
    for key in keys {
        let Value::Str(key) = key else {
            return Err("a storage key that is not a string".into());
        };
        let kind = kinds
            .get(&key)
            .ok_or_else(|| format!("storage {key} is listed but nothing uses it"))?;
        // Storages of types no tensor is read from are still stepped over.
        let size = match kind.as_str() {
            "ShortStorage" => 2,
            "CharStorage" => 1,
            _ => {
                dtype_of(kind)
                    .ok_or_else(|| format!("storage {key}: type {kind} is not read"))?
                    .1
            }
        };
        let count = bytes
            .get(pos..pos + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| format!("the file ends before storage {key}"))?;
        let start = pos + 8;
        let end = count
            .checked_mul(size as u64)
            .and_then(|n| usize::try_from(n).ok())
            .and_then(|n| start.checked_add(n))
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| format!("storage {key} runs past the end of the file"))?;
        storages.insert(key, start..end);
        pos = end;
    }
    tensors(root, |key, name| {
        storages
            .get(key)
            .cloned()
            .ok_or_else(|| format!("tensor `{name}`: its storage {key} is not in the file"))
    })
}

/// The index of the tensors a checkpoint's object holds (under `state_dict` for Lightning's),
/// each over the bytes `storage_of(key, tensor name)` gives, checked to hold it.
fn tensors(
    root: Value,
    mut storage_of: impl FnMut(&str, &str) -> Result<Range<usize>, String>,
) -> Result<BTreeMap<String, TorchTensor>, String> {
    // A Lightning checkpoint holds the weights under `state_dict`.
    let Value::Dict(top) = root else {
        return Err("the pickle holds no dict of tensors".into());
    };
    let tensors = match top
        .iter()
        .find(|(k, _)| *k == Value::Str("state_dict".into()))
    {
        Some((_, Value::Dict(sd))) => sd.clone(),
        _ => top,
    };
    let mut out = BTreeMap::new();
    let mut named = Vec::new();
    nested(String::new(), tensors, &mut named);
    for (name, v) in named {
        let (
            name,
            Value::Tensor {
                key,
                kind,
                offset,
                shape,
                stride,
            },
        ) = (name, v)
        else {
            continue;
        };
        let (dtype, size) = dtype_of(&kind)
            .ok_or_else(|| format!("tensor `{name}`: storage type {kind} is not read"))?;
        let storage = storage_of(&key, &name)?;
        // The largest element the strides reach must lie in the storage, and the elements read
        // out (strides may repeat one) may not be more than it holds.
        let last = shape.iter().zip(&stride).try_fold(offset, |acc, (n, s)| {
            if *n == 0 {
                Some(acc)
            } else {
                acc.checked_add((n - 1).checked_mul(*s)?)
            }
        });
        let bytes_of = |elements: Option<u64>| elements.and_then(|e| e.checked_mul(size as u64));
        let numel = shape.iter().try_fold(1u64, |acc, n| acc.checked_mul(*n));
        let len = storage.len() as u64;
        let fits = bytes_of(numel).is_some_and(|b| b <= len)
            && bytes_of(Some(offset)).is_some_and(|b| b <= len)
            && (shape.contains(&0)
                || bytes_of(last.and_then(|l| l.checked_add(1))).is_some_and(|b| b <= len));
        if !fits {
            return Err(format!(
                "tensor `{name}` reaches past its storage {key} (shape {shape:?}, strides \
                 {stride:?}, offset {offset})"
            ));
        }
        out.insert(
            name,
            TorchTensor {
                dtype,
                shape,
                storage,
                offset,
                stride,
            },
        );
    }
    if out.is_empty() {
        return Err("the checkpoint holds no tensors".into());
    }
    Ok(out)
}

/// The dict's entries with string keys, those of dicts inside it under `outer.inner` names
/// (A1111's embeddings keep theirs in `string_to_param`).
fn nested(prefix: String, dict: Vec<(Value, Value)>, out: &mut Vec<(String, Value)>) {
    for (k, v) in dict {
        let Value::Str(k) = k else { continue };
        let name = if prefix.is_empty() {
            k
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Dict(inner) => nested(name, inner, out),
            v => out.push((name, v)),
        }
    }
}

impl TorchTensor {
    pub fn info(&self, key: &str) -> WeightInfo {
        WeightInfo {
            key: key.to_string(),
            dtype: self.dtype,
            shape: self.shape.clone(),
        }
    }

    /// Its storage's bytes in the file.
    pub fn storage(&self) -> Range<usize> {
        self.storage.clone()
    }

    /// Its elements' bytes in row-major order, gathered through the strides.
    pub fn bytes(&self, file: &[u8]) -> Vec<u8> {
        let size = elem_size(self.dtype);
        let storage = &file[self.storage.clone()];
        let numel: u64 = self.shape.iter().product();
        if numel == 0 {
            return Vec::new();
        }
        let contiguous = {
            let mut expect = 1;
            let mut ok = true;
            for (n, s) in self.shape.iter().zip(&self.stride).rev() {
                if *n > 1 && *s != expect {
                    ok = false;
                }
                expect *= n;
            }
            ok
        };
        if contiguous {
            let start = self.offset as usize * size;
            return storage[start..start + numel as usize * size].to_vec();
        }
        let mut out = Vec::with_capacity(numel as usize * size);
        let mut index = vec![0u64; self.shape.len()];
        for _ in 0..numel {
            let at: u64 = self.offset
                + index
                    .iter()
                    .zip(&self.stride)
                    .map(|(i, s)| i * s)
                    .sum::<u64>();
            let at = at as usize * size;
            out.extend_from_slice(&storage[at..at + size]);
            // The next row-major index.
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        out
    }
}
