//! A restricted reader of the pickles inside PyTorch's `.ckpt` / `.pt` / `.bin` files. It runs
//! no code: pickle's opcodes are interpreted into plain values, and the only callables it
//! knows are rebuilt as data (tensors, ordered dicts, sets, bytes); a harmless class a
//! checkpoint carries besides its weights (PyTorch Lightning's callbacks, numpy scalars) becomes
//! an opaque value. Any other global (`os.system`, `builtins.eval`, ...) is refused by name
//! before anything is built with it. Hand-written: the pickle crates either execute nothing but
//! cannot read torch's persistent storages, or come with a whole tensor library.

use std::collections::HashMap;

/// A pickled value, as far as a weights file needs one.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// An allowed global, not called yet (`module.name`).
    Global(String),
    /// A storage of the archive (`data/<key>`) with its element type (`FloatStorage`).
    Storage {
        key: String,
        kind: String,
    },
    /// A tensor over a storage: element offset, shape and strides in elements.
    Tensor {
        key: String,
        kind: String,
        offset: u64,
        shape: Vec<u64>,
        stride: Vec<u64>,
    },
    /// An allowed object that is not data (`pytorch_lightning...ModelCheckpoint`).
    Opaque(String),
}

/// Globals rebuilt as data, and harmless classes kept opaque. Everything else is refused.
const DATA: [&str; 8] = [
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "_codecs.encode",
    "builtins.set",
    "__builtin__.set",
    "torch.Size",
];
const OPAQUE: [&str; 6] = [
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "argparse.Namespace",
    "torch.device",
];
/// torch's typed storages (`torch.FloatStorage`), by element type.
const STORAGES: [&str; 10] = [
    "FloatStorage",
    "HalfStorage",
    "BFloat16Storage",
    "DoubleStorage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
];

fn allowed(global: &str) -> bool {
    DATA.contains(&global)
        || OPAQUE.contains(&global)
        || global
            .strip_prefix("torch.")
            .is_some_and(|s| STORAGES.contains(&s))
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        // Lengths come from the file: checked against what is there before anything is made.
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or_else(|| format!("the pickle ends inside a value at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or("the pickle ends inside a text line")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Result<String, String> {
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}

fn int_of(v: &Value) -> Result<i64, String> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Bool(b) => Ok(*b as i64),
        other => Err(format!("expected an integer, found {other:?}")),
    }
}

fn ints(v: &Value) -> Result<Vec<u64>, String> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|i| u64::try_from(int_of(i)?).map_err(|_| "a negative size or stride".to_string()))
            .collect(),
        other => Err(format!("expected a tuple of sizes, found {other:?}")),
    }
}

/// What calling the allowed global `f` with `args` builds.
fn call(f: &str, args: Vec<Value>) -> Result<Value, String> {
    Ok(match f {
        "collections.OrderedDict" => Value::Dict(Vec::new()),
        "builtins.set" | "__builtin__.set" | "torch.Size" => match args.into_iter().next() {
            Some(Value::List(v) | Value::Tuple(v)) => Value::Tuple(v),
            _ => Value::Tuple(Vec::new()),
        },
        "_codecs.encode" => match args.first() {
            // Protocol 2 pickles bytes as latin-1 text.
            Some(Value::Str(s)) => Value::Bytes(s.chars().map(|c| c as u32 as u8).collect()),
            _ => return Err("_codecs.encode without a string".into()),
        },
        "torch._utils._rebuild_tensor_v2" => {
            let mut it = args.into_iter();
            let (Some(storage), Some(offset), Some(shape), Some(stride)) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                return Err("_rebuild_tensor_v2 with too few arguments".into());
            };
            let Value::Storage { key, kind } = storage else {
                return Err(format!(
                    "_rebuild_tensor_v2 over {storage:?}, not a storage"
                ));
            };
            let offset = u64::try_from(int_of(&offset)?).map_err(|_| "a negative offset")?;
            let (shape, stride) = (ints(&shape)?, ints(&stride)?);
            if shape.len() != stride.len() {
                return Err("a tensor whose strides do not match its dimensions".into());
            }
            Value::Tensor {
                key,
                kind,
                offset,
                shape,
                stride,
            }
        }
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => args
            .into_iter()
            .next()
            .ok_or("_rebuild_parameter without a tensor")?,
        other => Value::Opaque(other.to_string()),
    })
}

/// Values made from a pickle, all told (a memo entry fetched again counts again): a few bytes
/// of memo gets could otherwise double a value until memory runs out.
const MAX_NODES: usize = 4_000_000;
/// How deep values nest (a deeper one would overflow the stack when dropped).
const MAX_DEPTH: usize = 256;

/// A value with its depth and its node count, known as it is built.
#[derive(Clone)]
struct Item {
    v: Value,
    depth: usize,
    nodes: usize,
}

impl Item {
    fn leaf(v: Value) -> Self {
        Self {
            v,
            depth: 1,
            nodes: 1,
        }
    }
}

/// The budget of values left, and the checks every new value passes.
struct Budget(usize);

impl Budget {
    fn spend(&mut self, nodes: usize) -> Result<(), String> {
        self.0 = self
            .0
            .checked_sub(nodes)
            .ok_or_else(|| format!("more than {MAX_NODES} values: not a checkpoint"))?;
        Ok(())
    }

    /// A composite of `items`: one node more than they, one level deeper.
    fn composite(
        &mut self,
        items: Vec<Item>,
        make: fn(Vec<Value>) -> Value,
    ) -> Result<Item, String> {
        let depth = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(format!(
                "values nest deeper than {MAX_DEPTH}: not a checkpoint"
            ));
        }
        self.spend(1)?;
        let nodes = 1 + items.iter().map(|i| i.nodes).sum::<usize>();
        Ok(Item {
            v: make(items.into_iter().map(|i| i.v).collect()),
            depth,
            nodes,
        })
    }

    /// A copy of `item` (a memo put or get): charged in full.
    fn copy(&mut self, item: &Item) -> Result<Item, String> {
        self.spend(item.nodes)?;
        Ok(item.clone())
    }
}

/// Puts `children` into the list or dict `into` (on the stack), one level below it.
fn add_to(into: &mut Item, children: Vec<Item>, what: &str) -> Result<(), String> {
    for c in &children {
        into.depth = into.depth.max(c.depth + 1);
        into.nodes += c.nodes;
    }
    if into.depth > MAX_DEPTH {
        return Err(format!(
            "values nest deeper than {MAX_DEPTH}: not a checkpoint"
        ));
    }
    let mut values = children.into_iter().map(|c| c.v);
    match (&mut into.v, what) {
        (Value::List(l), "list") => l.extend(values),
        (Value::Dict(d), "dict") => {
            while let (Some(k), Some(v)) = (values.next(), values.next()) {
                d.push((k, v));
            }
        }
        _ => return Err(format!("the pickle adds to something not a {what}")),
    }
    Ok(())
}

/// Reads one pickle (the `data.pkl` of a torch zip file).
pub fn load(data: &[u8]) -> Result<Value, String> {
    load_from(data).map(|(v, _)| v)
}

/// Reads the pickle at the start of `data`, and says how many bytes it took (torch's format
/// before 1.6 puts several pickles, then the storages, one after another).
pub fn load_from(data: &[u8]) -> Result<(Value, usize), String> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Item> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u32, Item> = HashMap::new();
    let mut budget = Budget(MAX_NODES);
    let pop = |stack: &mut Vec<Item>| stack.pop().ok_or("the pickle's stack is empty".to_string());
    let since_mark = |stack: &mut Vec<Item>, marks: &mut Vec<usize>| {
        let m = marks.pop().ok_or("the pickle has no mark")?;
        if m > stack.len() {
            return Err("the pickle's mark is past its stack".to_string());
        }
        Ok(stack.split_off(m))
    };
    let global = |module: &str, name: &str| {
        let g = format!("{module}.{name}");
        if allowed(&g) {
            Ok(Value::Global(g))
        } else {
            Err(format!(
                "refused the pickled global `{g}`: only tensors and plain containers are read \
                 (nothing in the file is run); convert the file to safetensors with the tool \
                 that made it"
            ))
        }
    };
    loop {
        let op = r.u8()?;
        // Every scalar is a node of the budget.
        let leaf = |v: Value, budget: &mut Budget| -> Result<Item, String> {
            budget.spend(1)?;
            Ok(Item::leaf(v))
        };
        let item = match op {
            0x80 => {
                r.u8()?; // PROTO
                continue;
            }
            0x95 => {
                r.u64()?; // FRAME
                continue;
            }
            b'.' => return Ok((pop(&mut stack)?.v, r.pos)),
            b'(' => {
                marks.push(stack.len());
                continue;
            }
            b'N' => leaf(Value::None, &mut budget)?,
            0x88 => leaf(Value::Bool(true), &mut budget)?,
            0x89 => leaf(Value::Bool(false), &mut budget)?,
            b'J' => leaf(Value::Int(r.u32()? as i32 as i64), &mut budget)?,
            b'K' => leaf(Value::Int(r.u8()? as i64), &mut budget)?,
            b'M' => leaf(Value::Int(r.u16()? as i64), &mut budget)?,
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = r.u8()? as usize;
                let b = r.take(n)?;
                if n > 8 {
                    return Err("an integer wider than 64 bits".into());
                }
                let mut v: i64 = 0;
                for (i, byte) in b.iter().enumerate() {
                    v |= (*byte as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1 << (8 * n);
                }
                leaf(Value::Int(v), &mut budget)?
            }
            b'G' => leaf(
                Value::Float(f64::from_be_bytes(
                    r.take(8)?.try_into().unwrap_or_default(),
                )),
                &mut budget,
            )?,
            b'X' | b'T' => {
                let n = r.u32()? as usize;
                leaf(Value::Str(r.string(n)?), &mut budget)?
            }
            0x8c | b'U' => {
                let n = r.u8()? as usize;
                leaf(Value::Str(r.string(n)?), &mut budget)?
            }
            b'B' => {
                let n = r.u32()? as usize;
                leaf(Value::Bytes(r.take(n)?.to_vec()), &mut budget)?
            }
            b'C' => {
                let n = r.u8()? as usize;
                leaf(Value::Bytes(r.take(n)?.to_vec()), &mut budget)?
            }
            b')' => leaf(Value::Tuple(Vec::new()), &mut budget)?,
            b']' => leaf(Value::List(Vec::new()), &mut budget)?,
            b'}' => leaf(Value::Dict(Vec::new()), &mut budget)?,
            b't' => {
                let items = since_mark(&mut stack, &mut marks)?;
                budget.composite(items, Value::Tuple)?
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("the pickle's stack is too short for a tuple".into());
                }
                let items = stack.split_off(stack.len() - n);
                budget.composite(items, Value::Tuple)?
            }
            b'l' => {
                let items = since_mark(&mut stack, &mut marks)?;
                budget.composite(items, Value::List)?
            }
            b'd' => {
                let items = since_mark(&mut stack, &mut marks)?;
                let mut d = budget.composite(Vec::new(), |_| Value::Dict(Vec::new()))?;
                add_to(&mut d, items, "dict")?;
                d
            }
            b'a' | b'e' | b's' | b'u' => {
                let children = match op {
                    b'a' => vec![pop(&mut stack)?],
                    b's' => {
                        let v = pop(&mut stack)?;
                        let k = pop(&mut stack)?;
                        vec![k, v]
                    }
                    _ => since_mark(&mut stack, &mut marks)?,
                };
                let into = stack.last_mut().ok_or("the pickle adds to nothing")?;
                let what = if matches!(op, b'a' | b'e') {
                    "list"
                } else {
                    "dict"
                };
                add_to(into, children, what)?;
                continue;
            }
            b'q' | b'r' | 0x94 => {
                let i = match op {
                    b'q' => r.u8()? as u32,
                    b'r' => r.u32()?,
                    _ => memo.len() as u32,
                };
                let top = stack.last().ok_or("a memo put on an empty stack")?;
                let copy = budget.copy(top)?;
                memo.insert(i, copy);
                continue;
            }
            b'h' | b'j' => {
                let i = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                let v = memo.get(&i).ok_or("a memo entry never put")?;
                budget.copy(v)?
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                leaf(global(&module, &name)?, &mut budget)?
            }
            0x93 => {
                let name = pop(&mut stack)?.v;
                let module = pop(&mut stack)?.v;
                let (Value::Str(m), Value::Str(n)) = (module, name) else {
                    return Err("STACK_GLOBAL without two strings".into());
                };
                leaf(global(&m, &n)?, &mut budget)?
            }
            b'R' | 0x81 => {
                // REDUCE f(*args) and NEWOBJ cls.__new__(cls, *args): only allowed globals
                // get here, and they build data.
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                let Value::Global(f) = f.v else {
                    return Err(format!(
                        "the pickle calls {:?}, which is not a known global",
                        f.v
                    ));
                };
                let Value::Tuple(values) = args.v else {
                    return Err("the pickle calls a global without an argument tuple".into());
                };
                Item {
                    v: call(&f, values)?,
                    depth: args.depth,
                    nodes: args.nodes,
                }
            }
            b'b' => {
                // BUILD: state set on an object; dicts and opaque objects keep what they are.
                pop(&mut stack)?;
                continue;
            }
            b'Q' => {
                // BINPERSID: torch's ('storage', storage type, key, location, numel).
                let pid = pop(&mut stack)?;
                let Value::Tuple(items) = pid.v else {
                    return Err("a persistent id that is not a tuple".into());
                };
                let (Some(Value::Global(kind)), Some(Value::Str(key))) =
                    (items.get(1), items.get(2))
                else {
                    return Err("a persistent id that is not torch's storage".into());
                };
                // Before torch 1.6 a sixth item may make it a view into another storage.
                if matches!(items.get(5), Some(v) if *v != Value::None) {
                    return Err(
                        "a view into another storage (an old torch storage view): not read".into(),
                    );
                }
                let kind = kind.strip_prefix("torch.").unwrap_or(kind).to_string();
                leaf(
                    Value::Storage {
                        key: key.clone(),
                        kind,
                    },
                    &mut budget,
                )?
            }
            b'0' => {
                pop(&mut stack)?;
                continue;
            }
            other => {
                return Err(format!(
                    "pickle opcode 0x{other:02x} at byte {} is not read here",
                    r.pos - 1
                ));
            }
        };
        stack.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values_and_a_refused_global() {
        // {'a': (1, -2, 'x'), 'b': [True, None]} in protocol 2.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01J\xfe\xff\xff\xffX\x01\x00\x00\x00x\x87q\x02X\x01\x00\x00\x00bq\x03]q\x04(\x88Neu.";
        let v = load(p).unwrap();
        let Value::Dict(d) = v else { panic!() };
        assert_eq!(d[0].0, Value::Str("a".into()));
        assert_eq!(
            d[0].1,
            Value::Tuple(vec![Value::Int(1), Value::Int(-2), Value::Str("x".into())])
        );
        assert_eq!(d[1].1, Value::List(vec![Value::Bool(true), Value::None]));
        let evil = b"cposix\nsystem\n(X\x04\x00\x00\x00trueR.";
        let e = load(evil).unwrap_err();
        assert!(e.contains("`posix.system`"), "{e}");
        // A length past the end is an error, not an allocation.
        assert!(load(b"X\xff\xff\xff\xff").is_err());
        assert!(load(b"").is_err());
        // A value doubled by memo gets, and one nested a byte per level: refused, not built.
        let mut doubling = b")q\x00".to_vec();
        for _ in 0..40 {
            doubling.extend(b"h\x00h\x00\x86q\x00");
        }
        doubling.push(b'.');
        assert!(load(&doubling).unwrap_err().contains("values"));
        let mut deep = b")".to_vec();
        deep.extend([0x85; 100_000]);
        deep.push(b'.');
        assert!(load(&deep).unwrap_err().contains("deeper"));
    }
}
